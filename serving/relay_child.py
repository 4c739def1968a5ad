"""Runs the outbox relay (`duet relay`) as a child process of serving and restarts it if it dies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from prometheus_client import Counter

from duet.processes import stop_process
from duet.settings import Settings

log = logging.getLogger(__name__)

RELAY_RESTARTS = Counter("duet_relay_restarts_total", "Times serving restarted its outbox relay child")


class RelayChild:
    def __init__(self, s: Settings) -> None:
        # The child reads the same settings; pass the ones that may have come from overrides.
        self.env = {**os.environ, "DUET_REDIS_URL": s.redis_url, "DUET_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                    "DUET_RELAY_BATCH": str(s.relay_batch), "DUET_KAFKA_PARTITIONS": str(s.kafka_partitions),
                    "DUET_KAFKA_REPLICATION": str(s.kafka_replication), "DUET_OUTBOX_KEEP_S": str(s.outbox_keep_s)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> RelayChild:
        # --with-parent: even a SIGKILLed serving process takes its relay (and its metrics port) with it
        self.proc = subprocess.Popen([sys.executable, "-m", "duet.cli", "relay", "--with-parent"], env=self.env)
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log.warning("outbox relay exited with %s; restarting it", self.proc.returncode)
            RELAY_RESTARTS.inc()
            self.start()

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.proc = None
