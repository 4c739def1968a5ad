"""Pending comparisons: what serving stores in Redis when it returns K answers to compare.

Redis key layout (the votes API reads it; nothing else should write it):

    duet:cmp:{id}   STRING, JSON of `PendingComparison`, TTL = DUET_COMPARISON_TTL_S (default 24 h;
                    the record expires at `expires_at`). `id` is `cmp_<hex>` for K >= 2 answers to
                    compare, or `cpl_<hex>` for a single answer that may get a thumbs up/down.

The record is self-contained (messages, every answer, the model version of each answer and the
sampling parameters), so a vote event built from it never needs Redis again.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from feedback.contract.redis_keys import comparison_key  # noqa: F401  (where a comparison is kept)


class ChatMessage(BaseModel):
    role: str
    content: str


class Answer(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    model_version: str  # the weights that produced this answer
    completion_tokens: int


class SamplingSpec(BaseModel):
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class PendingComparison(BaseModel):
    schema_version: int = 1
    comparison_id: str
    key_id: str  # id of the API key that asked (votes must come from the same key)
    user_hash: str | None  # sha256 of the OpenAI `user` field, never the raw value
    model: str  # served model name
    messages: list[ChatMessage]
    answers: list[Answer]
    sampling: SamplingSpec
    prompt_tokens: int
    created_at: datetime
    expires_at: datetime
