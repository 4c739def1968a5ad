"""Issue 24: a second `duet up` on a home that one runs from, or a second `duet train` on one checkpoint
folder, is refused with one line naming the running one; the lock goes with its holder, even on SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from duet.home_lock import AlreadyRunning, hold
from tests.test_cli import run_cli

HOLDER = "from duet.home_lock import hold; import sys, time; hold(__import__('pathlib').Path(sys.argv[1]), " \
         "'duet up on port 8123'); print('held', flush=True); time.sleep(600)"


@pytest.fixture()
def running_up(tmp_path):
    """A process holding the home's lock as a running `duet up` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "duet.lock")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_up_on_one_home_is_one_line_naming_the_first(running_up, tmp_path):
    r = run_cli("up", DUET_HOME=str(tmp_path), DUET_PORT="8124")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"duet up on port 8123 (pid {running_up.pid}" in r.stderr and "DUET_HOME" in r.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything started


def test_a_second_trainer_on_one_checkpoint_folder_is_refused(tmp_path):
    hold(tmp_path / "trainer" / "checkpoints" / ".lock", "duet train")  # this test process is the first trainer
    r = run_cli("train", DUET_HOME=str(tmp_path), DUET_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "duet train (pid" in r.stderr and str(tmp_path / "trainer" / "checkpoints") in r.stderr


def test_the_lock_goes_with_a_killed_holder(running_up, tmp_path):
    with pytest.raises(AlreadyRunning, match="duet up on port 8123"):
        hold(tmp_path / "duet.lock", "second")
    running_up.send_signal(signal.SIGKILL)
    running_up.wait()
    hold(tmp_path / "duet.lock", "second")  # nothing stale left behind
    assert "second (pid" in (tmp_path / "duet.lock").read_text()
