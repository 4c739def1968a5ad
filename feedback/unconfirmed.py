"""Votes Kafka has acknowledged but no trainer checkpoint covers yet, kept in Redis so that a broker
that loses its log (the embedded one keeps it in memory) costs nothing: the relay publishes them again.

    relay:   outbox ──Kafka ack──▶ unconfirmed (with partition, offset)      `record_sent`
    trainer: checkpoint written ──▶ confirm the event ids it covers            `confirm_trained`
    relay:   broker log shorter than what it acknowledged ──▶ every unconfirmed vote back into the
             outbox, and the log epoch bumped so the trainer re-reads the new log from the start
                                                                               `requeue_all`

Redis layout:
    duet:outbox:unconfirmed        HASH  event_id → JSON {key, payload, partition, offset, accepted_ms}
    duet:outbox:unconfirmed:order  ZSET  event_id by accepted_ms (requeue order; retention)
    duet:outbox:trained            ZSET  event_id by time: confirmations that arrived before the relay
                                         recorded the send (ack → trainer read → checkpoint can beat it)
    duet:outbox:log-end            HASH  partition → next offset Kafka should hand out (what was acked),
                                         and "<partition>:first" → the first offset of the newest send there
    duet:feedback:log-epoch        STRING  bumped each time a lost log was detected; the trainer follows

Each step is one Lua script, so the relay and the trainer can interleave at any point: a vote is in
the outbox, or unconfirmed, or confirmed — never two of these, never none. The trainer de-duplicates
by event id, so re-publishing a vote it had already read costs nothing but a duplicate skip.
"""

from __future__ import annotations

import time

from feedback.contract.redis_keys import LOG_END, LOG_EPOCH, OUTBOX, TRAINED, UNCONFIRMED, UNCONFIRMED_ORDER
TRAINED_MARK_TTL_MS = 3_600_000  # a confirmation for a send never recorded (e.g. a test's producer)

_RECORD_SENT = """
-- ARGV: now_ms, keep (0/1), then (stream_id, partition, offset, accepted_ms) per acked entry
local keep = ARGV[2] == '1'
local sent_max, sent_min = {}, {}
for i = 3, #ARGV, 4 do
  local sid, part, off, acc = ARGV[i], ARGV[i+1], tonumber(ARGV[i+2]), ARGV[i+3]
  local entry = redis.call('XRANGE', KEYS[1], sid, sid)
  if #entry == 1 then
    local f = {}
    local kv = entry[1][2]
    for j = 1, #kv, 2 do f[kv[j]] = kv[j+1] end
    local eid = f['event_id']
    if redis.call('ZREM', KEYS[4], eid) == 0 and keep then
      redis.call('HSET', KEYS[2], eid, cjson.encode({key=f['key'], payload=f['payload'], partition=tonumber(part),
                                                     offset=off, accepted_ms=tonumber(acc)}))
      redis.call('ZADD', KEYS[3], acc, eid)
    end
    redis.call('XDEL', KEYS[1], sid)
  end
  -- offset -1: the broker had already written this record (a retry's duplicate): no offset to learn from
  if off >= 0 then
    if not sent_max[part] or off > sent_max[part] then sent_max[part] = off end
    if not sent_min[part] or off < sent_min[part] then sent_min[part] = off end
  end
end
for part, off in pairs(sent_max) do
  local cur = tonumber(redis.call('HGET', KEYS[5], part) or '-1')
  if off + 1 > cur then redis.call('HSET', KEYS[5], part, off + 1, part .. ':first', sent_min[part]) end
end
return 1
"""

_CONFIRM = """
-- ARGV: now_ms, event ids...
local now = tonumber(ARGV[1])
local gone = 0
for i = 2, #ARGV do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[i])
    gone = gone + 1
  else
    redis.call('ZADD', KEYS[3], now, ARGV[i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - %d)
return gone
""" % TRAINED_MARK_TTL_MS

