"""The outbox relay: publishes the Redis outbox (feedback/outbox.py) to Kafka, moving each entry out
of the outbox only once Kafka acknowledged it — into the unconfirmed set (feedback/unconfirmed.py)
until a trainer checkpoint covers it, so that a broker that loses its log loses no vote: when the
relay sees the log shorter than what Kafka acknowledged (an ack at a lower offset, or end offsets that
went down), it sends every unconfirmed vote again. Runs as `duet relay` (a child of serving by
default) or a thread."""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from feedback import metrics
from feedback.outbox import DEAD_VOTES, OUTBOX, RELAY_LOCK, VOTE_LIMIT, dead_letter, outbox_stats, stream_id_ms
from feedback.relay_metrics import (DEAD_LETTERED, LOG_LOSSES, PRODUCE_ERRORS, PRODUCE_LATENCY, RELAY_DELAY, RELAYED,
                                    REPUBLISHED, UNCONFIRMED_AGE, UNCONFIRMED_DEPTH)
from feedback.contract.topics import FEEDBACK, ensure_topics, vote_event_limit
from feedback.unconfirmed import Unconfirmed

log = logging.getLogger(__name__)


def _refused_for_good() -> tuple[type[Exception], ...]:
    """Errors about one record that no retry can cure (kafka-python's names; the broker's
    MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE, CORRUPT_MESSAGE and INVALID_RECORD)."""
    from kafka import errors

    names = ("MessageSizeTooLargeError", "RecordListTooLargeError", "CorruptRecordError", "CorruptRecordException",
             "InvalidRecordError", "InvalidRecordException")
    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


REFUSED_FOR_GOOD = _refused_for_good()


