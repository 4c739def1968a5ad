"""Between serving and the trainer: the contract both sides agree on (feedback/contract/) and the pipeline that
carries votes — serving's outbox (outbox.py), the relay that publishes it to Kafka (relay.py, unconfirmed.py), the
trainer's consumer (consumer.py) — with the statistics both sides show (arena.py, sequential.py, canary.py,
loop_status.py). Imports nothing of serving, the trainer or duet/ (tests/test_layers.py)."""
