"""Daily vote caps per API key and per end user, enforced inside the vote script on a real Redis."""

import asyncio
import json

import redis.asyncio as aioredis

from feedback.contract.comparisons import comparison_key
from feedback.outbox import OUTBOX, Outbox

CAPS_REDIS = "redis://127.0.0.1:6379/15"  # not the session server's database


def test_caps_per_key_and_per_user_are_exact_under_concurrency():
    async def go():
        r = aioredis.from_url(CAPS_REDIS, decode_responses=True)
        await r.flushdb()
        try:
            outbox = Outbox(r, max_entries=1000, cap_per_key=10, cap_per_user=3)
            for i in range(40):
                await r.set(comparison_key(f"cmp_{i}"), json.dumps({"x": i}), ex=600)

            async def vote(i: int, key: str, user: str | None):
                return await outbox.record_vote(f"cmp_{i}", f"ev{i}", "{}", key_id=key, user_hash=user)

            # one user through one key: 3 pass, however many race
            first = await asyncio.gather(*(vote(i, "k1", "u1") for i in range(8)))
            assert sum(v.status == "ok" for v in first) == 3
            assert {v.capped for v in first if v.status != "ok"} == {"user"}
            # other users (and votes without a user) through the same key: the key's cap of 10 holds
            more = await asyncio.gather(*(vote(i, "k1", f"u{i}" if i % 2 else None) for i in range(8, 30)))
            assert sum(v.status == "ok" for v in more) == 7
            assert {v.capped for v in more if v.status != "ok"} == {"key"}
            # another key is counted apart
            assert (await vote(30, "k2", None)).status == "ok"
            assert await r.xlen(OUTBOX) == 11  # only accepted votes are in the outbox
            # a retry of an accepted vote is still recognised as one (idempotency), cap or not
            accepted = next(i for i, v in enumerate(first) if v.status == "ok")
            assert (await vote(accepted, "k1", "u1")).status == "voted"
        finally:
            await r.flushdb()
            await r.aclose()

    asyncio.run(go())
