"""POST /v1/feedback: votes, ratings and edits (serving/votes.py does the work).

A plain Starlette route, not a FastAPI one: votes are the hot path, and FastAPI's per-request dependency
and response machinery is a measurable share of it (bench/feedback.py). So the key is checked by calling
the dependency by hand."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving import metrics
from serving.deps import api_key, get_runtime
from serving.votes import VoteAccepted, VoteRequest


async def feedback(request: Request) -> JSONResponse:
    key = await api_key(request)
    try:
        vote = VoteRequest.model_validate_json(await request.body())
    except ValidationError as e:
        metrics.VOTE_REJECTIONS.labels(reason="malformed").inc()
        raise RequestValidationError(e.errors()) from None
    status, event_id = await get_runtime(request).votes.vote(vote, key, request.headers.get("idempotency-key"))
    return JSONResponse(VoteAccepted(event_id=event_id).model_dump(), status_code=status)


route = Route("/v1/feedback", feedback, methods=["POST"])
