"""Paired answers: whether a request gets K answers to compare, vote tokens, and the Redis record."""

from __future__ import annotations

import hashlib
import hmac
import random
import uuid
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from feedback.contract.comparisons import PendingComparison, comparison_key
from serving.errors import APIError
from serving.protocol import PairsMode

PAIRS_HEADER = "x-duet-pairs"


def pairs_mode(body_mode: PairsMode | None, header: str | None) -> PairsMode:
    """The body's `duet.pairs` wins over the X-Duet-Pairs header; a client that says nothing gets "never"."""
    if body_mode is not None:
        return body_mode
    if header is None:
        return "never"
    value = header.strip().lower()
    if value not in ("allow", "force", "never"):
        raise APIError(400, "X-Duet-Pairs must be one of allow, force, never", param="X-Duet-Pairs",
                       code="invalid_value")
    return value  # type: ignore[return-value]


def decide_pair(mode: PairsMode, pair_rate: float, rng: random.Random | None = None) -> bool:
    if mode == "force":
        return True
    if mode == "allow":
        return (rng or random).random() < pair_rate
    return False


def new_record_id(paired: bool) -> str:
    """cmp_... for K answers to compare, cpl_... for one answer that can get a thumbs vote."""
    return ("cmp_" if paired else "cpl_") + uuid.uuid4().hex


def vote_token(secret: str, comparison_id: str, key_id: str, expires_at: int) -> str:
    """HMAC-SHA256 over (comparison id, API key id, expiry) with the server secret."""
    msg = f"{comparison_id}\n{key_id}\n{expires_at}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def verify_vote_token(secret: str, token: str, comparison_id: str, key_id: str, expires_at: int) -> bool:
    # bytes: compare_digest refuses str with non-ASCII characters, and a token is whatever the client sent
    return hmac.compare_digest(token.encode(), vote_token(secret, comparison_id, key_id, expires_at).encode())


def hash_user(user: str | None) -> str | None:
    return hashlib.sha256(user.encode()).hexdigest() if user else None


def expiry(ttl_s: int) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now, now + timedelta(seconds=ttl_s)


class ComparisonStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def save(self, cmp: PendingComparison) -> None:
        ttl = max(1, int((cmp.expires_at - cmp.created_at).total_seconds()))
        await self.redis.set(comparison_key(cmp.comparison_id), cmp.model_dump_json(), ex=ttl)

    async def get(self, comparison_id: str) -> PendingComparison | None:
        raw = await self.redis.get(comparison_key(comparison_id))
        return PendingComparison.model_validate_json(raw) if raw else None
