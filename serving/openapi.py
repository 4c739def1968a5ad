"""The OpenAPI document with every route's real request body.

Every route lists the errors it can answer, from what it depends on (a key: 401, 429 and 503 when Redis cannot
check it; the admin key: 403; the engine: 503; a path parameter: 404; a body or query: 400 — Duet answers
validation errors with 400, never FastAPI's 422) and what it declares itself. Two routes parse their bodies by hand, so FastAPI cannot see them: chat completions (it checks the key and
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
           "403": "not allowed for this key", "409": "conflict", "410": "expired", "413": "body (or the vote event) too large",
           "429": "rate limited (Retry-After)", "503": "not ready or overloaded (Retry-After)",
           "404": "no such resource (the path names it)", "422": "the request was understood but refused",
           "499": "the client closed the connection (its work was cancelled)"}


def errors(*codes: str) -> dict:
    """`responses=` for a route that answers these errors itself (besides what its dependencies bring)."""
    return {int(c): {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        chat = doc["paths"].setdefault("/v1/chat/completions", {}).setdefault("post", {})
        chat.update(_operation(schemas, ChatCompletionRequest, {"200": (ChatCompletionResponse, "the answers; "
                               "with stream=true, server-sent chat.completion.chunk events")},
                               "Chat completions (OpenAI-compatible), with Duet's `duet` extension",
                               ("400", "401", "404", "413", "429", "503")))
        _document_errors(doc, app, schemas)
        doc["paths"]["/v1/feedback"] = {"post": _operation(
            schemas, VoteRequest, {"202": (VoteAccepted, "accepted: durable in the outbox; a retry with the "
                                                         "first vote's Idempotency-Key gets this answer again")},
            "A vote, rating or edit on answers this key received",
            ("400", "401", "403", "409", "410", "413", "429", "503"))}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def _ref(schemas: dict, model: type[BaseModel]) -> dict:
    """`model`'s schema among the document's components (with the ones it uses); a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(schemas: dict, body: type[BaseModel], ok: dict[str, tuple[type[BaseModel], str]],
               summary: str, codes: tuple[str, ...]) -> dict:
    responses = {code: _response(text, _ref(schemas, model)) for code, (model, text) in ok.items()}
    error = _ref(schemas, ErrorResponse)
    responses.update({code: _response(_ERRORS[code], error) for code in codes})
    return {"summary": summary, "security": [{"bearer": []}], "responses": responses,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schemas, body)}}}}


# errors a dependency brings to every route that uses it (serving/deps.py)
_DEPENDENCY_ERRORS = {"api_key": ("401", "429", "503"), "admin_key": ("403",), "engine": ("503",),
                      "swapper": ("503",), "chat_service": ("503",), "canary": ("409", "503")}


def _calls(dependant) -> set[str]:
    names = set()
    for dep in dependant.dependencies:
        names.add(getattr(dep.call, "__name__", ""))
        names |= _calls(dep)
    return names


def _document_errors(doc: dict, app: FastAPI, schemas: dict) -> None:
    """Each operation's error responses as served (see the module docstring)."""
    from fastapi.routing import APIRoute

    error = _ref(schemas, ErrorResponse)
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        d = route.dependant
        codes = {c for name in _calls(d) for c in _DEPENDENCY_ERRORS.get(name, ())}
        if d.body_params or d.query_params or d.path_params:
            codes.add("400")
        if d.path_params:
            codes.add("404")
        for method in route.methods:
            op = doc["paths"].get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":  # FastAPI's, never served
                del responses["422"]
            for code in sorted(codes - responses.keys()):
                responses[code] = _response(_ERRORS.get(code, "error"), error)
