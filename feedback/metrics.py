"""Prometheus metrics of the vote pipeline seen from serving (outbox) and the trainer (consumer)."""

from prometheus_client import Counter, Gauge

OUTBOX_DEPTH = Gauge("duet_outbox_depth", "Votes waiting in the Redis outbox for Kafka")
OUTBOX_OLDEST_AGE = Gauge("duet_outbox_oldest_age_seconds", "Age of the oldest vote still in the outbox")
CONSUMED = Counter("duet_feedback_consumed_total", "Vote events decoded and handed to the trainer")
DUPLICATES = Counter("duet_feedback_duplicates_total", "Vote events dropped as already seen (by event_id)")
DEAD_LETTERED = Counter("duet_feedback_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"])
