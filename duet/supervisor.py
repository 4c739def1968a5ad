"""What `duet up` runs: child processes started in order, restarted when they crash, and stopped in
reverse order on Ctrl-C. Each child logs to its own file in the run folder.

Children run in their own sessions, so a Ctrl-C reaches only the supervisor, which then stops the API
before the trainer and the broker last (the API's relay still needs the broker while it drains).
Each session is also the child's process group: when a child exits — even by SIGKILL, which gives it no
chance to stop its own children — whatever it started (the vLLM engine core and workers, the relay, the
resource tracker) is killed with the group before the child is started again, so the restart finds its
memory and ports free.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from duet.processes import stop_process

log = logging.getLogger(__name__)

RESTARTS = Counter("duet_child_restarts_total", "Children of `duet up` restarted after they exited", ["child"])
CHILD_UP = Gauge("duet_child_up", "1 while a child of `duet up` runs", ["child"])


@dataclass
class Child:
    name: str
    # Starts the process and returns it; called again for every restart.
    start: Callable[[], subprocess.Popen]
    stop_timeout_s: float = 30.0
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0  # for back-off: not before this time
    started_at: float = 0.0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps its children running: a child that exits is started again after a back-off that doubles
    (1 s up to `max_backoff_s`) and resets once it has stayed up for a minute."""

    def __init__(self, max_backoff_s: float = 30.0, poll_s: float = 0.5) -> None:
        self.children: list[Child] = []
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self.stopping = threading.Event()

    def add(self, child: Child) -> Child:
        self.children.append(child)
        self._launch(child)
        return child

    def _launch(self, child: Child) -> None:
        child.proc = child.start()
        child.started_at = time.time()
        CHILD_UP.labels(child=child.name).set(1)

    def check(self) -> None:
        """One round: restart any child that has exited (respecting its back-off)."""
        now = time.time()
        for child in self.children:
            if self.stopping.is_set() or child.proc is None or child.proc.poll() is None:
                continue
            if not child.next_start:
                code = child.proc.returncode
                child.exits.append(code)
                kill_group(child.proc)
                CHILD_UP.labels(child=child.name).set(0)
                stable = now - child.started_at > 60
                backoff = 1.0 if stable or child.restarts == 0 else min(self.max_backoff_s, 2.0 ** child.restarts)
                child.next_start = now + backoff
                log.warning("%s exited with code %s; restarting in %.0f s", child.name, code, backoff)
                print(f"duet: {child.name} exited (code {code}); restarting in {backoff:.0f} s", flush=True)
            if now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                RESTARTS.labels(child=child.name).inc()
                try:
                    self._launch(child)
                except Exception as e:  # e.g. the port is still held: try again after the next back-off
                    log.error("restarting %s failed: %s", child.name, e)
                    child.started_at = time.time()

    def run(self) -> None:
        """Supervise until `stop()` (or KeyboardInterrupt in the caller)."""
        while not self.stopping.wait(self.poll_s):
            self.check()

    def stop(self) -> None:
        """Stop every child, the last started first."""
        self.stopping.set()
        for child in reversed(self.children):
            stop_process(child.proc, timeout=child.stop_timeout_s)
            kill_group(child.proc)  # anything it left behind
            CHILD_UP.labels(child=child.name).set(0)


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process group `proc` leads (its session: see `spawn`), once `proc` itself has exited.
    Linux does not reuse a process id while a group of that id has members, so this never hits strangers."""
    if proc is None or proc.poll() is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A child in its own session, stdout and stderr appended to its log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
