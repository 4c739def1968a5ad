"""Kafka topic names and their settings, in one place, and the idempotent `ensure_topics`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

FEEDBACK = "duet.feedback.v1"  # vote events (FeedbackEvent), keyed by comparison id
DEAD_LETTERS = "duet.feedback.dlq"  # messages a consumer could not decode or validate, with the reason
WEIGHTS = "duet.weights.v1"  # announcements of published policy versions


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
