"""Per-key request rate limit: a fixed one-minute window counted in Redis (shared by all replicas)."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from feedback.contract.redis_keys import rate_limit_key
from serving.errors import APIError
from serving.redis_health import RedisBreaker

WINDOW_S = 60
# One round trip: count the request and make sure the window's key expires.
_INCR_WITH_EXPIRY = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RateLimiter:
    def __init__(self, redis: Redis, default_rpm: int, breaker: RedisBreaker | None = None) -> None:
        self.redis = redis
        self.breaker = breaker or RedisBreaker()
        self.default_rpm = default_rpm
        self._incr = redis.register_script(_INCR_WITH_EXPIRY)

    async def check(self, key_id: str, rpm: int | None) -> None:
        limit = rpm or self.default_rpm
        now = time.time()
        window = int(now // WINDOW_S)
        if self.breaker.tripped():
            return  # not counted while Redis is away: answering beats refusing everyone
        try:
            count = await self._incr(keys=[rate_limit_key(key_id, window)], args=[WINDOW_S * 2])
        except RedisError as e:
            self.breaker.trip(e)
            return
        if count > limit:
            retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
            raise APIError(
                429,
                f"Rate limit reached: {limit} requests per minute for this API key. Retry in {retry_after} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
