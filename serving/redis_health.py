"""Serving without Redis for a while: a breaker that remembers Redis failed, so requests stop waiting on it.

When a Redis call fails (refused, or no answer within DUET_REDIS_TIMEOUT_S), `tripped()` is true for
`cool_down_s`: chat answers single answers without offering pairs or thumbs (nothing to store them in),
keys already verified keep working from the in-process cache, the rate limit is not counted, and what
needs Redis to be right (votes, new keys, the dashboard) answers 503 with Retry-After. The next call
after the cool-down tries Redis again; redis-py reconnects by itself, so nothing needs a restart.
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from serving import metrics
from serving.errors import APIError, error_response

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


class RedisBreaker:
    def __init__(self, cool_down_s: float = RETRY_AFTER_S) -> None:
        self.cool_down_s = cool_down_s
        self.down_until = 0.0

    def tripped(self) -> bool:
        return time.monotonic() < self.down_until

    def trip(self, error: Exception) -> None:
        if not self.tripped():
            log.warning("Redis unavailable (%s: %s): single answers only for %.0f s", type(error).__name__, error,
                        self.cool_down_s)
        self.down_until = time.monotonic() + self.cool_down_s
        metrics.REDIS_ERRORS.inc()


    def recovered(self) -> None:
        """Redis answered (e.g. /ready's ping): stop skipping it now rather than at the end of the cool-down,
        so what /ready reports and what requests get agree."""
        if self.tripped():
            log.info("Redis answers again")
        self.down_until = 0.0


def unavailable(what: str) -> APIError:
    return APIError(503, f"{what} needs Redis, which is not answering; retry shortly.", code="redis_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


async def on_redis_error(request, exc: RedisError):
    """The app's handler for a Redis error no route caught: trip the breaker, answer 503 + Retry-After."""
    breaker = getattr(getattr(request.app.state, "rt", None), "breaker", None)
    if breaker is not None:
        breaker.trip(exc)
    err = unavailable("This")
    return error_response(err.status, err.message, code=err.code, headers=err.headers)
