"""Reading topics back in tests: a plain consumer with manual assignment, from the beginning."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition


def read_topic(bootstrap: str, topic: str, until, timeout_s: float = 60.0) -> list:
    """All records of `topic` from offset 0, polling until `until(records)` is true or the timeout."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        deadline = time.time() + timeout_s
        parts = None
        while not parts and time.time() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.2)
        assert parts, f"topic {topic} not found"
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        records: list = []
        while time.time() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            if until(records):
                break
        return records
    finally:
        consumer.close()
