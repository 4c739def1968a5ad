"""Kafka topic names and their settings, in one place, and the idempotent `ensure_topics`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

FEEDBACK = "duet.feedback.v1"  # vote events (FeedbackEvent), keyed by comparison id
DEAD_LETTERS = "duet.feedback.dlq"  # messages a consumer could not decode or validate, with the reason
WEIGHTS = "duet.weights.v1"  # announcements of published policy versions

PRODUCER_MAX_REQUEST_BYTES = 1_048_576  # kafka-python's max_request_size, which the relay's producer keeps
RECORD_OVERHEAD_BYTES = 1_024  # a record's key, event_id header and framing, besides its value


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(partitions: int) -> list[TopicSpec]:
    return [
        TopicSpec(FEEDBACK, partitions, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        TopicSpec(DEAD_LETTERS, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        # Every replica reads every announcement; one partition keeps them in order.
        TopicSpec(WEIGHTS, 1, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    ]


def ensure_topics(bootstrap: str, partitions: int = 3, replication: int = 1, min_insync: int | None = None,
                  timeout_ms: int = 10_000) -> list[str]:
    """Create Duet's topics if absent (a restarted in-memory broker has none). Returns those created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, client_id="duet-admin")
    try:
        existing = set(admin.list_topics())
        created = []
        for spec in topic_specs(partitions):
            if spec.name in existing:
                continue
            config = dict(spec.config)
            if min_insync:
                config["min.insync.replicas"] = str(min_insync)
            try:
                admin.create_topics([NewTopic(spec.name, spec.partitions, replication, topic_configs=config)])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        admin.close()


def message_limit(bootstrap: str, topic: str, timeout_ms: int = 5_000) -> int | None:
    """The topic's `max.message.bytes` as the broker reports it; None where it does not say (the embedded
    broker answers no DescribeConfigs) — callers then keep the producer's own limit."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # a broker that hangs up on the question is an answer here, not an error
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, client_id="duet-admin")
        try:
            responses = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, ["max.message.bytes"])])
        finally:
            admin.close()
            kafka_log.setLevel(level)
        for response in responses if isinstance(responses, list) else [responses]:
            for resource in response.resources:
                for entry in resource[4]:  # (name, value, read_only, ...)
                    if entry[0] == "max.message.bytes" and entry[1]:
                        return int(entry[1])
    except Exception as e:
        log.info("the broker did not say its message size limit (%s: %s)", type(e).__name__, e)
    finally:
        kafka_log.setLevel(level)
    return None


def vote_event_limit(bootstrap: str, topic: str) -> int:
    """The largest vote event (a record's value) the relay can publish: its producer's request limit or the
    topic's, whichever is lower, less the record's other bytes."""
    broker = message_limit(bootstrap, topic) or PRODUCER_MAX_REQUEST_BYTES
    return min(PRODUCER_MAX_REQUEST_BYTES, broker) - RECORD_OVERHEAD_BYTES
