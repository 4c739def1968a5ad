"""API keys: stored hashed in Redis, looked up by the sha256 of the presented bearer token.

Redis layout:
    duet:apikey:{sha256(key)}   STRING, JSON of `ApiKeyRecord` (no expiry)
The admin key (DUET_ADMIN_KEY) and the dev key `duet up` prints (DUET_DEV_KEY) come from the settings and
never depend on Redis: they keep working when Redis restarts empty.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from feedback.contract.redis_keys import APIKEY_PREFIX
from serving.errors import APIError
from serving.redis_health import RedisBreaker, unavailable

ANONYMOUS = "anonymous"


class ApiKeyRecord(BaseModel):
    key_id: str  # public id, safe to log; the first 12 hex chars of the key's hash
    name: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    pair_rate: float | None = Field(None, ge=0.0, le=1.0)  # overrides DUET_PAIR_RATE
    rate_limit_rpm: int | None = Field(None, ge=1)  # overrides DUET_RATE_LIMIT_RPM
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "duet-" + secrets.token_urlsafe(32)


class KeyStore:
    """Keys in Redis, with a short in-process cache: a revoked key keeps working for up to
    `cache_s` seconds, which saves a Redis round trip on every request."""

    def __init__(self, redis: Redis, admin_key: str = "", auth_disabled: bool = False, cache_s: float = 10.0,
                 dev_key: str = "", breaker: RedisBreaker | None = None) -> None:
        self.redis = redis
        self.breaker = breaker or RedisBreaker()
        self.admin_key = admin_key
        self.dev_key = dev_key
        self.dev_record = ApiKeyRecord(key_id=hash_key(dev_key)[:12], name="dev") if dev_key else None
        self.auth_disabled = auth_disabled
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKeyRecord]] = {}

    async def create(self, name: str, *, key: str | None = None, pair_rate: float | None = None,
                     rate_limit_rpm: int | None = None) -> tuple[str, ApiKeyRecord]:
        key = key or new_key()
        digest = hash_key(key)
        record = ApiKeyRecord(key_id=digest[:12], name=name, pair_rate=pair_rate, rate_limit_rpm=rate_limit_rpm)
        await self.redis.set(APIKEY_PREFIX + digest, record.model_dump_json())
        return key, record

    async def authenticate(self, authorization: str | None) -> ApiKeyRecord:
        if self.auth_disabled:
            return ApiKeyRecord(key_id=ANONYMOUS, name=ANONYMOUS)
        token = _bearer(authorization)
        # bytes: compare_digest refuses str with non-ASCII characters (a header may carry any latin-1 byte)
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return ApiKeyRecord(key_id="admin", name="admin", admin=True)
        if self.dev_record is not None and hmac.compare_digest(token.encode(), self.dev_key.encode()):
            return self.dev_record
        digest = hash_key(token)
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        raw, reached = None, False
        if not self.breaker.tripped():
            try:
                raw, reached = await self.redis.get(APIKEY_PREFIX + digest), True
            except RedisError as e:
                self.breaker.trip(e)
        if not reached:
            if hit:  # verified before: keep serving it while Redis is away
                return hit[1]
            raise unavailable("Checking this API key")
        if raw is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        record = ApiKeyRecord.model_validate_json(raw)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self.cache_s, record)
        return record


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Malformed Authorization header: expected 'Bearer YOUR_KEY'.", code="invalid_api_key")
    return token.strip()
