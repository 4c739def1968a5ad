"""What one serving process holds (`Runtime`) and its background work: loading the engine after the server
is listening, following weight announcements, sampling gauges."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from feedback import metrics as feedback_metrics
from feedback.canary import CanaryStore
from feedback.contract.events import WeightsAnnouncement
from feedback.outbox import async_outbox_stats
from serving import metrics
from serving.auth import KeyStore
from serving.adapter_candidate import AdapterCandidate
from serving.canary import CandidateSlot, CanaryRunner
from serving.chat import ChatService
from serving.config import EngineConfig, ServingConfig
from serving.engine import Engine, VLLMEngine, start_then_nice
from serving.pairing import ComparisonStore
from serving.prompting import PromptBuilder
from serving.rate_limit import RateLimiter
from serving.redis_health import RedisBreaker
from serving.swap import WeightSwapper
from serving.votes import VoteService
from serving.weights_watcher import WeightsWatcher

log = logging.getLogger(__name__)

class Relay(Protocol):
    """The outbox relay beside the API (duet/wiring.py starts it: a child process or a thread)."""

    def check(self) -> None: ...  # once a second: restart it if it died

    def stop(self) -> None: ...


EngineFactory = Callable[[EngineConfig, str], Engine]  # (how, the model's folder) -> a started engine


def vllm_engine_factory(cfg: EngineConfig, model_path: str) -> Engine:
    return VLLMEngine.start(
        model_path, served_model_name=cfg.served_model_name, max_model_len=cfg.max_model_len, dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager, seed=cfg.seed, kv_cache_gb=cfg.kv_cache_gb,
        gpu_memory_utilization=cfg.gpu_memory_utilization, cache_root=str(cfg.cache_root),
        max_lora_rank=cfg.max_lora_rank,
    )


def candidate_slot(s: ServingConfig, incumbent: WeightSwapper, factory: EngineFactory, model_path: str) -> CandidateSlot:
    """Where a canary's candidate is served (blocking: it may start an engine): an adapter on the incumbent's
    engine, or a second engine started at `canary_engine_nice` that loads each candidate in place."""
    if s.canary_candidate == "adapter":
        shutil.rmtree(s.canary_adapter_dir, ignore_errors=True)  # a previous run's adapters
        s.canary_adapter_dir.mkdir(parents=True)
        return AdapterCandidate(incumbent, s.canary_adapter_dir)
    engine = start_then_nice(s.canary_engine_nice, factory, s.engine.model_copy(update={"max_lora_rank": 0}),
                             model_path)
    return WeightSwapper(engine, incumbent.prompts, str(incumbent.base_path), incumbent.registry.root,
                         incumbent.probe_timeout_s, logprob_tolerance=incumbent.logprob_tolerance)


@dataclass
class Runtime:
    """What the routes need; `chat` is None until the engine has loaded."""

    cfg: ServingConfig
    redis: aioredis.Redis
    breaker: RedisBreaker
    keys: KeyStore
    limiter: RateLimiter
    votes: VoteService
    relay: Relay | None = None
    swapper: WeightSwapper | None = None
    watcher: WeightsWatcher | None = None
    engine: Engine | None = None
    chat: ChatService | None = None
    engine_error: str | None = None
    canary: CanaryRunner | None = None  # runs the tests, once the engine has loaded
    canary_task: asyncio.Task | None = None
    started: float = 0.0


async def load_engine(rt: Runtime, factory: EngineFactory, model: Callable[[], str]) -> None:
    """`model` gives the model's folder (it may convert the model first: minutes, once)."""
    s = rt.cfg
    try:
        model_path = await asyncio.to_thread(model)
        prompts = await asyncio.to_thread(PromptBuilder, model_path)
        engine = await asyncio.to_thread(factory, s.engine, model_path)
        rt.engine = engine
        rt.swapper = WeightSwapper(engine, prompts, model_path, s.registry_root, s.swap_probe_timeout_s,
                                   status_redis=rt.redis, replica=s.replica,
                                   logprob_tolerance=s.swap_logprob_tolerance)
        metrics.set_model_version(engine.model_version)
        if s.kafka_bootstrap:
            rt.watcher = WeightsWatcher(s.kafka_bootstrap, asyncio.get_running_loop(),
                                        lambda ann: on_announcement(rt, ann)).start()
        if s.canary is not None:
            swapper = rt.swapper
            rt.canary = CanaryRunner(CanaryStore(rt.redis), s.canary, swapper,
                                     lambda: candidate_slot(s, swapper, factory, model_path))
            rt.votes.canary = rt.canary
        latest = rt.swapper.registry.latest()
        if latest is not None and rt.canary is None:  # published while this replica was down
            await rt.swapper.activate(latest.name)
        elif rt.canary is not None:  # the live version is the last one users promoted (or base)
            promoted = await rt.canary.store.last_promoted()
            if promoted and promoted != engine.model_version:
                await rt.swapper.activate(promoted)
            rt.canary_task = asyncio.create_task(rt.canary.run())
        rt.chat = ChatService(s.chat, engine, prompts, ComparisonStore(rt.redis), s.secret, rt.breaker,
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
            t = await rt.canary.store.current()
            log.info("canary: testing %s against %s", ann.name, t.incumbent if t else "?")
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
            if rt.relay is not None:
                rt.relay.check()
        except Exception as e:  # Redis briefly away: /ready reports it; keep sampling
            log.debug("gauge sampling failed: %s", e)
        await asyncio.sleep(1.0)
