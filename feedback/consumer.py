"""Consumer helper for the trainer: reads every partition with manual offsets and yields validated,
de-duplicated FeedbackEvents; anything it cannot use goes to the dead-letter topic."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from feedback import metrics
from feedback.contract.events import SCHEMA_MAJOR, FeedbackEvent, schema_major
from feedback.contract.topics import DEAD_LETTERS, FEEDBACK

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
    """Reads every partition of the topic by manual assignment, not group membership: a single trainer
    gains nothing from rebalances, and a group outlives no broker restart (the embedded broker forgets
    its members: "member_id was not recognized", commits failing, nothing consumed until a restart).
    `group_id` is used only to commit offsets for lag monitoring; the trainer's checkpoint holds the
    offsets that count."""

    def __init__(self, bootstrap: str, group_id: str, *, topic: str = FEEDBACK,
                 start_offsets: dict[int, int] | None = None, seen: SeenIds | None = None,
                 client_id: str = "duet-trainer") -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.topic = topic
        self.seen = seen or SeenIds()
        self.start_offsets = dict(start_offsets or {})
        self.delivered_ids: list[str] = []  # every event id read since `take_delivered` (duplicates too)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id, enable_auto_commit=False,
            # a restarted broker may hold a shorter log than our position: read it from the start
            # (duplicates are skipped by event id)
            auto_offset_reset="earliest", max_poll_records=500,
            metadata_max_age_ms=5_000,  # notice partitions a new broker created within seconds
        )
        self.dlq = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, retries=10,
                                 client_id=client_id + "-dlq")
        self._partitions_checked = 0.0
        self._assign_new_partitions()

    def _assign_new_partitions(self) -> None:
        from kafka import TopicPartition

        self._partitions_checked = time.monotonic()
        found = self.consumer.partitions_for_topic(self.topic) or set()
        have = {tp.partition for tp in self.consumer.assignment()}
        if found <= have:
            return
        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(found | have)])
        for p in sorted(found - have):
            tp = TopicPartition(self.topic, p)
            if p in self.start_offsets:  # the checkpoint's offset, not the group's committed one
                self.consumer.seek(tp, self.start_offsets[p])
            else:
                self.consumer.seek_to_beginning(tp)

    def read_from_start(self) -> None:
        """The broker lost its log and another now begins: read every partition of it from offset 0."""
        self.start_offsets = {}
        self._assign_new_partitions()
        if self.consumer.assignment():
            self.consumer.seek_to_beginning(*self.consumer.assignment())

    def take_delivered(self) -> list[str]:
        """Event ids read since the last call (new, duplicate or dead-lettered): what a checkpoint covers."""
        ids, self.delivered_ids = self.delivered_ids, []
        return ids

    def poll(self, timeout_ms: int = 1000, max_records: int = 500) -> list[Delivered]:
        out: list[Delivered] = []
        if time.monotonic() - self._partitions_checked > 5.0:
            self._assign_new_partitions()
        if not self.consumer.assignment():  # no topic yet
            time.sleep(timeout_ms / 1000)
            return out
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        for tp, messages in batches.items():
            for m in messages:
                try:
                    event = decode_event(m.value)
                except PoisonMessage as e:
                    self._dead_letter(m, e)
                    header_id = dict(m.headers or []).get("event_id")
                    if header_id:
                        self.delivered_ids.append(header_id.decode(errors="replace"))
                    continue
                self.delivered_ids.append(event.event_id)
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
