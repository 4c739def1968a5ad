"""OpenAI-compatible chat: /v1/models and /v1/chat/completions (with Duet's `duet` extension)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from serving.deps import ApiKeyDep, ChatDep, RuntimeDep
from serving.pairing import PAIRS_HEADER
from serving.protocol import ChatCompletionRequest, ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(_: ApiKeyDep, rt: RuntimeDep) -> ModelList:
    root = rt.engine.model_version if rt.engine else None
    return ModelList(data=[ModelCard(id=rt.cfg.chat.served_model_name, created=int(rt.started), root=root)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, key: ApiKeyDep, chat: ChatDep) -> Response:
    # The body is parsed here, not declared: the key is checked before a byte of it is read, and its
    # schema reaches the OpenAPI document through serving/openapi.py.
    raw = await request.body()  # at most DUET_MAX_BODY_BYTES: the middleware stops a longer one
    try:
        req = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    plan = chat.plan(req, key, request.headers.get(PAIRS_HEADER))
    if req.stream:
        return StreamingResponse(chat.stream(plan), media_type="text/event-stream",
                                 headers={"X-Duet-Model-Version": chat.engine.model_version,
                                          "Cache-Control": "no-cache"})
    resp = await chat.complete(plan)
    return JSONResponse(resp.model_dump(), headers={"X-Duet-Model-Version": resp.duet.model_version})
