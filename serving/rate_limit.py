"""Per-key request rate limit: a fixed one-minute window counted in Redis (shared by all replicas)."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from serving.errors import APIError

WINDOW_S = 60


class RateLimiter:
    def __init__(self, redis: Redis, default_rpm: int) -> None:
        self.redis = redis
        self.default_rpm = default_rpm

    async def check(self, key_id: str, rpm: int | None) -> None:
        limit = rpm or self.default_rpm
        now = time.time()
        window = int(now // WINDOW_S)
        key = f"duet:ratelimit:{key_id}:{window}"
        async with self.redis.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incr(key).expire(key, WINDOW_S * 2).execute()
        if count > limit:
            retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
            raise APIError(
                429,
                f"Rate limit reached: {limit} requests per minute for this API key. Retry in {retry_after} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
