"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import RuntimeDep

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(rt: RuntimeDep) -> JSONResponse:
    try:
        redis_ok = bool(await asyncio.wait_for(rt.redis.ping(), timeout=1.0))
    except Exception:
        redis_ok = False
    if redis_ok:
        rt.breaker.recovered()
    engine_ok = rt.chat is not None
    # Ready as long as the engine answers: without Redis, chat still serves single answers (degraded);
    # taking the replica out of the load balancer would turn a Redis outage into a full one.
    body = {"ready": engine_ok, "engine": "ready" if engine_ok else ("failed" if rt.engine_error else "loading"),
            "redis": "ok" if redis_ok else "unreachable", "degraded": not redis_ok,
            "model_version": rt.engine.model_version if rt.engine else None}
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
