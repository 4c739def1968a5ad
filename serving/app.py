"""The FastAPI app: the runtime's lifespan, middleware, error handlers and the routes (one module per
resource under serving/routes/). The engine loads in the background after the server is listening, so
/health answers at once and chat answers 503 until /ready says yes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from feedback.outbox import Outbox
from serving.auth import KeyStore
from serving.config import ServingConfig
from serving.errors import install_error_handlers
from serving.middleware import LimitsAndMetrics
from serving.openapi import install_openapi
from serving.pairing import ComparisonStore
from serving.rate_limit import RateLimiter
from serving.redis_health import RedisBreaker, on_redis_error
from serving.routes import admin, canary, chat, dashboard, feedback, health
from serving.runtime import EngineFactory, Relay, Runtime, load_engine, sample_gauges, vllm_engine_factory
from serving.votes import VoteService

log = logging.getLogger(__name__)

__all__ = ["create_app", "vllm_engine_factory"]


def create_app(s: ServingConfig, model: Callable[[], str], engine_factory: EngineFactory = vllm_engine_factory,
               start_relay: Callable[[], Relay] | None = None) -> FastAPI:
    """`model` gives the model's folder (called in the background: it may convert the model first). `start_relay`
    starts the outbox relay beside the API (a child process or a thread; duet/wiring.py builds both) and returns
    it, stopped with the app; None: the relay runs elsewhere (`duet relay`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # short timeouts: a hung Redis must not hang every request (see serving/redis_health.py)
        redis = aioredis.from_url(s.redis_url, decode_responses=True, socket_timeout=s.redis_timeout_s,
                                  socket_connect_timeout=s.redis_timeout_s)
        breaker = RedisBreaker()
        outbox = Outbox(redis, s.outbox_max, s.vote_cap_per_key, s.vote_cap_per_user, s.vote_max_bytes)
        votes = VoteService(ComparisonStore(redis), outbox, s.secret, s.max_edit_chars)
        rt = Runtime(cfg=s, redis=redis, breaker=breaker, votes=votes, started=time.time(),
                     keys=KeyStore(redis, s.admin_key, s.auth_disabled, dev_key=s.dev_key, breaker=breaker),
                     limiter=RateLimiter(redis, s.rate_limit_rpm, breaker))
        if not s.kafka_bootstrap:
            log.warning("DUET_KAFKA_BOOTSTRAP is unset: votes are kept in the Redis outbox until a broker is set")
        elif start_relay is not None:
            rt.relay = start_relay()
        app.state.rt = rt
        loader = asyncio.create_task(load_engine(rt, engine_factory, model))
        sampler = asyncio.create_task(sample_gauges(rt))
        try:
            yield
        finally:
            sampler.cancel()
            loader.cancel()
            if rt.canary_task is not None:
                rt.canary_task.cancel()
            if rt.relay is not None:
                await asyncio.to_thread(rt.relay.stop)
            if rt.watcher is not None:
                await asyncio.to_thread(rt.watcher.stop)
            if rt.engine is not None:
                rt.engine.shutdown()
            if rt.canary is not None and rt.canary.candidate is not None and rt.canary.candidate.engine is not None:
                rt.canary.candidate.engine.shutdown()  # a second engine; an adapter view stops nothing
            await redis.aclose()

    app = FastAPI(title="Duet", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_exception_handler(RedisError, on_redis_error)
    install_openapi(app)
    app.add_middleware(LimitsAndMetrics, max_body_bytes=s.max_body_bytes)
    for module in (health, chat, dashboard, admin, canary):
        app.include_router(module.router)
    app.router.routes.append(feedback.route)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app
