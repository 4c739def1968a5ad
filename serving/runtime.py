"""What one serving process holds (`Runtime`) and its background work: loading the engine after the server
is listening, following weight announcements, sampling gauges."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from duet.cpus import engine_dtype
from duet.model_assets import resolve_model
from duet.settings import Settings
from feedback import metrics as feedback_metrics
from feedback.canary import CanaryConfig, CanaryStore
from feedback.events import WeightsAnnouncement
from feedback.outbox import async_outbox_stats
from serving import metrics
from serving.auth import KeyStore
from serving.canary import CanaryRunner
from serving.chat import ChatService
from serving.engine import Engine, VLLMEngine, call_niced
from serving.pairing import ComparisonStore
from serving.prompting import PromptBuilder
from serving.rate_limit import RateLimiter
from serving.redis_health import RedisBreaker
from serving.relay_child import RelayChild
from serving.swap import WeightSwapper
from serving.votes import VoteService
from serving.weights_watcher import WeightsWatcher

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, str], Engine]


def vllm_engine_factory(s: Settings, model_path: str) -> Engine:
    import torch

    dtype = engine_dtype(s.dtype, on_gpu=torch.cuda.is_available())
    if dtype != s.dtype:
        log.info("serving in %s: this CPU has no bf16 instructions (DUET_DTYPE=auto)", dtype)
    return VLLMEngine.start(
        model_path, served_model_name=s.served_model_name, max_model_len=s.max_model_len, dtype=dtype,
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
    canary_cfg: CanaryConfig | None = None  # users judge each published version (DUET_CANARY=users)
    canary: CanaryRunner | None = None  # runs the tests, once the engine has loaded
    canary_task: asyncio.Task | None = None
    started: float = 0.0


async def load_engine(rt: Runtime, factory: EngineFactory) -> None:
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
                                        lambda ann: on_announcement(rt, ann)).start()
        if rt.canary_cfg is not None:
            rt.canary = CanaryRunner(CanaryStore(rt.redis), rt.canary_cfg, rt.swapper,
                                     lambda: call_niced(s.canary_engine_nice, factory, s, model_path))
            rt.votes.canary = rt.canary
        latest = rt.swapper.registry.latest()
        if latest is not None and rt.canary is None:  # published while this replica was down
            await rt.swapper.activate(latest.name)
        elif rt.canary is not None:  # the live version is the last one users promoted (or base)
            promoted = await rt.canary.store.last_promoted()
            if promoted and promoted != engine.model_version:
                await rt.swapper.activate(promoted)
            rt.canary_task = asyncio.create_task(rt.canary.run())
        rt.chat = ChatService(s, engine, prompts, ComparisonStore(rt.redis), s.resolved_secret(), rt.breaker,
                              canary=rt.canary)
        log.info("engine ready (%s, version %s) after %.1f s", model_path, engine.model_version,
                 time.time() - rt.started)
    except Exception as e:  # surfaced on /ready and in chat's 503, not as a crash loop
        log.exception("engine failed to load")
        rt.engine_error = f"{type(e).__name__}: {e}"


async def on_announcement(rt: Runtime, ann: WeightsAnnouncement) -> None:
    swapper = rt.swapper
    if swapper is None or ann.name == swapper.engine.model_version:
        return
    if swapper.paused:
        log.info("updates paused: not swapping to %s", ann.name)
        metrics.ANNOUNCEMENTS_HELD.inc()
        return
    if rt.canary is not None:  # users decide: a test against the live version, not a swap
        if await rt.canary.store.start(ann.name, swapper.engine.model_version):
            log.info("canary: testing %s against %s", ann.name, swapper.engine.model_version)
        return
    await swapper.activate(ann.name, ann.manifest_sha256)


async def sample_gauges(rt: Runtime) -> None:
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
