"""The FastAPI app: routes, auth, limits, metrics. The engine loads in the background after the
server is listening, so /health answers at once and chat answers 503 until /ready says yes."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from duet.model_assets import resolve_model
from duet.settings import Settings
from feedback import loop_status
from feedback import metrics as feedback_metrics
from feedback.events import WeightsAnnouncement
from feedback.outbox import Outbox, async_outbox_stats
from feedback.rollouts import RolloutRequest, RolloutResponse
from feedback.registry import parse_version, version_name
from serving import metrics
from serving.auth import ApiKeyRecord, KeyStore
from serving.chat import ChatService
from serving.dashboard import Dashboard, Leaderboard, build_dashboard, build_leaderboard
from serving.engine import BASE_VERSION, Engine, VLLMEngine
from serving.errors import APIError, install_error_handlers
from serving.middleware import LimitsAndMetrics
from serving.openapi import install_openapi
from serving.pairing import PAIRS_HEADER, ComparisonStore
from serving.prompting import PromptBuilder
from serving.rollouts import rollouts
from serving.protocol import ChatCompletionRequest, ModelCard, ModelList
from serving.rate_limit import RateLimiter
from serving.redis_health import RedisBreaker
from serving.relay_child import RelayChild
from serving.swap import WeightSwapper
from serving.votes import VoteAccepted, VoteRequest, VoteService
from serving.weights_watcher import WeightsWatcher

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, str], Engine]
STATIC = Path(__file__).parent / "static"  # the chat and dashboard pages; no CDN: they work offline


def vllm_engine_factory(s: Settings, model_path: str) -> Engine:
    return VLLMEngine.start(
        model_path, served_model_name=s.served_model_name, max_model_len=s.max_model_len, dtype=s.dtype,
        enforce_eager=s.enforce_eager, seed=s.seed, kv_cache_gb=s.kv_cache_gb,
        gpu_memory_utilization=s.gpu_memory_utilization, cache_root=str(s.home / "vllm-cache"),
    )


@dataclass
class Runtime:
    """What the routes need; `chat` is None until the engine has loaded."""

    settings: Settings
    redis: aioredis.Redis
    breaker: RedisBreaker
    keys: KeyStore
    limiter: RateLimiter
    votes: VoteService
    relay: Any = None  # RelayChild, or an OutboxRelay thread with DUET_RELAY=thread
    swapper: WeightSwapper | None = None
    watcher: WeightsWatcher | None = None
    engine: Engine | None = None
    chat: ChatService | None = None
    engine_error: str | None = None
    started: float = 0.0


async def _load_engine(rt: Runtime, factory: EngineFactory) -> None:
    s = rt.settings
    try:
        model_path = await asyncio.to_thread(resolve_model, s.model, s.home)
        prompts = await asyncio.to_thread(PromptBuilder, model_path)
        engine = await asyncio.to_thread(factory, s, model_path)
        rt.engine = engine
        rt.swapper = WeightSwapper(engine, prompts, model_path, s.registry_root(), s.swap_probe_timeout_s,
                                   status_redis=rt.redis, replica=f"{socket.gethostname()}:{s.port}",
                                   logprob_tolerance=s.swap_logprob_tolerance)
        metrics.set_model_version(engine.model_version)
        if s.kafka_bootstrap:
            rt.watcher = WeightsWatcher(s.kafka_bootstrap, asyncio.get_running_loop(),
                                        lambda ann: _on_announcement(rt, ann)).start()
        latest = rt.swapper.registry.latest()
        if latest is not None:  # published while this replica was down
            await rt.swapper.activate(latest.name)
        rt.chat = ChatService(s, engine, prompts, ComparisonStore(rt.redis), s.resolved_secret(), rt.breaker)
        log.info("engine ready (%s, version %s) after %.1f s", model_path, engine.model_version,
                 time.time() - rt.started)
    except Exception as e:  # surfaced on /ready and in chat's 503, not as a crash loop
        log.exception("engine failed to load")
        rt.engine_error = f"{type(e).__name__}: {e}"


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = vllm_engine_factory) -> FastAPI:
    s = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # short timeouts: a hung Redis must not hang every request (see serving/redis_health.py)
        redis = aioredis.from_url(s.redis_url, decode_responses=True, socket_timeout=s.redis_timeout_s,
                                  socket_connect_timeout=s.redis_timeout_s)
        breaker = RedisBreaker()
        outbox = Outbox(redis, s.outbox_max, s.vote_cap_per_key, s.vote_cap_per_user)
        votes = VoteService(ComparisonStore(redis), outbox, s.resolved_secret(), s.max_edit_chars)
        rt = Runtime(settings=s, redis=redis, breaker=breaker, votes=votes, started=time.time(),
                     keys=KeyStore(redis, s.admin_key, s.auth_disabled, dev_key=s.dev_key, breaker=breaker),
                     limiter=RateLimiter(redis, s.rate_limit_rpm, breaker))
        if not s.kafka_bootstrap:
            log.warning("DUET_KAFKA_BOOTSTRAP is unset: votes are kept in the Redis outbox until a broker is set")
        elif s.relay == "process":
            rt.relay = RelayChild(s).start()
        elif s.relay == "thread":
            from feedback.relay import OutboxRelay  # registers the relay's metrics in this process

            rt.relay = OutboxRelay(s.redis_url, s.kafka_bootstrap, batch=s.relay_batch,
                                   partitions=s.kafka_partitions, replication=s.kafka_replication,
                                   min_insync=s.kafka_min_insync).start()
        app.state.rt = rt
        loader = asyncio.create_task(_load_engine(rt, engine_factory))
        sampler = asyncio.create_task(_sample_gauges(rt))
        try:
            yield
        finally:
            sampler.cancel()
            loader.cancel()
            if rt.relay is not None:
                await asyncio.to_thread(rt.relay.stop)
            if rt.watcher is not None:
                await asyncio.to_thread(rt.watcher.stop)
            if rt.engine is not None:
                rt.engine.shutdown()
            await redis.aclose()

    app = FastAPI(title="Duet", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_openapi(app)

    app.add_middleware(LimitsAndMetrics, max_body_bytes=s.max_body_bytes)

    def rt_of(request: Request) -> Runtime:
        return request.app.state.rt

    async def authorize(request: Request) -> ApiKeyRecord:
        rt = rt_of(request)
        key = await rt.keys.authenticate(request.headers.get("authorization"))
        await rt.limiter.check(key.key_id, key.rate_limit_rpm)
        return key

    def chat_service(rt: Runtime) -> ChatService:
        if rt.chat is None:
            why = f"the engine failed to load: {rt.engine_error}" if rt.engine_error else "the engine is loading"
            raise APIError(503, f"Not ready: {why}. Retry shortly.", code="engine_not_ready",
                           headers={"Retry-After": "5"})
        return rt.chat

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        rt = rt_of(request)
        try:
            redis_ok = bool(await asyncio.wait_for(rt.redis.ping(), timeout=1.0))
        except Exception:
            redis_ok = False
        engine_ok = rt.chat is not None
        # Ready as long as the engine answers: without Redis, chat still serves single answers (degraded);
        # taking the replica out of the load balancer would turn a Redis outage into a full one.
        body = {"ready": engine_ok, "engine": "ready" if engine_ok else (
            "failed" if rt.engine_error else "loading"), "redis": "ok" if redis_ok else "unreachable",
            "degraded": not redis_ok,
            "model_version": rt.engine.model_version if rt.engine else None}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> ModelList:
        await authorize(request)
        rt = rt_of(request)
        root = rt.engine.model_version if rt.engine else None
        return ModelList(data=[ModelCard(id=s.served_model_name, created=int(rt.started), root=root)])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        key = await authorize(request)
        raw = await request.body()  # at most DUET_MAX_BODY_BYTES: the middleware stops a longer one
        try:
            req = ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        chat = chat_service(rt_of(request))
        plan = chat.plan(req, key, request.headers.get(PAIRS_HEADER))
        if req.stream:
            return StreamingResponse(chat.stream(plan), media_type="text/event-stream",
                                     headers={"X-Duet-Model-Version": chat.engine.model_version,
                                              "Cache-Control": "no-cache"})
        resp = await chat.complete(plan)
        return JSONResponse(resp.model_dump(), headers={"X-Duet-Model-Version": resp.duet.model_version})

    # --- pages and the dashboard's data ---------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/dashboard")
    async def dashboard(request: Request, hours: float = Query(24.0, gt=0, le=24 * 30)) -> Dashboard:
        await authorize(request)
        rt = rt_of(request)
        return await build_dashboard(rt.redis, rt.engine.model_version if rt.engine else None, hours)

    @app.get("/v1/leaderboard")
    async def leaderboard(request: Request, judge: str | None = Query(None, max_length=64)) -> Leaderboard:
        await authorize(request)
        return await build_leaderboard(rt_of(request).redis, judge)

    # --- admin ------------------------------------------------------------------------------------
    async def admin_key(request: Request) -> ApiKeyRecord:
        key = await authorize(request)
        if not key.admin:
            raise APIError(403, "This route needs the admin key.", code="admin_only")
        return key

    @app.post("/admin/evaluations", status_code=201)
    async def admin_evaluation(battle: loop_status.Battle, request: Request,
                               _: ApiKeyRecord = Depends(admin_key)) -> loop_status.Battle:  # noqa: B008
        """Verdicts between two versions from an outside judge (raters, `duet simulate`): on the leaderboard.
        The key is checked (a dependency) before the body is validated."""
        await loop_status.arecord(rt_of(request).redis, loop_status.BATTLES, battle)
        return battle

    async def admin(request: Request) -> WeightSwapper:
        await admin_key(request)
        rt = rt_of(request)
        if rt.swapper is None:
            raise APIError(503, "Not ready: the engine is loading.", code="engine_not_ready",
                           headers={"Retry-After": "5"})
        return rt.swapper

    @app.get("/admin/models")
    async def admin_models(request: Request) -> dict:
        swapper = await admin(request)
        return {**swapper.status(), "versions": [m.model_dump(mode="json", include={"version", "name", "parent_version",
                                                                                      "created_at", "eval"})
                                                 for m in swapper.registry.versions()]}

    @app.post("/admin/models/{version}/activate")
    async def admin_activate(version: str, request: Request) -> JSONResponse:
        swapper = await admin(request)
        version = parse_version(version)
        if version != BASE_VERSION and swapper.registry.show(version) is None:
            raise APIError(404, f"no version '{version}' in the registry", param="version", code="unknown_version")
        rec = await swapper.activate(version)
        status = 200 if rec.result == "ok" else (409 if rec.result == "rolled_back" else 422)
        if status != 200:
            raise APIError(status, f"{version} not activated ({rec.result}): {rec.reason}", param="version",
                           code=f"swap_{rec.result}")
        return JSONResponse({"current": swapper.engine.model_version, "swap": asdict(rec)})

    @app.post("/admin/rollouts")
    async def admin_rollouts(body: RolloutRequest, request: Request,
                             _: ApiKeyRecord = Depends(admin_key)) -> RolloutResponse:  # noqa: B008 (a closure:
        # an Annotated alias could not name it under `from __future__ import annotations`)
        """The live engine samples for the trainer's policy rounds (token ids in, token ids out).
        The key is checked (a dependency) before the body is validated."""
        rt = rt_of(request)
        if rt.engine is None:
            raise APIError(503, "Not ready: the engine is loading.", code="engine_not_ready",
                           headers={"Retry-After": "5"})
        return await rollouts(rt.engine, body)

    @app.post("/admin/updates/{action}")
    async def admin_updates(action: str, request: Request) -> dict:
        swapper = await admin(request)
        if action not in ("pause", "resume"):
            raise APIError(404, f"unknown action '{action}': use pause or resume", param="action")
        swapper.paused = action == "pause"
        return {"updates_paused": swapper.paused}

    async def feedback(request: Request) -> JSONResponse:
        key = await authorize(request)
        try:
            vote = VoteRequest.model_validate_json(await request.body())
        except ValidationError as e:
            metrics.VOTE_REJECTIONS.labels(reason="malformed").inc()
            raise RequestValidationError(e.errors()) from None
        status, event_id = await rt_of(request).votes.vote(vote, key, request.headers.get("idempotency-key"))
        return JSONResponse(VoteAccepted(event_id=event_id).model_dump(), status_code=status)

    # A plain Starlette route: votes are the hot path, and FastAPI's per-request dependency and
    # response machinery is a measurable share of it (bench/feedback.py).
    app.add_route("/v1/feedback", feedback, methods=["POST"])

    return app


async def _on_announcement(rt: Runtime, ann: WeightsAnnouncement) -> None:
    swapper = rt.swapper
    if swapper is None or ann.name == swapper.engine.model_version:
        return
    if swapper.paused:
        log.info("updates paused: not swapping to %s", ann.name)
        return
    await swapper.activate(ann.name, ann.manifest_sha256)


async def _sample_gauges(rt: Runtime) -> None:
    """Once a second: engine queue and outbox gauges, and the relay child's health."""
    while True:
        try:
            if rt.engine is not None:
                metrics.ENGINE_QUEUE.set(rt.engine.num_unfinished())
            depth, age = await async_outbox_stats(rt.redis)
            feedback_metrics.OUTBOX_DEPTH.set(depth)
            feedback_metrics.OUTBOX_OLDEST_AGE.set(age)
            if isinstance(rt.relay, RelayChild):
                rt.relay.check()
        except Exception as e:  # Redis briefly away: /ready reports it; keep sampling
            log.debug("gauge sampling failed: %s", e)
        await asyncio.sleep(1.0)
