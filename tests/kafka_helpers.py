"""Reading topics back in tests: a plain consumer with manual assignment, from the beginning."""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition

from tests.waiting import wait_until


def read_topic(bootstrap: str, topic: str, until, timeout_s: float = 60.0) -> list:
    """All records of `topic` from offset 0, polling until `until(records)` is true; AssertionError naming the
    topic after `timeout_s` (each wait)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        parts = wait_until(lambda: consumer.partitions_for_topic(topic), timeout_s, f"topic {topic}", 0.2)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        records: list = []

        def enough() -> bool:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            return until(records)

        wait_until(enough, timeout_s, f"the records wanted from {topic}", 0)
        return records
    finally:
        consumer.close()
