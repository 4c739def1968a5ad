"""Follows the `weights` topic and hands each announcement to the swapper.

Every replica must see every announcement, so the watcher uses no consumer group: it assigns itself
the topic's partition and starts at its end (what was published before it started is covered by
loading the registry's `latest` at start). kafka-python blocks, so it runs in a thread and passes
announcements to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from feedback.contract.events import WeightsAnnouncement
from feedback.contract.topics import WEIGHTS
from serving.metrics import ANNOUNCEMENTS_REFUSED

log = logging.getLogger(__name__)


class WeightsWatcher:
    def __init__(self, bootstrap: str, loop: asyncio.AbstractEventLoop, on_announcement) -> None:
        self.bootstrap = bootstrap
        self.loop = loop
        self.on_announcement = on_announcement  # async callable(WeightsAnnouncement)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duet-weights-watcher", daemon=True)

    def start(self) -> WeightsWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                             enable_auto_commit=False, client_id="duet-weights-watcher")
                    tp = TopicPartition(WEIGHTS, 0)
                    consumer.assign([tp])
                    consumer.seek_to_end(tp)
                for batch in consumer.poll(timeout_ms=500).values():
                    for m in batch:
                        try:
                            ann = WeightsAnnouncement.model_validate_json(m.value)
                        except Exception as e:  # malformed, or naming something outside the registry
                            ANNOUNCEMENTS_REFUSED.inc()
                            log.warning("ignoring a malformed weights announcement: %s", e)
                            continue
                        fut = asyncio.run_coroutine_threadsafe(self.on_announcement(ann), self.loop)
                        fut.result()  # one swap at a time, in announcement order
            except Exception as e:  # broker away: retry
                log.warning("weights watcher: %s: %s", type(e).__name__, e)
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            consumer.close()