class OutboxRelay:
    """Publishes the outbox to Kafka from a thread of its own (kafka-python is blocking; the event
    loop never waits on it). Survives broker outages: on any error it drops the producer, backs off,
    and on reconnect re-creates the topics (an in-memory broker comes back empty) and resends."""

    def __init__(self, redis_url: str, bootstrap: str, *, topic: str = FEEDBACK, batch: int = 500,
                 partitions: int = 3, replication: int = 1, min_insync: int | None = None,
                 lock_ttl_ms: int = 10_000, keep_s: float = 7 * 24 * 3600, log_check_s: float = 2.0) -> None:
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.batch = batch
        self.partitions, self.replication, self.min_insync = partitions, replication, min_insync
        self.lock_ttl_ms = lock_ttl_ms
        # How long acknowledged votes wait for a trainer's confirmation (0: not at all — for a durable,
        # replicated Kafka that cannot lose an acknowledged write).
        self.keep_s = keep_s
        self.log_check_s = log_check_s
        self.unconfirmed = Unconfirmed(self.redis)
        self._offsets = None  # a group-less consumer, only to read end offsets
        self._checked = 0.0
        self._expired = 0.0
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{id(self)}"
        self._producer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> OutboxRelay:
        self._thread = threading.Thread(target=self._run, name="duet-outbox-relay", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Serving's once-a-second look (serving/runtime.py `Relay`): a thread that died is started again."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            log.warning("outbox relay thread died; starting it again")
            self.start()

    def run_forever(self) -> None:
        """Run in the calling thread until SIGTERM/SIGINT (the `duet relay` process)."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self._run()
        finally:
            self._close_producer()
            self.redis.close()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self._close_producer()
        self.redis.close()

    # --- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        observed = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - observed > 1.0:
                    self._observe_outbox()
                    observed = time.monotonic()
                if not self._hold_lock():
                    self._stop.wait(1.0)
                    continue
                sent = self.drain_once()
                if sent == 0 and self.keep_s and time.monotonic() - self._checked > self.log_check_s:
                    self.check_log()  # idle: nothing would reveal a lost log but a look at it
                backoff = 0.2
                if sent == 0:
                    # Wake as soon as a new vote arrives (or after 200 ms to refresh gauges and the lock).
                    self.redis.xread({OUTBOX: "$"}, block=200, count=1)
                elif sent < self.batch:
                    # Under steady load, let a batch build up: fewer, larger sends cost far less CPU
                    # (and GIL time taken from the API) for at most 20 ms more delay.
                    self._stop.wait(0.02)
            except Exception as e:  # broker or Redis down: keep everything, retry with backoff
                PRODUCE_ERRORS.labels(error=type(e).__name__).inc()
                log.warning("outbox relay: %s: %s; retrying in %.1f s", type(e).__name__, e, backoff)
                self._close_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _hold_lock(self) -> bool:
        """A lease so that one relay publishes at a time when several serving replicas share Redis."""
        if self.redis.set(RELAY_LOCK, self.owner, nx=True, px=self.lock_ttl_ms):
            return True
        if self.redis.get(RELAY_LOCK) == self.owner:
            self.redis.pexpire(RELAY_LOCK, self.lock_ttl_ms)
            return True
        return False

    def _observe_outbox(self) -> None:
        depth, age = outbox_stats(self.redis)
        metrics.OUTBOX_DEPTH.set(depth)
        metrics.OUTBOX_OLDEST_AGE.set(age)
        count, oldest = self.unconfirmed.stats()
        UNCONFIRMED_DEPTH.set(count)
        UNCONFIRMED_AGE.set(oldest)
        if self.keep_s and time.monotonic() - self._expired > 60:
            if dropped := self.unconfirmed.expire(self.keep_s):
                log.warning("dropped %d votes no trainer confirmed within %.0f s (DUET_OUTBOX_KEEP_S)",
                            dropped, self.keep_s)
            self._expired = time.monotonic()

    def _producer_or_connect(self):
        if self._producer is None:
            from kafka import KafkaProducer

            ensure_topics(self.bootstrap, self.partitions, self.replication, self.min_insync)
            # what the API may accept from now on (serving's vote script reads it): never more than we can send
            self.redis.set(VOTE_LIMIT, vote_event_limit(self.bootstrap, self.topic))
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap, client_id="duet-outbox-relay",
                acks="all", enable_idempotence=True, retries=10, linger_ms=5, compression_type="gzip",
                max_block_ms=5_000, request_timeout_ms=5_000, delivery_timeout_ms=15_000,
            )
        return self._producer

    def _close_producer(self) -> None:
        try:
            if self._producer is not None:
                self._producer.close(timeout=1)
            if self._offsets is not None:
                self._offsets.close()
        except Exception:
            pass
        self._producer = self._offsets = None

    # --- a lost log -----------------------------------------------------------------------
    def check_log(self) -> bool:
        """Compare the topic's end offsets with what Kafka acknowledged; True if the log was lost
        (and every unconfirmed vote is back in the outbox)."""
        self._checked = time.monotonic()
        floor = self.unconfirmed.log_floor()
        if not floor:
            return False
        if self._offsets is None:
            from kafka import KafkaConsumer

            self._offsets = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, request_timeout_ms=5_000,
                                          client_id="duet-outbox-relay-offsets", metadata_max_age_ms=1_000)
        from kafka import TopicPartition

        # a partition the log no longer has counts as empty (a new broker may create the topic anew)
        have = self._offsets.partitions_for_topic(self.topic) or set()
        ends = self._offsets.end_offsets([TopicPartition(self.topic, p) for p in floor if p in have])
        now = {p: 0 for p in floor} | {tp.partition: end for tp, end in ends.items()}
        if all(now[p] > first for p, first in floor.items()):
            return False
        self._log_lost(f"end offsets {now}, last sends began at {floor}")
        return True

    def _log_lost(self, evidence: str) -> None:
        n = self.unconfirmed.requeue_all()
        LOG_LOSSES.inc()
        REPUBLISHED.inc(n)
        log.warning("the broker lost the feedback log (%s): sending %d unconfirmed votes again", evidence, n)

    def drain_once(self) -> int:
        """Send up to `batch` outbox entries; move those Kafka acknowledged out of the outbox, and those it
        refused for good to the dead stream. Returns how many left the outbox."""
        entries = self.redis.xrange(OUTBOX, count=self.batch)
        if not entries:
            return 0
        producer = self._producer_or_connect()
        t0 = time.perf_counter()
        futures, dead = [], 0
        for entry_id, f in entries:
            try:
                futures.append((entry_id, f, producer.send(self.topic, key=f["key"].encode(),
                                                           value=f["payload"].encode(),
                                                           headers=[("event_id", f["event_id"].encode())])))
            except REFUSED_FOR_GOOD as e:  # over the producer's max_request_size: refused before sending
                dead += self._dead_letter(entry_id, f, e)
        producer.flush(timeout=20)
        for entry_id, f, fut in futures:  # refused by the broker (e.g. over its max.message.bytes)
            if fut.is_done and fut.failed() and isinstance(fut.exception, REFUSED_FOR_GOOD):
                dead += self._dead_letter(entry_id, f, fut.exception)
        futures = [(i, f, fut) for i, f, fut in futures if not isinstance(fut.exception, REFUSED_FOR_GOOD)]
        acked = [(entry_id, fut.value.partition, fut.value.offset,
                  int(f.get("accepted_ms") or stream_id_ms(entry_id)))
                 for entry_id, f, fut in futures if fut.is_done and fut.succeeded()]
        if acked:
            known = self.unconfirmed.log_end() if self.keep_s else {}
            # Kafka handed out an offset it had handed out before: a new log. (Offset -1 is no such sign: a
            # retried send the broker had already written — e.g. after it froze — is acked without an offset.)
            if lower := [(p, o) for _, p, o, _ in acked if 0 <= o < known.get(p, 0)]:
                self._log_lost(f"acks at {lower[:3]} below the acknowledged end {known}")
            self.unconfirmed.record_sent(acked, keep=self.keep_s > 0)
            now = time.time()
            for *_, accepted_ms in acked:
                RELAY_DELAY.observe(max(0.0, now - accepted_ms / 1000))
            RELAYED.inc(len(acked))
        PRODUCE_LATENCY.observe(time.perf_counter() - t0)
        failed = next((fut.exception for *_, fut in futures if fut.is_done and fut.failed()), None)
        if len(acked) < len(futures):
            raise failed or TimeoutError(f"{len(futures) - len(acked)} outbox entries not acknowledged")
        return len(acked) + dead

    def _dead_letter(self, entry_id: str, fields: dict, error: Exception) -> int:
        """One entry the broker will never take must not stop every vote behind it (the relay sends in
        stream order and retries what failed): it moves to the dead stream, counted and logged."""
        reason = f"{type(error).__name__}: {error}"
        dead_letter(self.redis, entry_id, fields, reason)
        DEAD_LETTERED.labels(error=type(error).__name__).inc()
        log.error("outbox entry %s (event %s, %d bytes) refused by the broker for good, moved to %s: %s",
                  entry_id, fields.get("event_id"), len(fields.get("payload", "")), DEAD_VOTES, reason)
        return 1
