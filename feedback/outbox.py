"""The vote outbox: a Redis stream that makes a vote durable before it is acknowledged, and the relay
that publishes it to Kafka.

Redis layout (besides `duet:cmp:*`, see feedback/contract/comparisons.py):
    duet:voted:{comparison_id}   STRING "event_id\\nidempotency_key"; TTL: the comparison's remaining life
    duet:voted:{comparison_id}:edit   the same for the record's one edit
    duet:outbox                  STREAM, fields event_id, key (Kafka key), payload (FeedbackEvent JSON)
    duet:outbox:relay-lock       STRING, lease held by the one relay publishing (several replicas may run)
    duet:outbox:max-bytes        STRING, the largest vote event the broker takes (written by the relay on connect
                                 from the topic's max.message.bytes and its producer's max_request_size)
    duet:outbox:dead             STREAM, entries the broker refused for good (e.g. larger than its message
                                 limit): the entry's fields plus `reason` and `outbox_id`; kept, not retried
    duet:stats:votes:{day}       HASH, votes per minute and choice for the dashboard (feedback/loop_status.py)
    duet:votecap:{day}:{who}     STRING, votes accepted today from one API key ("key:<id>") or one end user
                                 ("user:<sha256 of the OpenAI `user` field>"); expires after two days

`record_vote` is one Lua script: it checks the comparison still exists, that it has no vote, that
the outbox has room, that the event is no larger than the broker takes (DUET_VOTE_MAX_BYTES, or the
relay's reading of the broker if lower) and that neither the key nor the end user has reached today's vote cap, then marks
it voted, counts it against both caps and appends the event — all or nothing, so two concurrent votes
can never both pass, a cap is never overshot, and an acknowledged vote is always in the outbox.
The relay (feedback/relay.py) sends entries in stream order and deletes each only after Kafka
acknowledged it (acks=all): delivery is at-least-once, consumers de-duplicate by event_id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from feedback.contract.redis_keys import (DEAD_VOTES, OUTBOX, RELAY_LOCK, VOTE_LIMIT, comparison_key,  # noqa: F401
                                         vote_cap_key, voted_key)
from feedback.loop_status import VOTE_STATS_TTL_S, vote_stats_field, vote_stats_key

DEAD_VOTES_MAX = 100_000  # the dead stream is trimmed to about this many entries


_RECORD_VOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local prev = redis.call('GET', KEYS[2])
if prev then return {'voted', prev} end
local limit = tonumber(ARGV[10])
local broker = tonumber(redis.call('GET', KEYS[7]) or ARGV[10])
if broker < limit then limit = broker end
if string.len(ARGV[2]) > limit then return {'too_large', tostring(limit)} end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[4]) then return {'full'} end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[8]) then return {'capped', 'key'} end
if KEYS[6] ~= '' and tonumber(redis.call('GET', KEYS[6]) or '0') >= tonumber(ARGV[9]) then return {'capped', 'user'} end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 1 then ttl = 1 end
redis.call('SET', KEYS[2], ARGV[1] .. '\\n' .. ARGV[3], 'EX', ttl + 3600)
redis.call('XADD', KEYS[3], '*', 'event_id', ARGV[1], 'key', ARGV[5], 'payload', ARGV[2])
redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
redis.call('EXPIRE', KEYS[4], ARGV[7])
for i = 5, 6 do
  if KEYS[i] ~= '' then
    redis.call('INCR', KEYS[i])
    redis.call('EXPIRE', KEYS[i], 172800)
  end
end
return {'ok'}
"""


@dataclass
class VoteResult:
    status: Literal["ok", "gone", "voted", "full", "capped", "too_large"]
    event_id: str | None = None  # for "voted": the event id of the earlier vote
    idempotency_key: str | None = None  # for "voted": the key the earlier vote came with
    capped: Literal["key", "user"] | None = None  # for "capped": whose daily cap was reached
    limit: int | None = None  # for "too_large": the most bytes a vote event may have


class Outbox:
    """The vote side: used by serving's votes API (async Redis client)."""

    def __init__(self, redis_client, max_entries: int, cap_per_key: int = 10**9, cap_per_user: int = 10**9,
                 max_bytes: int = 1_000_000) -> None:
        self.redis = redis_client
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # DUET_VOTE_MAX_BYTES; the relay's reading of the broker may lower it
        self.cap_per_key = cap_per_key
        self.cap_per_user = cap_per_user
        self._script = redis_client.register_script(_RECORD_VOTE)

    async def record_vote(self, record_id: str, event_id: str, payload: str, idempotency_key: str = "",
                          choice: str = "unknown", mark_id: str | None = None, key_id: str = "",
                          user_hash: str | None = None) -> VoteResult:
        """`mark_id` (default `record_id`) names the one-per-record mark: a verdict and an edit have their own.
        `key_id` and `user_hash` are counted against the daily caps (DUET_VOTE_CAP_PER_KEY / _PER_USER)."""
        now = time.time()
        res = await self._script(keys=[comparison_key(record_id), voted_key(mark_id or record_id), OUTBOX,
                                       vote_stats_key(now), vote_cap_key(now, f"key:{key_id}"),
                                       vote_cap_key(now, f"user:{user_hash}") if user_hash else "", VOTE_LIMIT],
                                 args=[event_id, payload, idempotency_key, self.max_entries, record_id,
                                       vote_stats_field(now, choice), VOTE_STATS_TTL_S, self.cap_per_key,
                                       self.cap_per_user, self.max_bytes])
        status = res[0]
        if status == "too_large":
            return VoteResult("too_large", limit=int(res[1]))
        if status == "capped":
            return VoteResult("capped", capped=res[1])
        if status == "voted":
            prev_event, _, prev_key = res[1].partition("\n")
            return VoteResult("voted", prev_event, prev_key or None)
        return VoteResult(status, event_id if status == "ok" else None)

    async def earlier_vote(self, mark_id: str) -> tuple[str, str | None] | None:
        """(event id, idempotency key) of the vote already recorded under `mark_id`; None if none. The mark
        outlives its comparison by an hour, so a retry can still be recognised after the comparison expired."""
        prev = await self.redis.get(voted_key(mark_id))
        if not prev:
            return None
        event_id, _, key = prev.partition("\n")
        return event_id, key or None

    async def depth(self) -> int:
        return await self.redis.xlen(OUTBOX)


def stream_id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def outbox_stats(r) -> tuple[int, float]:
    """(depth, age in seconds of the oldest entry). Works with a sync client; see `async_outbox_stats`."""
    first = r.xrange(OUTBOX, count=1)
    return r.xlen(OUTBOX), (max(0.0, time.time() - stream_id_ms(first[0][0]) / 1000) if first else 0.0)


async def async_outbox_stats(r) -> tuple[int, float]:
    first = await r.xrange(OUTBOX, count=1)
    return await r.xlen(OUTBOX), (max(0.0, time.time() - stream_id_ms(first[0][0]) / 1000) if first else 0.0)


def dead_letter(r, entry_id: str, fields: dict, reason: str) -> None:
    """Move one outbox entry to the dead stream, with why, in one transaction (a sync client): the relay
    goes on with the entries after it, and the vote stays readable for an operator."""
    pipe = r.pipeline(transaction=True)
    pipe.xadd(DEAD_VOTES, {**fields, "outbox_id": entry_id, "reason": reason[:500]}, maxlen=DEAD_VOTES_MAX,
              approximate=True)
    pipe.xdel(OUTBOX, entry_id)
    pipe.execute()
