"""Prometheus metrics of the vote pipeline (relay in serving, consumer in the trainer)."""

from prometheus_client import Counter, Gauge, Histogram

OUTBOX_DEPTH = Gauge("duet_outbox_depth", "Votes waiting in the Redis outbox for Kafka")
OUTBOX_OLDEST_AGE = Gauge("duet_outbox_oldest_age_seconds", "Age of the oldest vote still in the outbox")
RELAYED = Counter("duet_outbox_relayed_total", "Votes published to Kafka and removed from the outbox")
RELAY_DELAY = Histogram("duet_relay_delay_seconds", "Time from a vote entering the outbox to Kafka's ack",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
PRODUCE_LATENCY = Histogram("duet_produce_latency_seconds", "Time to send and flush one relay batch",
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 20))
PRODUCE_ERRORS = Counter("duet_produce_errors_total", "Relay failures (broker down, timeouts)", ["error"])
CONSUMED = Counter("duet_feedback_consumed_total", "Vote events decoded and handed to the trainer")
DUPLICATES = Counter("duet_feedback_duplicates_total", "Vote events dropped as already seen (by event_id)")
DEAD_LETTERED = Counter("duet_feedback_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"])
