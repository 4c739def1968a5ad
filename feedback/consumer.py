"""Consumer helper for the trainer: a consumer group with manual offsets that yields validated,
de-duplicated FeedbackEvents and sends anything it cannot use to the dead-letter topic."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from feedback import metrics
from feedback.events import SCHEMA_MAJOR, FeedbackEvent, schema_major
from feedback.topics import DEAD_LETTERS, FEEDBACK

log = logging.getLogger(__name__)


@dataclass
class Delivered:
    event: FeedbackEvent
    partition: int
    offset: int


class PoisonMessage(ValueError):
    """A message no consumer can use. `code` is a short label (metrics); the message is the full reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


def decode_event(value: bytes | None) -> FeedbackEvent:
    if value is None:
        raise PoisonMessage("empty", "message has no value")
    try:
        raw = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoisonMessage("not_json", str(e)) from None
    if not isinstance(raw, dict):
        raise PoisonMessage("not_json", "not a JSON object")
    try:
        major = schema_major(raw)
    except ValueError:
        raise PoisonMessage("bad_schema_version", repr(raw.get("schema_version"))) from None
    if major != SCHEMA_MAJOR:
        raise PoisonMessage("unknown_major", f"schema major version {major}; this consumer reads {SCHEMA_MAJOR}")
    try:
        return FeedbackEvent.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise PoisonMessage("invalid", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class SeenIds:
    """Bounded memory of delivered event ids (oldest forgotten first); the trainer persists it."""

    def __init__(self, capacity: int = 200_000, ids: list[str] | None = None) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict((i, None) for i in (ids or [])[-capacity:])

    def add(self, event_id: str) -> bool:
        """True if new."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def to_list(self) -> list[str]:
        return list(self._ids)


class FeedbackConsumer:
    def __init__(self, bootstrap: str, group_id: str, *, topic: str = FEEDBACK,
                 start_offsets: dict[int, int] | None = None, seen: SeenIds | None = None,
                 client_id: str = "duet-trainer") -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        self.topic = topic
        self.seen = seen or SeenIds()
        self.start_offsets = dict(start_offsets or {})
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=10_000, heartbeat_interval_ms=1_000,
            max_poll_records=500,
            # a policy round between polls can take minutes on a CPU: don't get evicted from the group
            max_poll_interval_ms=3_600_000,
        )
        self.dlq = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, retries=10,
                                 client_id=client_id + "-dlq")
        outer = self

        class _SeekOnAssign(ConsumerRebalanceListener):
            # Offsets stored in the trainer's checkpoint win over the group's committed ones.
            def on_partitions_assigned(self, assigned):
                from kafka import TopicPartition

                for tp in assigned:
                    if tp.partition in outer.start_offsets:
                        outer.consumer.seek(TopicPartition(outer.topic, tp.partition),
                                            outer.start_offsets[tp.partition])

            def on_partitions_revoked(self, revoked):
                pass

        self.consumer.subscribe([topic], listener=_SeekOnAssign())

    def poll(self, timeout_ms: int = 1000, max_records: int = 500) -> list[Delivered]:
        out: list[Delivered] = []
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        for tp, messages in batches.items():
            for m in messages:
                try:
                    event = decode_event(m.value)
                except PoisonMessage as e:
                    self._dead_letter(m, e)
                    continue
                if not self.seen.add(event.event_id):
                    metrics.DUPLICATES.inc()
                    continue
                metrics.CONSUMED.inc()
                out.append(Delivered(event, tp.partition, m.offset))
        return out

    def _dead_letter(self, m, poison: PoisonMessage) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s", m.topic, m.partition, m.offset, poison)
        headers = [("reason", str(poison).encode()), ("source_topic", m.topic.encode()),
                   ("source_partition", str(m.partition).encode()), ("source_offset", str(m.offset).encode())]
        # Wait for the ack: a poison message is skipped only once it is safely parked.
        self.dlq.send(DEAD_LETTERS, key=m.key, value=m.value or b"", headers=headers).get(timeout=30)
        metrics.DEAD_LETTERED.labels(reason=poison.code).inc()

    def positions(self) -> dict[int, int]:
        """Next offset to read, per assigned partition (what a checkpoint stores)."""
        from kafka import TopicPartition

        return {tp.partition: self.consumer.position(tp) for tp in self.consumer.assignment()
                if isinstance(tp, TopicPartition)}

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit next-offsets to the group (for lag monitoring; the checkpoint is the source of truth)."""
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})

    def close(self) -> None:
        # No autocommit (offsets are committed after checkpoints) and bounded waits: closing must
        # not hang when the broker is already gone.
        self.consumer.close(autocommit=False, timeout_ms=5_000)
        self.dlq.close(timeout=5)