_REQUEUE = """
-- every unconfirmed vote back into the outbox, oldest first; forget the lost log's end; bump the epoch
local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, eid in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], eid)
  if raw then
    local v = cjson.decode(raw)
    redis.call('XADD', KEYS[1], '*', 'event_id', eid, 'key', v['key'], 'payload', v['payload'],
               'accepted_ms', tostring(v['accepted_ms']))
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('INCR', KEYS[5])
return #ids
"""

_EXPIRE = """
-- ARGV: cutoff_ms: unconfirmed votes accepted before it are dropped (retention)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 10000)
for _, eid in ipairs(ids) do redis.call('HDEL', KEYS[1], eid) end
if #ids > 0 then redis.call('ZREM', KEYS[2], unpack(ids)) end
return #ids
"""


class Unconfirmed:
    """The relay's and the trainer's view of unconfirmed votes (sync Redis client, decode_responses)."""

    def __init__(self, redis_client) -> None:
        self.redis = redis_client
        self._record = redis_client.register_script(_RECORD_SENT)
        self._confirm = redis_client.register_script(_CONFIRM)
        self._requeue = redis_client.register_script(_REQUEUE)
        self._expire = redis_client.register_script(_EXPIRE)

    # --- relay ------------------------------------------------------------------------------------
    def record_sent(self, acked: list[tuple[str, int, int, int]], keep: bool) -> None:
        """Move acked outbox entries (stream id, partition, offset, accepted_ms) out of the outbox: into
        the unconfirmed set when `keep`, else nowhere (a durable, replicated Kafka needs no second copy)."""
        if not acked:
            return
        args: list = [int(time.time() * 1000), "1" if keep else "0"]
        for sid, partition, offset, accepted_ms in acked:
            args += [sid, partition, offset, accepted_ms]
        self._record(keys=[OUTBOX, UNCONFIRMED, UNCONFIRMED_ORDER, TRAINED, LOG_END], args=args)

    def log_end(self) -> dict[int, int]:
        """Per partition, the offset Kafka should hand out next, as far as the relay knows."""
        return {int(p): int(o) for p, o in self.redis.hgetall(LOG_END).items() if ":" not in p}

    def log_floor(self) -> dict[int, int]:
        """Per partition, the first offset of the newest send: a log whose end offset is not past it has
        lost that send. (Not the last offset: tansu reports the end as the last batch's base offset + 1.)"""
        return {int(p.split(":")[0]): int(o) for p, o in self.redis.hgetall(LOG_END).items() if ":" in p}

    def requeue_all(self) -> int:
        """The broker lost its log: put every unconfirmed vote back into the outbox (the relay sends
        them again), forget the lost log's offsets, and bump the log epoch. Returns how many."""
        return int(self._requeue(keys=[OUTBOX, UNCONFIRMED, UNCONFIRMED_ORDER, LOG_END, LOG_EPOCH]))

    def expire(self, keep_s: float) -> int:
        """Drop unconfirmed votes older than `keep_s` (no trainer confirmed them: none may be running)."""
        cutoff = int((time.time() - keep_s) * 1000)
        return int(self._expire(keys=[UNCONFIRMED, UNCONFIRMED_ORDER], args=[cutoff]))

    def stats(self) -> tuple[int, float]:
        """(count, age in seconds of the oldest) of unconfirmed votes."""
        first = self.redis.zrange(UNCONFIRMED_ORDER, 0, 0, withscores=True)
        age = max(0.0, time.time() - first[0][1] / 1000) if first else 0.0
        return self.redis.zcard(UNCONFIRMED_ORDER), age

    # --- trainer ----------------------------------------------------------------------------------
    def confirm_trained(self, event_ids: list[str]) -> int:
        """A trainer checkpoint covers these events (trained, held out, pending in it, or duplicates of
        such): the relay need not keep them any longer. Returns how many were unconfirmed until now."""
        if not event_ids:
            return 0
        return int(self._confirm(keys=[UNCONFIRMED, UNCONFIRMED_ORDER, TRAINED],
                                 args=[int(time.time() * 1000), *event_ids]))

    def epoch(self) -> int:
        return int(self.redis.get(LOG_EPOCH) or 0)
