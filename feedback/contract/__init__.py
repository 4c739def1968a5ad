"""The contract between serving and the trainer: what both sides agree on, and the few small functions that apply
it — the vote and comparison schemas (events.py, comparisons.py), the Kafka topics and their limits (topics.py,
with the idempotent `ensure_topics`), the Redis layout (redis_keys.py), the registry's layout and manifest with its
probe log-probs (registry.py, probes.py; the atomic publish), and the rollout exchange (rollouts.py). It imports
nothing of Duet but itself (tests/test_layers.py); the pipeline that carries votes (feedback/*) and both sides
build on it."""
