"""Runs the outbox relay as a child process of serving and restarts it if it dies. The command and its
environment are handed in (duet/wiring.py: `duet relay` with serving's own settings)."""

from __future__ import annotations

import logging
import subprocess

from prometheus_client import Counter

from duet.processes import stop_process

log = logging.getLogger(__name__)

RELAY_RESTARTS = Counter("duet_relay_restarts_total", "Times serving restarted its outbox relay child")


class RelayChild:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> RelayChild:
        self.proc = subprocess.Popen(self.cmd, env=self.env)
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log.warning("outbox relay exited with %s; restarting it", self.proc.returncode)
            RELAY_RESTARTS.inc()
            self.start()

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.proc = None
