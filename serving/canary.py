"""The serving side of a canary test (feedback/canary.py): a second engine holds the candidate's weights
beside the incumbent's, a share of pairs shows one answer from each, their votes are counted, and the
decision — by the votes, the budget or an admin — is carried out on this replica.

The candidate is served one of two ways (DUET_CANARY_CANDIDATE; a `CandidateSlot` either way): by a second
engine that loads each new candidate in place (the default on a CPU, where vLLM's runtime LoRA is several times
slower), or as a runtime LoRA adapter on the incumbent's engine (serving/adapter_candidate.py; the default on a
GPU: no second copy of the model). Roles are fixed: the first engine always serves the incumbent and takes a
promoted candidate by the existing in-place swap of its merged weights (with all its checks).

Every replica runs `CanaryRunner.run`: once a second it reads the test from Redis, decides it if the
tallies say so (compare and set: the first replica to see it decides, the rest find it decided), and
follows it — loading the candidate, or swapping it in on promotion. A replica that cannot load the
candidate keeps serving the incumbent alone and says so (/admin/canary, duet_canary_candidate_loaded).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from feedback import loop_status
from feedback.arena import length_controlled
from feedback.canary import CanaryConfig, CanaryStore, CanaryTest, decide, outcome, users_battle
from feedback.contract.comparisons import PendingComparison, SamplingSpec
from serving import metrics
from serving.engine import Engine, GenerationStep
from serving.swap import SwapRecord, WeightSwapper

log = logging.getLogger(__name__)


class CandidateSlot(Protocol):
    """Where the candidate is served: a second engine's WeightSwapper, or serving/adapter_candidate.py's
    AdapterCandidate. `engine` answers as the candidate once a load succeeded."""
    engine: Engine | None

    async def activate(self, version: str, rollback_ok: bool = ...) -> SwapRecord: ...


@dataclass
class CrossPair:
    """One answer from each version; the candidate's answer at `candidate_position` (0 = "a")."""
    incumbent: Engine
    candidate: Engine
    candidate_position: int

    def engines(self) -> list[Engine]:
        return [self.candidate, self.incumbent] if self.candidate_position == 0 else [self.incumbent, self.candidate]


