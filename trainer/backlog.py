"""The trainer's backlog, kept current while the trainer is busy: a policy round takes minutes, in which the
main loop reads no offsets, so a lag measured there read 0 through a 27-minute round with ~200 votes waiting.
A thread of its own asks the broker for the topic's end offsets (its own group-less consumer: kafka-python's
are not thread-safe) every few seconds and subtracts what the main loop has consumed; beside it, the votes
consumed but not yet trained. Both go to the metrics (`duet_trainer_consumer_lag`, `duet_trainer_votes_untrained`)
and to Redis for the dashboard."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from feedback import loop_status
from trainer import metrics

log = logging.getLogger(__name__)


def backlog_of(ends: dict[int, int], positions: dict[int, int], untrained: int) -> loop_status.TrainerBacklog:
    """Lag = Σ over partitions (end offset − consumed position); a partition not yet consumed counts from 0."""
    lag = sum(max(0, end - positions.get(p, 0)) for p, end in ends.items())
    return loop_status.TrainerBacklog(consumer_lag=lag, votes_untrained=untrained)


class BacklogWatcher:
    def __init__(self, bootstrap: str, topic: str, positions: Callable[[], dict[int, int] | None],
                 untrained: Callable[[], int], redis=None, every_s: float = 5.0) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.positions, self.untrained = positions, untrained  # read from the main loop's latest state
        self.redis, self.every_s = redis, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duet-trainer-backlog", daemon=True)
        self._consumer = None

    def start(self) -> BacklogWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        elif self._consumer is not None:  # measured by hand, never started
            self._consumer.close()
            self._consumer = None

    def measure(self) -> loop_status.TrainerBacklog | None:
        """One reading; None until the main loop holds the topic's partitions (nothing to subtract yet)."""
        positions = self.positions()
        if positions is None:
            return None
        from kafka import KafkaConsumer, TopicPartition

        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                           client_id="duet-trainer-backlog", request_timeout_ms=5_000)
        parts = self._consumer.partitions_for_topic(self.topic) or set(positions)
        ends = self._consumer.end_offsets([TopicPartition(self.topic, p) for p in parts])
        backlog = backlog_of({tp.partition: end for tp, end in ends.items()}, positions, self.untrained())
        metrics.LAG.set(backlog.consumer_lag)
        metrics.UNTRAINED.set(backlog.votes_untrained)
        if self.redis is not None:
            loop_status.write_backlog(self.redis, backlog)
        return backlog

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.measure()
            except Exception as e:  # broker away or restarting: the next reading will tell
                log.debug("backlog: %s: %s", type(e).__name__, e)
                if self._consumer is not None:
                    self._consumer.close()
                    self._consumer = None
        if self._consumer is not None:
            self._consumer.close()
