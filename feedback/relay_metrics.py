"""Metrics of the outbox relay, registered only in the process that runs it (`duet relay`, or serving
with DUET_RELAY=thread) so no other process exports them as zeros."""

from prometheus_client import Counter, Gauge, Histogram

RELAYED = Counter("duet_outbox_relayed_total", "Votes published to Kafka and removed from the outbox")
RELAY_DELAY = Histogram("duet_relay_delay_seconds", "Time from a vote entering the outbox to Kafka's ack",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
PRODUCE_LATENCY = Histogram("duet_produce_latency_seconds", "Time to send and flush one relay batch",
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 20))
PRODUCE_ERRORS = Counter("duet_produce_errors_total", "Relay failures (broker down, timeouts)", ["error"])
UNCONFIRMED_DEPTH = Gauge("duet_outbox_unconfirmed", "Votes Kafka acknowledged that no trainer checkpoint covers yet "
                          "(kept to be sent again if the broker loses its log)")
UNCONFIRMED_AGE = Gauge("duet_outbox_unconfirmed_oldest_age_seconds", "Age of the oldest unconfirmed vote")
LOG_LOSSES = Counter("duet_feedback_log_losses_total", "Times the relay found the broker had lost acknowledged votes")
REPUBLISHED = Counter("duet_outbox_republished_total", "Unconfirmed votes sent again after a lost log")
DEAD_LETTERED = Counter("duet_outbox_dead_lettered_total", "Outbox entries the broker refused for good (moved to "
                        "duet:outbox:dead instead of blocking the votes behind them)", ["error"])