async def generate_cross(pair: CrossPair, prompt_ids: list[int], sampling: SamplingSpec,
                         request_id: str) -> AsyncIterator[GenerationStep]:
    """Both engines answer at once (one sample each); their steps are merged as they come, answer i from
    engine i. Closing this generator cancels both requests (each engine aborts its own on close)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, engine: Engine) -> None:
        try:
            async for step in engine.generate(prompt_ids, sampling, 1, f"{request_id}-{i}"):
                await queue.put((i, step))
            await queue.put((i, done))
        except Exception as e:  # handed to the consumer, raised there
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, e)) for i, e in enumerate(pair.engines())]
    try:
        finished = 0
        while finished < len(tasks):
            i, item = await queue.get()
            if item is done:
                finished += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield GenerationStep(deltas=[replace(d, index=i) for d in item.deltas],
                                     model_version=item.model_version)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CanaryRunner:
    def __init__(self, store: CanaryStore, cfg: CanaryConfig, incumbent: WeightSwapper,
                 start_candidate: Callable[[], CandidateSlot], rng: random.Random | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.incumbent = incumbent
        self._start_candidate = start_candidate  # blocking (it may start an engine): run in a thread, once
        self.candidate: CandidateSlot | None = None  # once started
        self.test: CanaryTest | None = None  # as last read from Redis
        self.load_error: str | None = None
        # (candidate, incumbent's weights) this replica could not load: not retried until the incumbent's weights
        # change (an adapter candidate is built against them; an admin swap during its check refuses it)
        self._failed: tuple[str, str] | None = None
        self._promotion_failed: str | None = None  # a promoted candidate whose swap failed here (not retried)
        self.rng = rng or random.Random()

    # --- what chat and votes ask ------------------------------------------------------------
    def cross_pair(self) -> CrossPair | None:
        """For a new pair: one answer from each version, or None. At `pair_share` of pairs, or `pair_share_idle`
        while the incumbent answers nobody else (low traffic: a test's pace is its cross-version votes)."""
        t = self.test
        candidate = self.candidate_engine(t.candidate if t is not None else None)
        if (t is None or t.status != "running" or candidate is None
                or self.incumbent.engine.model_version != t.incumbent):
            return None
        idle = self.incumbent.engine.num_unfinished() == 0
        if self.rng.random() >= (self.cfg.pair_share_idle if idle else self.cfg.pair_share):
            return None
        return CrossPair(self.incumbent.engine, candidate, self.rng.randrange(2))

    def candidate_engine(self, version: str | None) -> Engine | None:
        """What serves the candidate, if it is `version`: the trainer continues from the candidate under test
        and samples its rollouts there."""
        engine = self.candidate.engine if self.candidate is not None else None
        return engine if engine is not None and version is not None and engine.model_version == version else None

    def loaded_version(self) -> str | None:
        """The version the candidate's slot serves now, if any."""
        engine = self.candidate.engine if self.candidate is not None else None
        return (engine.model_version or None) if engine is not None else None

    def loading(self, version: str | None) -> bool:
        """`version` is the candidate of the running test, and its engine is not serving it yet."""
        t = self.test
        return (version is not None and t is not None and t.candidate == version and t.status == "running"
                and self.candidate_engine(version) is None and self.load_error is None)

    async def on_vote(self, record: PendingComparison, choice: str | None) -> None:
        """Count a verdict on a cross-version pair for the running test of its candidate."""
        t = self.test
        if t is None or choice is None or len(record.answers) != 2:
            return
        versions = [a.model_version for a in record.answers]
        if sorted(versions) != sorted([t.candidate, t.incumbent]) or t.candidate == t.incumbent:
            return
        pos = versions.index(t.candidate)
        score = outcome(choice, pos)
        if await self.store.tally(t.candidate, score, len(record.answers[pos].text),
                                  len(record.answers[1 - pos].text)):
            metrics.CANARY_VOTES.labels(outcome={1.0: "win", 0.5: "tie", 0.0: "loss"}[score]).inc()

    # --- the loop ---------------------------------------------------------------------------
    async def run(self, every_s: float = 1.0) -> None:
        while True:
            try:
                await self.step()
            except Exception as e:  # Redis away, a failed load: report, keep the incumbent, try again
                log.warning("canary: %s: %s", type(e).__name__, e)
            await asyncio.sleep(every_s)

    async def step(self) -> None:
        t = await self.store.current()
        lc = await self.length_controlled_win_rate() if t and self.cfg.rule == "length_controlled" else None
        if t is not None and (verdict := decide(t, self.cfg, time.time(), lc)) is not None:
            status, reason = verdict
            if await self.store.move(t.candidate, ("running",), status, reason) == "ok":
                metrics.CANARY_DECISIONS.labels(decision=status, reason=reason).inc()
                log.info("canary: %s %s by %s (%d votes)", t.candidate, status, reason, t.votes)
                await self.record_battle(t)
            t = await self.store.current()
        self.test = t
        self._export(t)
        if t is None:
            return
        # this replica serves users' incumbent: a promoted candidate, else the test's incumbent — also when a
        # new test superseded a promotion before this replica's poll saw it (the new test is against it)
        users = t.candidate if t.status == "promoted" else t.incumbent
        if (self.incumbent.engine.model_version != users and self._promotion_failed != users
                and not self.incumbent.paused):  # an admin's pause holds every swap
            rec = await self.incumbent.activate(users)
            log.info("canary: users' incumbent %s swapped in: %s %s", users, rec.result, rec.reason or "")
            if rec.result != "ok":  # the swap's checks refused it here: say so once (/admin/models, swap metrics)
                self._promotion_failed = users
        if t.status in ("running", "paused"):
            await self._load_candidate(t.candidate)

    async def _load_candidate(self, version: str) -> None:
        against = self.incumbent.engine.model_version
        if self._failed == (version, against) or self.candidate_engine(version) is not None:
            return
        try:
            if self.candidate is None:
                self.candidate = await asyncio.to_thread(self._start_candidate)
            rec = await self.candidate.activate(version, rollback_ok=False)
            if rec.result != "ok":
                raise RuntimeError(f"{rec.result}: {rec.reason}")
            self.load_error = None
        except Exception as e:
            self._failed = (version, against)
            self.load_error = f"{type(e).__name__}: {e}"
            metrics.CANARY_LOAD_FAILURES.inc()
            log.warning("canary: cannot load candidate %s; serving the incumbent alone: %s", version, e)

    def _export(self, t: CanaryTest | None) -> None:
        running = t is not None and t.status == "running"
        metrics.CANARY_RUNNING.set(1 if running else 0)
        metrics.CANARY_CANDIDATE_LOADED.set(
            1 if t is not None and self.candidate_engine(t.candidate) is not None else 0)
        if t is None:
            return
        s = t.summary(self.cfg)
        metrics.CANARY_TEST_VOTES.set(t.votes)
        metrics.CANARY_WIN_RATE.set(s["win_rate"] if s["win_rate"] is not None else float("nan"))
        metrics.CANARY_BOUND.labels(side="lower").set(s["lower"])
        metrics.CANARY_BOUND.labels(side="upper").set(s["upper"])
        metrics.CANARY_AGE.set(time.time() - t.started_at if running else 0)
        metrics.CANARY_BUDGET.set(self.cfg.max_hours * 3600)

    async def record_battle(self, t: CanaryTest) -> None:
        """A decided test goes on the leaderboard as users' verdicts (once: by whoever decided it)."""
        await loop_status.arecord(self.store.redis, loop_status.BATTLES,
                                  users_battle(t, await self.length_controlled_win_rate()))

    async def length_controlled_win_rate(self) -> float | None:
        """The current test's win rate at equal answer lengths (Bradley–Terry with the length difference
        as a covariate): users favour longer answers, so a candidate may win by length alone."""
        votes = await self.store.votes()
        if len(votes) < 2:
            return None
        s, a, b = (np.array(x, dtype=float) for x in zip(*votes))
        return round((await asyncio.to_thread(length_controlled, s, a, b))[0], 4)

    # --- admin ------------------------------------------------------------------------------
    async def status(self) -> dict:
        t = await self.store.current()
        out: dict = {"test": None, "history": [h.summary(self.cfg) for h in await self.store.history()],
                     "candidate_loaded": self.loaded_version(),
                     "load_error": self.load_error, "pair_share": self.cfg.pair_share}
        if t is not None:
            out["test"] = {**t.summary(self.cfg), "length_controlled_win_rate": await self.length_controlled_win_rate()}
        return out
