"""Duet's Redis layout: every key serving, the relay and the trainer share, in one place. The modules that read and
write them (named beside each) hold the scripts and the rules; this is the map. All keys start with `duet:`, so a
Redis shared with other applications needs only that prefix reserved (or its own database index)."""

from __future__ import annotations

import time

# --- serving's own ----------------------------------------------------------------------------------------------
APIKEY_PREFIX = "duet:apikey:"  # HASH per API key (by hash): its record (serving/auth.py)
COMPARISON_PREFIX = "duet:cmp:"  # STRING, JSON of a PendingComparison, TTL DUET_COMPARISON_TTL_S (comparisons.py)
RATE_LIMIT_PREFIX = "duet:ratelimit:"  # counter per key and minute (serving/rate_limit.py)

# --- the vote outbox and its relay (feedback/outbox.py, feedback/relay.py, feedback/unconfirmed.py) ---------------
OUTBOX = "duet:outbox"  # STREAM of votes waiting for Kafka
RELAY_LOCK = "duet:outbox:relay-lock"  # which relay publishes (one at a time)
DEAD_VOTES = "duet:outbox:dead"  # STREAM of votes the broker refused for good, with the reason
VOTE_LIMIT = "duet:outbox:max-bytes"  # the largest vote event the broker takes, as the relay read it
UNCONFIRMED = "duet:outbox:unconfirmed"  # HASH event id -> record: acknowledged, not yet in a trainer checkpoint
UNCONFIRMED_ORDER = "duet:outbox:unconfirmed:order"  # ZSET of those by time
TRAINED = "duet:outbox:trained"  # event ids a checkpoint covers (confirmed)
LOG_END = "duet:outbox:log-end"  # the feedback log's end offsets as the relay last saw them
LOG_EPOCH = "duet:feedback:log-epoch"  # bumped when the broker lost its log: the trainer re-reads from 0

# --- users' canary tests (feedback/canary.py) ------------------------------------------------------------------
CANARY = "duet:canary"  # the running test
CANARY_VOTES = "duet:canary:votes"  # cross-version vote ids counted in it
CANARY_HISTORY = "duet:canary:history"  # decided tests, newest first

# --- the dashboard's loop status (feedback/loop_status.py) ---------------------------------------------------------
REWARD_MODEL = "duet:loop:reward_model"  # STREAMs
ROUNDS = "duet:loop:rounds"
SWAPS = "duet:loop:swaps"
BATTLES = "duet:loop:battles"
BACKLOG = "duet:loop:backlog"  # STRING, TTL 60 s: votes consumed but not trained


def comparison_key(comparison_id: str) -> str:
    return f"{COMPARISON_PREFIX}{comparison_id}"


def voted_key(record_id: str) -> str:
    """Marks a comparison (or single answer) voted on: a vote's idempotency and its one answer (outbox.py)."""
    return f"duet:voted:{record_id}"


def vote_cap_key(now: float, who: str) -> str:
    """Votes counted against a daily cap (UTC day), per API key or per end user (outbox.py)."""
    return f"duet:votecap:{time.strftime('%Y%m%d', time.gmtime(now))}:{who}"


def vote_stats_day_key(day: int) -> str:
    """Votes per hour of one UTC day (days since the epoch), for the dashboard (loop_status.py)."""
    return f"duet:stats:votes:{day}"


def rate_limit_key(key_id: str, window: int) -> str:
    return f"{RATE_LIMIT_PREFIX}{key_id}:{window}"
