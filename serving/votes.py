"""POST /v1/feedback: a user's verdict on K answers (choice or ranking), thumbs on one answer, or an edit of
any answer they were shown (`edited_answer`, with `answer_index` for K >= 2).

A record takes one verdict and, separately, one edit (a user may pick A and then correct it).

A vote is answered 202 only once it is durable: the voted mark and the event go into Redis in one
atomic step (feedback/outbox.py); the relay takes it to Kafka from there.
"""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.contract.comparisons import PendingComparison
from feedback.contract.events import Choice, EditedAnswer, FeedbackEvent, Rating, normalize_ranking
from feedback.outbox import Outbox
from serving import metrics
from serving.auth import ApiKeyRecord
from serving.errors import APIError
from serving.pairing import ComparisonStore, verify_vote_token

RECORD_ID = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")]
EDIT_CHARS_CEILING = 100_000  # what the parser accepts at all; DUET_MAX_EDIT_CHARS (smaller) is the real limit


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
    edited_answer: str | None = Field(None, max_length=EDIT_CHARS_CEILING)  # the user's rewrite of an answer
    answer_index: int | None = Field(None, ge=0, le=8)  # which answer it rewrites (needed when K >= 2)

    @model_validator(mode="after")
    def _shape(self) -> VoteRequest:
        if (self.comparison_id is None) == (self.completion_id is None):
            raise ValueError("give exactly one of comparison_id (a choice or ranking) or completion_id (a rating)")
        if self.edited_answer is not None:
            if self.choice is not None or self.ranking is not None or self.rating is not None:
                raise ValueError("an edit (`edited_answer`) is sent on its own, without choice, ranking or rating")
            return self
        if self.answer_index is not None:
            raise ValueError("`answer_index` goes with `edited_answer`")
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
    def __init__(self, store: ComparisonStore, outbox: Outbox, secret: str, max_edit_chars: int = 4000) -> None:
        self.store = store
        self.outbox = outbox
        self.secret = secret
        self.max_edit_chars = max_edit_chars
        self.canary = None  # serving.canary.CanaryRunner while DUET_CANARY=users: counts cross-version votes

    async def vote(self, req: VoteRequest, key: ApiKeyRecord, idempotency_key: str | None) -> tuple[int, str]:
        """Returns (HTTP status, event id): 202 for a new vote, and the same for a retry with the first vote's
        Idempotency-Key (the original answer, even after the comparison expired)."""
        is_comparison = req.comparison_id is not None
        record_id = req.comparison_id or req.completion_id
        param = "comparison_id" if is_comparison else "completion_id"
        # a verdict and an edit each have their own one-per-record mark
        mark = f"{record_id}:edit" if req.edited_answer is not None else record_id
        record = await self.store.get(record_id)
        if record is None:
            if retried := await self._retry_of(mark, idempotency_key):
                return 202, retried
            raise self._reject(410, "unknown_or_expired",
                               f"{param} '{record_id}' is unknown or has expired; votes are accepted while it lives",
                               param)
        if (len(record.answers) >= 2) != is_comparison:  # thumbs on a pair, or a pick on a single answer
            raise self._reject(400, "wrong_record_kind", _wrong_kind(record_id, len(record.answers)), param)
        if record.key_id != key.key_id or not verify_vote_token(
                self.secret, req.vote_token, record.comparison_id, key.key_id, int(record.expires_at.timestamp())):
            raise self._reject(403, "bad_token", "vote_token does not match this comparison and API key",
                               "vote_token")
        event = self._event(req, record, key)
        payload = event.model_dump_json()
        result = await self.outbox.record_vote(record_id, event.event_id, payload,
                                               idempotency_key or "", choice=_choice_label(req), mark_id=mark,
                                               key_id=key.key_id, user_hash=record.user_hash)
        if result.status == "ok":
            metrics.VOTES.labels(choice=_choice_label(req)).inc()
            if self.canary is not None and req.edited_answer is None:
                await self.canary.on_vote(record, req.choice)
            return 202, event.event_id
        if result.status == "voted":
            if idempotency_key and result.idempotency_key == idempotency_key:
                return 202, result.event_id or ""
            what = "an edit" if req.edited_answer is not None else "a vote"
            raise self._reject(409, "already_voted", f"{param} '{record_id}' already has {what}", param)
        if result.status == "capped":
            who, cap = ("this API key", self.outbox.cap_per_key) if result.capped == "key" else (
                "this user", self.outbox.cap_per_user)
            raise self._reject(429, "vote_cap", f"{who} has cast {cap} votes today, the daily cap "
                                                f"(DUET_VOTE_CAP_PER_{result.capped.upper()}); more count from "
                                                "00:00 UTC", None, headers={"Retry-After": str(_to_midnight())})
        if result.status == "too_large":  # it could never reach Kafka: refused now rather than lost later
            raise self._reject(413, "vote_too_large", f"this vote's event is {len(payload.encode())} "
                                                      f"bytes with the conversation it carries; the feedback log takes "
                                                      f"at most {result.limit} (DUET_VOTE_MAX_BYTES, or the broker's "
                                                      "max.message.bytes if lower)", None)
        if result.status == "full":
            raise self._reject(503, "outbox_full", "Votes are queued faster than Kafka takes them; retry later.",
                               None, headers={"Retry-After": "30"})
        if retried := await self._retry_of(mark, idempotency_key):  # expired between the read and the vote
            return 202, retried
        raise self._reject(410, "unknown_or_expired", f"{param} '{record_id}' has expired", param)

    async def _retry_of(self, mark: str, idempotency_key: str | None) -> str | None:
        """The event id of the vote this request repeats (same Idempotency-Key), else None."""
        if not idempotency_key:
            return None
        earlier = await self.outbox.earlier_vote(mark)
        return earlier[0] if earlier and earlier[1] == idempotency_key else None

    def _event(self, req: VoteRequest, record: PendingComparison, key: ApiKeyRecord) -> FeedbackEvent:
        k = len(record.answers)
        if req.edited_answer is not None:
            return FeedbackEvent(kind="edit", key_id=key.key_id, user_hash=record.user_hash, comparison=record,
                                 edit=self._edit(req, record), reason=req.reason, open_ended=req.open_ended)
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

    def _edit(self, req: VoteRequest, record: PendingComparison) -> EditedAnswer:
        k, text = len(record.answers), req.edited_answer.strip()
        if req.answer_index is None and k > 1:
            raise self._reject(400, "bad_edit", f"answer_index: which of the {k} answers was edited (0..{k - 1})",
                               "answer_index")
        index = req.answer_index or 0
        if index >= k:
            raise self._reject(400, "bad_edit", f"answer_index: {index} is not one of the {k} answers (0..{k - 1})",
                               "answer_index")
        if not text:
            raise self._reject(400, "bad_edit", "edited_answer: is empty", "edited_answer")
        if len(text) > self.max_edit_chars:
            raise self._reject(400, "bad_edit", f"edited_answer: {len(text)} characters; at most "
                                                f"{self.max_edit_chars} (DUET_MAX_EDIT_CHARS)", "edited_answer")
        if text == record.answers[index].text.strip():
            raise self._reject(400, "bad_edit", "edited_answer: is the answer unchanged", "edited_answer")
        return EditedAnswer(index=index, text=text)

    @staticmethod
    def _reject(status: int, reason: str, message: str, param: str | None, **kw) -> APIError:
        metrics.VOTE_REJECTIONS.labels(reason=reason).inc()
        return APIError(status, message, param=param, code=reason, **kw)


def _to_midnight() -> int:
    now = time.time()
    return int(86400 - now % 86400) + 1


def _wrong_kind(record_id: str, k: int) -> str:
    if k >= 2:
        return (f"'{record_id}' is a comparison of {k} answers: send it as comparison_id, with a choice, a ranking "
                "or an edit")
    return f"'{record_id}' is a single answer: send it as completion_id, with a rating (up or down) or an edit"


def _choice_label(req: VoteRequest) -> str:
    if req.edited_answer is not None:
        return "edit"
    return req.choice or req.rating or "ranking"
