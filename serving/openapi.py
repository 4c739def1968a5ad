"""The OpenAPI document with every route's real request body.

Two routes parse their bodies by hand, so FastAPI cannot see them: chat completions (it checks the key and
the size before parsing, and streams) and `/v1/feedback` (a plain Starlette route for speed). Their
bodies, responses and errors are added here from the same pydantic models they parse with.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse
from serving.votes import VoteAccepted, VoteRequest

_ERRORS = {"400": "invalid request (the field is named in `error.param`)", "401": "missing or wrong API key",
           "403": "not allowed for this key", "409": "conflict", "410": "expired", "413": "body too large",
           "429": "rate limited (Retry-After)", "503": "not ready or overloaded (Retry-After)"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        chat = doc["paths"].setdefault("/v1/chat/completions", {}).setdefault("post", {})
        chat.update(_operation(schemas, ChatCompletionRequest, {"200": (ChatCompletionResponse, "the answers; "
                               "with stream=true, server-sent chat.completion.chunk events")},
                               "Chat completions (OpenAI-compatible), with Duet's `duet` extension"))
        doc["paths"]["/v1/feedback"] = {"post": _operation(
            schemas, VoteRequest, {"202": (VoteAccepted, "accepted: durable in the outbox"),
                                   "200": (VoteAccepted, "a retry with the same Idempotency-Key")},
            "A vote, rating or edit on answers this key received")}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def _operation(schemas: dict, body: type[BaseModel], ok: dict[str, tuple[type[BaseModel], str]],
               summary: str) -> dict:
    def ref(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    responses = {code: {"description": text, "content": {"application/json": {"schema": ref(model)}}}
                 for code, (model, text) in ok.items()}
    error = ref(ErrorResponse)
    responses.update({code: {"description": text, "content": {"application/json": {"schema": error}}}
                      for code, text in _ERRORS.items()})
    return {"summary": summary, "security": [{"bearer": []}], "responses": responses,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}}}
