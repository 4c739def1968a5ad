"""Chat completions: validate, render the prompt, run the engine, and (sometimes) record a comparison.

A request that gets a pair is answered with K choices from ONE engine call (n=K over a shared
prompt), and its `duet` object carries the comparison id and the vote token.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from feedback.contract.comparisons import Answer, ChatMessage, PendingComparison, SamplingSpec
from serving import metrics
from serving.config import ChatConfig
from serving.auth import ApiKeyRecord
from serving.canary import CanaryRunner, CrossPair, generate_cross
from serving.engine import Engine
from serving.errors import APIError
from serving.pairing import ComparisonStore, decide_pair, expiry, hash_user, new_record_id, pairs_mode, vote_token
from serving.prompting import PromptBuilder
from serving.redis_health import RedisBreaker
from serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    Choice,
    ChunkChoice,
    DeltaMessage,
    DuetResponseInfo,
    ErrorBody,
    ErrorResponse,
    Usage,
)

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A validated request, ready for the engine."""

    request_id: str
    request: ChatCompletionRequest
    key: ApiKeyRecord
    messages: list[ChatMessage]
    prompt_ids: list[int]
    sampling: SamplingSpec
    n: int
    paired: bool
    keep_for_votes: bool  # store what was shown so a vote can refer to it (pairs, and singles for thumbs)
    cross: CrossPair | None = None  # a canary's blind pair: one answer from the candidate, one from the incumbent
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Collected:
    texts: dict[int, list[str]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)  # in order of first appearance
    answer_versions: dict[int, str] = field(default_factory=dict)  # cross-version pairs: each answer's own

    def add_version(self, v: str) -> None:
        if v not in self.versions:
            self.versions.append(v)


