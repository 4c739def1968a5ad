"""Serving and the trainer on disjoint cores (duet/cpus.py): the plan, and each process pinned where it was told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from duet.cpus import available_cpus, parse_cpus, plan_split, rank_cpus
from tests.waiting import wait_until


def test_cpu_lists_parse_and_bad_ones_are_named():
    assert parse_cpus("0-2,5") == (0, 1, 2, 5) and parse_cpus("") == () and parse_cpus(" 3 ") == (3,)
    for bad in ("a", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_the_split_is_disjoint_and_overridable():
    assert plan_split((0, 1)) == plan_split((0, 1), "", "")
    two = plan_split((0, 1))
    assert two.serving == (0,) and two.trainer == (1,) and two.disjoint
    eight = plan_split(tuple(range(8)))
    assert eight.serving == (0, 1, 2, 3) and eight.trainer == (4, 5, 6, 7)
    odd = plan_split((0, 1, 2))
    assert odd.serving == (0, 1) and odd.trainer == (2,)  # serving's half rounded up
    assert plan_split((0,)).serving == plan_split((0,)).trainer == (0,)  # one core: shared
    given = plan_split(tuple(range(4)), trainer="3")
    assert given.trainer == (3,) and given.serving == (0, 1, 2)
    both = plan_split(tuple(range(4)), serving="0", trainer="1-3")
    assert both.serving == (0,) and both.trainer == (1, 2, 3)
    with pytest.raises(ValueError, match="not available"):
        plan_split((0, 1), trainer="7")


def test_trainer_ranks_share_the_trainers_cores():
    assert [rank_cpus((4, 5, 6, 7), r, 2) for r in (0, 1)] == [(4, 6), (5, 7)]
    assert rank_cpus((4, 5, 6, 7), 0, 1) == (4, 5, 6, 7)
    assert rank_cpus((1,), 0, 2) == rank_cpus((1,), 1, 2) == (1,)  # fewer cores than ranks: they share


@pytest.mark.skipif(len(available_cpus()) < 2, reason="needs two cores to split")
def test_duet_train_pins_itself_and_its_torch_threads_to_its_cores(tmp_path):
    """`duet train` started with DUET_TRAINER_CPUS runs on exactly those cores (with one torch thread per core),
    as `duet up` starts it. Its Kafka is unreachable, so it stays in start-up while it is looked at."""
    target = available_cpus()[-1]
    env = {**os.environ, "DUET_TRAINER_CPUS": str(target), "DUET_KAFKA_BOOTSTRAP": "127.0.0.1:9",
           "DUET_HOME": str(tmp_path / "home"), "DUET_TRAINER_METRICS_PORT": "0", "HF_HUB_OFFLINE": "1",
           "DUET_MODEL": str(tmp_path / "absent-model")}
    code = ("import os, sys, torch\n"
            "from duet.cli import _settings\n"
            "from duet.cpus import parse_cpus, pin_trainer\n"
            "pin_trainer(parse_cpus(_settings().trainer_cpus))\n"
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [f"[{target}]", "1"]
    # and the real command pins itself before it does anything else
    proc = subprocess.Popen([sys.executable, "-m", "duet.cli", "train"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or os.sched_getaffinity(proc.pid) == {target}, 60,
                   f"duet train to pin itself to core {target}")
        assert proc.poll() is None, "duet train exited before it was seen pinned"
    finally:
        proc.kill()
        proc.wait()



def test_a_core_the_machine_lacks_is_a_one_line_error(tmp_path):
    absent = max(available_cpus()) + 64
    env = {**os.environ, "DUET_TRAINER_CPUS": str(absent), "DUET_KAFKA_BOOTSTRAP": "127.0.0.1:9",
           "DUET_HOME": str(tmp_path / "home"), "DUET_TRAINER_METRICS_PORT": "0"}
    out = subprocess.run([sys.executable, "-m", "duet.cli", "train"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"duet: error: DUET_TRAINER_CPUS={absent}: cannot run there "
                                                f"(Invalid argument)"]
