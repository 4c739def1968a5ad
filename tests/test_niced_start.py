"""Starting the canary's candidate engine at a lower priority (serving.engine.call_niced): what the
started process inherits, and that the caller's own priority is left alone."""

from __future__ import annotations

import os
import subprocess

import pytest

from serving.engine import call_niced


def child_nice() -> int:
    """The nice value of a process started from the calling thread."""
    return int(subprocess.run(["sh", "-c", "ps -o ni= -p $$"], capture_output=True, text=True).stdout.strip())


def test_a_process_started_through_it_runs_at_the_raised_nice_and_the_caller_does_not():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    assert call_niced(19, child_nice) == 19
    assert call_niced(0, child_nice) == before  # 0: called in place
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_errors_reach_the_caller():
    with pytest.raises(ZeroDivisionError):
        call_niced(5, lambda: 1 / 0)