class ChatService:
    def __init__(self, cfg: ChatConfig, engine: Engine, prompts: PromptBuilder, store: ComparisonStore,
                 secret: str, breaker: RedisBreaker | None = None, canary: CanaryRunner | None = None) -> None:
        self.s = cfg
        self.engine = engine
        self.prompts = prompts
        self.store = store
        self.secret = secret
        self.breaker = breaker or RedisBreaker()  # while Redis is away: no pairs, no thumbs (nowhere to keep them)
        self.canary = canary

    # --- validation ---------------------------------------------------------------------
    def plan(self, req: ChatCompletionRequest, key: ApiKeyRecord, pairs_header: str | None) -> Plan:
        s = self.s
        if req.model != s.served_model_name:
            raise APIError(404, f"The model '{req.model}' does not exist. Available: '{s.served_model_name}'.",
                           param="model", code="model_not_found")
        if req.n > s.max_n:
            raise APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")

        mode = pairs_mode(req.duet.pairs if req.duet else None, pairs_header)
        duet_aware = req.duet is not None or pairs_header is not None
        k = (req.duet.k if req.duet and req.duet.k else 2)
        if k > s.max_k:
            raise APIError(400, f"duet.k must be at most {s.max_k}", param="duet.k", code="invalid_value")
        if mode == "force" and req.n != 1:
            raise APIError(400, "duet.pairs='force' needs n=1: the server chooses how many answers to return",
                           param="n", code="invalid_value")
        pair_rate = key.pair_rate if key.pair_rate is not None else s.pair_rate
        redis_up = not self.breaker.tripped()
        paired = req.n == 1 and redis_up and decide_pair(mode, pair_rate)

        messages = [ChatMessage(role=m.role, content=m.content) for m in req.messages]
        prompt_ids = self.prompts.token_ids(messages)
        context = self.engine.max_model_len
        room = context - len(prompt_ids)
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:
            max_tokens = min(s.default_max_tokens, room)
        else:
            max_tokens = min(asked, s.max_tokens_cap)
        if room < 1 or len(prompt_ids) + max_tokens > context:
            over = len(prompt_ids) + max(max_tokens, 1) - context
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the messages, "
                f"{max(max_tokens, 1)} in the completion). Please reduce the length by {over} tokens.",
                param="messages", code="context_length_exceeded",
            )
        temperature = req.temperature
        if paired:
            # K greedy answers would be identical; comparisons need sampling diversity.
            temperature = max(temperature, s.pair_min_temperature)
        sampling = SamplingSpec(temperature=temperature, top_p=req.top_p, max_tokens=max_tokens, seed=req.seed,
                                stop=req.stop)
        # single answers always come from the incumbent; a share of pairs of two, one from each version
        cross = self.canary.cross_pair() if paired and k == 2 and self.canary is not None else None
        return Plan(request_id="chatcmpl-" + uuid.uuid4().hex, request=req, key=key, messages=messages,
                    prompt_ids=prompt_ids, sampling=sampling, n=k if paired else req.n, paired=paired,
                    keep_for_votes=paired or (duet_aware and redis_up and req.n == 1), cross=cross)

    # --- engine ----------------------------------------------------------------------------
    async def _steps(self, plan: Plan, col: Collected) -> AsyncIterator[list]:
        """Engine steps, with bookkeeping (tokens, versions, metrics) in one place."""
        t0 = time.perf_counter()
        first = True
        metrics.INFLIGHT.inc()
        metrics.PROMPT_TOKENS.inc(len(plan.prompt_ids))
        try:
            steps = (generate_cross(plan.cross, plan.prompt_ids, plan.sampling, plan.request_id) if plan.cross
                     else self.engine.generate(plan.prompt_ids, plan.sampling, plan.n, plan.request_id))
            async for step in steps:
                col.add_version(step.model_version)
                for d in step.deltas:
                    if plan.cross is not None:
                        col.answer_versions[d.index] = step.model_version
                    if first and d.new_tokens:
                        metrics.TTFT.observe(time.perf_counter() - t0)
                        first = False
                    col.texts.setdefault(d.index, []).append(d.text)
                    col.tokens[d.index] = col.tokens.get(d.index, 0) + d.new_tokens
                    metrics.GENERATED_TOKENS.inc(d.new_tokens)
                    if d.finish_reason is not None:
                        col.finish[d.index] = d.finish_reason
                yield step.deltas
        except (asyncio.CancelledError, GeneratorExit):
            metrics.ABORTS.inc()
            raise
        finally:
            metrics.INFLIGHT.dec()

    async def _finish(self, plan: Plan, col: Collected) -> DuetResponseInfo:
        """Build the duet object; store what was shown first, so a vote can never miss it."""
        # a cross-version pair names both versions, never which answer came from which
        version = (self.engine.model_version if plan.cross else col.versions[-1] if col.versions
                   else self.engine.model_version)
        versions = sorted(col.versions) if plan.cross else col.versions
        info = DuetResponseInfo(model_version=version, model_versions=versions if len(versions) > 1 else None)
        if not plan.keep_for_votes:
            return info
        created, expires = expiry(self.s.comparison_ttl_s)
        cid = new_record_id(plan.paired)
        answer_version = "+".join(col.versions) if col.versions else version
        record = PendingComparison(
            comparison_id=cid, key_id=plan.key.key_id, user_hash=hash_user(plan.request.user),
            model=self.s.served_model_name, messages=plan.messages,
            answers=[Answer(index=i, text="".join(col.texts.get(i, [])), finish_reason=col.finish.get(i),
                            model_version=col.answer_versions.get(i, answer_version),
                            completion_tokens=col.tokens.get(i, 0))
                     for i in range(plan.n)],
            sampling=plan.sampling, prompt_tokens=len(plan.prompt_ids), created_at=created, expires_at=expires)
        try:
            await self.store.save(record)
        except RedisError as e:  # the answers stand; only voting on them is lost
            self.breaker.trip(e)
            return info
        exp = int(expires.timestamp())
        if plan.paired:
            metrics.PAIRED_RESPONSES.labels(k=str(plan.n)).inc()
            info.comparison_id = cid
        else:
            info.completion_id = cid
        info.expires_at = exp
        info.vote_token = vote_token(self.secret, cid, plan.key.key_id, exp)
        return info

    def _usage(self, plan: Plan, col: Collected) -> Usage:
        completion = sum(col.tokens.values())
        return Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=completion,
                     total_tokens=len(plan.prompt_ids) + completion)

    async def complete(self, plan: Plan) -> ChatCompletionResponse:
        col = Collected()
        async for _ in self._steps(plan, col):
            pass
        duet = await self._finish(plan, col)
        choices = [Choice(index=i, message=ChatMessageOut(content="".join(col.texts.get(i, []))),
                          finish_reason=col.finish.get(i)) for i in range(plan.n)]
        return ChatCompletionResponse(id=plan.request_id, created=plan.created, model=self.s.served_model_name,
                                      choices=choices, usage=self._usage(plan, col), duet=duet)

    async def stream(self, plan: Plan) -> AsyncIterator[str]:
        """Server-Sent Events exactly as OpenAI clients parse them; `duet` rides on the last finish chunk."""
        col = Collected()
        model = self.s.served_model_name

        def chunk(choices: list[ChunkChoice], **extra) -> str:
            c = ChatCompletionChunk(id=plan.request_id, created=plan.created, model=model, choices=choices, **extra)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        try:
            yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(plan.n)])
            held: list[ChunkChoice] = []
            async for deltas in self._steps(plan, col):
                content = [ChunkChoice(index=d.index, delta=DeltaMessage(content=d.text)) for d in deltas if d.text]
                if content:
                    yield chunk(content)
                done = [ChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=d.finish_reason)
                        for d in deltas if d.finish_reason is not None]
                if done and len(col.finish) < plan.n:
                    yield chunk(done)
                elif done:
                    held = done  # the last choice to finish: sent with the duet object
            duet = await self._finish(plan, col)
            yield chunk(held, duet=duet)
            opts = plan.request.stream_options or {}
            if opts.get("include_usage"):
                yield chunk([], usage=self._usage(plan, col))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            # Headers are already sent: report in-band, as OpenAI does, never a traceback.
            log.exception("stream %s failed", plan.request_id)
            body = ErrorResponse(error=ErrorBody(message="the engine failed while generating", type="server_error",
                                                 code="engine_error"))
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
