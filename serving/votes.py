"""POST /v1/feedback: a user's verdict on K answers (choice or ranking) or thumbs on one answer.

A vote is answered 202 only once it is durable: the voted mark and the event go into Redis in one
atomic step (feedback/outbox.py); the relay takes it to Kafka from there.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.comparisons import PendingComparison
from feedback.events import Choice, FeedbackEvent, Rating, normalize_ranking
from feedback.outbox import Outbox
from serving import metrics
from serving.auth import ApiKeyRecord
from serving.errors import APIError
from serving.pairing import ComparisonStore, verify_vote_token

RECORD_ID = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")]


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comparison_id: RECORD_ID | None = None
    completion_id: RECORD_ID | None = None
    vote_token: str = Field(min_length=1, max_length=200)
    choice: Choice | None = None
    ranking: list[int | list[int]] | None = Field(None, min_length=1, max_length=9)
    rating: Rating | None = None
    reason: str | None = Field(None, max_length=2000)
    open_ended: bool | None = None  # optional: the client knows whether its prompt was open-ended

    @model_validator(mode="after")
    def _shape(self) -> VoteRequest:
        if (self.comparison_id is None) == (self.completion_id is None):
            raise ValueError("give exactly one of comparison_id (a choice or ranking) or completion_id (a rating)")
        if self.comparison_id is not None:
            if (self.choice is None) == (self.ranking is None):
                raise ValueError("a comparison vote needs exactly one of `choice` or `ranking`")
            if self.rating is not None:
                raise ValueError("`rating` goes with completion_id, not comparison_id")
        elif self.rating is None or self.choice is not None or self.ranking is not None:
            raise ValueError("a completion vote needs `rating` (up or down) and no choice or ranking")
        return self


class VoteAccepted(BaseModel):
    event_id: str


class VoteService:
    def __init__(self, store: ComparisonStore, outbox: Outbox, secret: str) -> None:
        self.store = store
        self.outbox = outbox
        self.secret = secret

    async def vote(self, req: VoteRequest, key: ApiKeyRecord, idempotency_key: str | None) -> tuple[int, str]:
        """Returns (HTTP status, event id): 202 for a new vote, 200 for an idempotent retry."""
        is_comparison = req.comparison_id is not None
        record_id = req.comparison_id or req.completion_id
        param = "comparison_id" if is_comparison else "completion_id"
        record = await self.store.get(record_id)
        if record is None or (len(record.answers) >= 2) != is_comparison:
            raise self._reject(410, "unknown_or_expired",
                               f"{param} '{record_id}' is unknown or has expired; votes are accepted while it lives",
                               param)
        if record.key_id != key.key_id or not verify_vote_token(
                self.secret, req.vote_token, record.comparison_id, key.key_id, int(record.expires_at.timestamp())):
            raise self._reject(403, "bad_token", "vote_token does not match this comparison and API key",
                               "vote_token")
        event = self._event(req, record, key)
        result = await self.outbox.record_vote(record_id, event.event_id, event.model_dump_json(),
                                               idempotency_key or "", choice=_choice_label(req))
        if result.status == "ok":
            metrics.VOTES.labels(choice=_choice_label(req)).inc()
            return 202, event.event_id
        if result.status == "voted":
            if idempotency_key and result.idempotency_key == idempotency_key:
                return 200, result.event_id or ""
            raise self._reject(409, "already_voted", f"{param} '{record_id}' already has a vote", param)
        if result.status == "full":
            raise self._reject(503, "outbox_full", "Votes are queued faster than Kafka takes them; retry later.",
                               None, headers={"Retry-After": "30"})
        raise self._reject(410, "unknown_or_expired", f"{param} '{record_id}' has expired", param)

    def _event(self, req: VoteRequest, record: PendingComparison, key: ApiKeyRecord) -> FeedbackEvent:
        k = len(record.answers)
        ranking = None
        if req.ranking is not None:
            try:
                ranking = normalize_ranking(req.ranking, k)
            except ValueError as e:
                raise self._reject(400, "bad_ranking", f"ranking: {e}", "ranking") from None
        if req.choice in ("a", "b") and k != 2:
            raise self._reject(400, "bad_choice", f"choice '{req.choice}' needs 2 answers; this comparison has {k}: "
                                                  "send a ranking", "choice")
        return FeedbackEvent(kind="comparison" if k >= 2 else "rating", key_id=key.key_id, user_hash=record.user_hash,
                             comparison=record, choice=req.choice, ranking=ranking, rating=req.rating,
                             reason=req.reason, open_ended=req.open_ended)

    @staticmethod
    def _reject(status: int, reason: str, message: str, param: str | None, **kw) -> APIError:
        metrics.VOTE_REJECTIONS.labels(reason=reason).inc()
        return APIError(status, message, param=param, code=reason, **kw)


def _choice_label(req: VoteRequest) -> str:
    return req.choice or req.rating or "ranking"
