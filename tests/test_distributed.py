"""The trainer on two ranks under torchrun (gloo, this CPU): the same global batch gives the weights one process
gives, and `duet train` with DUET_TRAINER_RANKS=2 recovers when a rank is SIGKILLed mid-round."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from kafka import KafkaProducer

from duet.broker import EmbeddedBroker
from feedback.contract.registry import Registry
from feedback.contract.topics import FEEDBACK, ensure_topics
from tests.conftest import TEST_REDIS_DB, empty_redis
from tests.waiting import wait_until
from trainer import checkpoint
from trainer.distributed import World, interleave
from trainer.synthetic import marker_event

ROOT = Path(__file__).resolve().parent.parent
STEPS = str(ROOT / "tests" / "distributed_steps.py")
RANKS_REDIS = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]


def test_two_ranks_train_what_one_process_trains(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for cmd, out in (([sys.executable, STEPS], one), (_torchrun(2) + [STEPS], two)):
        done = subprocess.run(cmd + [str(tiny_model), str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["groups_trained"] == b["groups_trained"] > 1  # RLOO groups split over the ranks, not one each
    # The same updates up to fp32 summation order. Compared as the update's difference relative to its size: a
    # parameter whose true gradient is 0 (the reward head's bias: a shift cancels in r+ - r-) has rounding noise
    # for a gradient, and AdamW's first step turns any noise into a step of up to lr, in one process too. A rank's
    # share left out or counted twice moves the update by ~50 %, not 0.1 %.
    for name in ("reward", "adapters"):
        init = a[name + "_init"]
        assert a[name].keys() == b[name].keys() == init.keys()
        da = torch.cat([(a[name][k].float() - init[k].float()).flatten() for k in init])
        db = torch.cat([(b[name][k].float() - init[k].float()).flatten() for k in init])
        assert float((da - db).norm()) < 1e-3 * float(da.norm()), name
    adapters = a["adapters"]
    assert max(float((adapters[k] - b["adapters"][k]).abs().max()) for k in adapters) < 1e-5
    assert any(float(v.abs().max()) > 0 for k, v in a["adapters"].items() if "lora_B" in k)  # the update moved B
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
    # the summed gradients themselves (AdamW's first step is ~lr·sign(g): blind to a gradient scaled by the ranks)
    assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-4) and min(a["grad_norms"]) > 0


def test_interleave_undoes_each_ranks_share():
    world = [World(r, 3) for r in range(3)]
    items = list("abcdefg")
    shares = [[items[i] for i in w.mine(len(items))] for w in world]
    assert shares == [list("adg"), list("be"), list("cf")]
    assert interleave(shares, len(items), 3) == items


@pytest.fixture
def own_redis():
    yield from empty_redis(RANKS_REDIS)


@pytest.mark.slow
def test_a_rank_killed_mid_round_is_restarted_and_no_vote_is_lost(tiny_model, tmp_path, own_redis):
    rng = random.Random(11)
    events = [marker_event(rng) for _ in range(48)]
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    log = tmp_path / "train.log"
    try:
        ensure_topics(broker.bootstrap, partitions=2)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        for e in events:
            producer.send(FEEDBACK, key=e.comparison.comparison_id.encode(), value=e.model_dump_json().encode())
        producer.flush()
        producer.close()
        home = tmp_path / "home"
        env = {**os.environ, "DUET_KAFKA_BOOTSTRAP": broker.bootstrap, "DUET_HOME": str(home),
               "DUET_REDIS_URL": RANKS_REDIS, "DUET_TRAINER_RANKS": "2", "DUET_TRAINER_NICE": "0",
               "DUET_RM_BACKBONE": str(tiny_model), "DUET_RM_LR": "1e-3", "DUET_RM_STEP_GROUPS": "8", "DUET_RM_MAX_WAIT_S": "0.5",
               "DUET_RM_MAX_TOKENS": "96", "DUET_TRAINER_METRICS_PORT": "0", "DUET_HELD_OUT_PCT": "10",
               "HF_HUB_OFFLINE": "1", "DUET_MODEL": str(tiny_model), "DUET_POLICY_EVERY_VOTES": "16",
               "DUET_POLICY_MAX_NEW_TOKENS": "8", "DUET_POLICY_PROMPTS": "4", "DUET_GATE_PROMPTS": "2",
               "DUET_GATE_MIN_WIN_RATE": "0", "DUET_GATE_MAX_KL": "1e9", "DUET_RELEASE_CHECKS": "off",
               "DUET_CANARY": "off"}
        with open(log, "w") as out:
            launcher = subprocess.Popen([sys.executable, "-m", "duet.cli", "train"], env=env, stdout=out,
                                        stderr=subprocess.STDOUT)
        try:
            def rank(r: int) -> psutil.Process | None:
                for p in psutil.Process(launcher.pid).children(recursive=True):
                    try:
                        if p.environ().get("RANK") == str(r):
                            return p
                    except psutil.Error:
                        pass
                return None

            # kill rank 1 once rank 0 has started a policy round (the ranks are in its update together)
            wait_until(lambda: "policy round:" in log.read_text() or launcher.poll() is not None, 300,
                       "a policy round to start", 0.2)
            victim = rank(1)
            assert victim is not None, log.read_text()[-3000:]
            victim.send_signal(signal.SIGKILL)
            # torchrun stops the group and starts it again: a new rank 1, and rank 0 resumes from its checkpoint
            wait_until(lambda: (r := rank(1)) is not None and r.pid != victim.pid or launcher.poll() is not None,
                       120, "torchrun to restart the ranks", 0.5)
            ckpt_dir = home / "trainer" / "checkpoints"

            def caught_up() -> bool:
                last = checkpoint.latest(ckpt_dir)
                state = checkpoint.read_state(last) if last else None
                return launcher.poll() is not None or bool(
                    state and state.events_trained + state.events_held_out == len(events)
                    and Registry(home / "registry").latest() is not None)

            wait_until(caught_up, 600, "every vote in a checkpoint and a version published after the restart", 1)
            assert launcher.poll() is None, log.read_text()[-3000:]
        finally:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                launcher.kill()
        state = checkpoint.read_state(checkpoint.latest(home / "trainer" / "checkpoints"))
        assert sorted(state.seen_ids) == sorted(e.event_id for e in events)
        assert state.events_trained + state.events_held_out == len(events)  # each trained once, none lost
        assert "resumed from" in log.read_text()  # the restarted rank 0 took the checkpoint's state
    finally:
        broker.stop()

