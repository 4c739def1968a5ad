"""`POST /admin/rollouts`: the live engine samples for the trainer (contract: feedback/contract/rollouts.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable

from feedback.contract.comparisons import SamplingSpec
from feedback.contract.rollouts import RolloutRequest, RolloutResponse, RolloutSample
from serving import metrics
from serving.engine import Engine, EngineInputError
from serving.errors import APIError

DISCONNECT_POLL_S = 0.5


async def _one(engine: Engine, prompt: list[int], req: RolloutRequest) -> tuple[list[RolloutSample], set[str]]:
    tokens: list[list[int]] = [[] for _ in range(req.n)]
    finish: list[str | None] = [None] * req.n
    versions: set[str] = set()
    spec = SamplingSpec(temperature=req.temperature, top_p=1.0, max_tokens=req.max_tokens)
    async for step in engine.generate(prompt, spec, req.n, f"rollout-{uuid.uuid4().hex}"):
        versions.add(step.model_version)
        for d in step.deltas:
            tokens[d.index].extend(d.token_ids)
            finish[d.index] = d.finish_reason or finish[d.index]
    return [RolloutSample(token_ids=t, finish_reason=f) for t, f in zip(tokens, finish)], versions


async def rollouts(engine: Engine, req: RolloutRequest,
                   disconnected: Callable[[], Awaitable[bool]] | None = None) -> RolloutResponse:
    """The samples; with `disconnected` (the request's), a client that went away (a trainer that timed out)
    cancels every generation at once instead of leaving dozens running for minutes."""
    if disconnected is None:
        return await _rollouts(engine, req)
    work = asyncio.ensure_future(_rollouts(engine, req))
    while not work.done():
        await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if not work.done() and await disconnected():
            work.cancel()  # closes each engine.generate: the engine aborts its requests
            with contextlib.suppress(asyncio.CancelledError):
                await work
            metrics.ABORTS.inc(len(req.prompts))
            raise APIError(499, "the client closed the connection; its rollouts were aborted",
                           code="client_closed_request")
    return work.result()


async def _rollouts(engine: Engine, req: RolloutRequest) -> RolloutResponse:
    if req.model_version is not None and req.model_version != engine.model_version:
        raise APIError(409, f"{req.model_version} is not live ({engine.model_version} is)", param="model_version",
                       code="version_not_live")
    too_long = [i for i, p in enumerate(req.prompts) if len(p) + req.max_tokens > engine.max_model_len]
    if too_long:
        raise APIError(400, f"prompt {too_long[0]} plus max_tokens exceeds the engine's {engine.max_model_len} tokens",
                       param="prompts", code="context_length_exceeded")
    try:
        results = await asyncio.gather(*(_one(engine, p, req) for p in req.prompts))
    except EngineInputError as e:  # the engine's own checks, e.g. a token id outside the vocabulary
        raise APIError(400, f"prompts: {e}", param="prompts", code="invalid_value") from None
    versions = set().union(*(v for _, v in results))
    if len(versions) != 1 or (req.model_version is not None and versions != {req.model_version}):
        raise APIError(409, f"the live version changed during the rollout ({sorted(versions)})",
                       code="version_changed")
    return RolloutResponse(model_version=versions.pop(), samples=[s for s, _ in results])
