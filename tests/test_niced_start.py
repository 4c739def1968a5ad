"""Starting the canary's candidate engine (serving.engine.start_then_nice): it starts at the serving process's own
priority — a start niced from the first never finished on a busy core — and afterwards every thread of what it
started runs at the raised nice value; the caller's own priority is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.engine import descendants, start_then_nice
from tests.waiting import wait_until

# a child with a second thread, so "every thread" is checked, not only the main one
TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_the_start_runs_at_full_priority_and_what_it_started_is_lowered_after():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen_during: list[int] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", TWO_THREADS])
        seen_during.append(nice_of(proc.pid))
        # its second thread exists before the start returns (as an engine's threads do once it has loaded)
        wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) >= 2, 30, "the child's second thread", 0.01)
        return proc

    proc = start_then_nice(19, start)
    try:
        assert seen_during == [before]  # loading: the caller's own priority
        assert proc.pid in descendants(os.getpid())
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(threads) >= 2 and {nice_of(t) for t in threads} == {min(19, before + 19)}  # afterwards: lowered
        assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller is not
    finally:
        proc.kill()
        proc.wait()


def test_zero_is_called_in_place_and_errors_reach_the_caller():
    assert start_then_nice(0, lambda: os.getpriority(os.PRIO_PROCESS, 0)) == os.getpriority(os.PRIO_PROCESS, 0)
    with pytest.raises(ZeroDivisionError):
        start_then_nice(5, lambda: 1 / 0)
