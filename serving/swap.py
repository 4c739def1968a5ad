"""Hot-swap: verify a published version, load it into the running engine, probe it, roll back on trouble.

Verification (in a thread, while the engine keeps serving): the version is a registry name (never a path),
the manifest's checksum matches the announcement, it carries probe log-probs, every file matches the manifest, the architecture and every tensor's shape match the
running model, and every value is finite. Only then is the engine paused, for the reload itself.
A request that spans a swap reports every version its tokens came from (`duet.model_versions`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from feedback import loop_status
from feedback.contract.comparisons import ChatMessage, SamplingSpec
from feedback.contract.probes import mean_abs_diff
from feedback.contract.registry import MANIFEST, Registry, sha256_file, verify, version_number
from serving import metrics
from serving.engine import BASE_VERSION, Engine, WeightsUnavailable
from serving.prompting import PromptBuilder

log = logging.getLogger(__name__)

SWAPS = Counter("duet_swaps_total", "Weight swaps, by result (ok, refused, rolled_back)", ["result"])
SWAP_SECONDS = Histogram("duet_swap_duration_seconds", "Verify + load + probe of one swap",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
LOGPROB_DIFF = Gauge("duet_swap_logprob_diff_nats", "After the last load, mean |log-prob the engine computes − the "
                     "one the trainer recorded| per probe token")
PAUSE_SECONDS = Histogram("duet_swap_pause_seconds", "Time generation was paused for a swap",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))

PROBE_PROMPTS = ["Say hello.", "What is 2 + 2?", "Name a colour."]
_ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "intermediate_size")


@dataclass
class SwapRecord:
    version: str
    result: str  # ok | refused | rolled_back
    reason: str = ""
    at: float = field(default_factory=time.time)
    seconds: float = 0.0  # verify + stage + pause + probe
    pause_s: float = 0.0
    live_s: float = 0.0  # from the start until the new weights answered requests (before the probe)
    logprob_diff: float | None = None  # engine vs trainer on the manifest's probe tokens (None: no probe)


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _nonfinite(folder: Path) -> str | None:
    import torch
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return k
    return None


class WeightSwapper:
    def __init__(self, engine: Engine, prompts: PromptBuilder, base_path: str, registry_root: Path,
                 probe_timeout_s: float = 30.0, status_redis=None, replica: str = "",
                 logprob_tolerance: float = 0.2) -> None:
        self.engine = engine
        self.prompts = prompts
        self.base_path = Path(base_path)
        self.registry = Registry(registry_root)
        self.probe_timeout_s = probe_timeout_s
        self.logprob_tolerance = logprob_tolerance
        self.status_redis = status_redis
        self.replica = replica or socket.gethostname()
        self.history: list[SwapRecord] = []
        self.paused = False  # admin freeze of automatic swaps
        self._lock = asyncio.Lock()
        self._base_shapes: dict[str, tuple[int, ...]] | None = None
        self._previous: list[str] = []  # versions to roll back to, newest last
        self._verified: dict[str, str] = {}  # version -> manifest sha256 that passed every check

    def path_of(self, version: str) -> Path:
        return self.base_path if version == BASE_VERSION else self.registry.root / version

    # --- verification (no engine involved) -------------------------------------------------
    def check(self, version: str, manifest_sha256: str | None = None) -> list[str]:
        if version == BASE_VERSION:
            return []
        if version_number(version) is None:  # a path ("../x/v000001", "/abs/v000001"): only registry names
            return [f"{version[:80]!r} is not a version name (v and 6 digits, a folder of {self.registry.root})"]
        folder = self.path_of(version)
        if not (folder / MANIFEST).exists():
            return [f"{version}: no such version in {self.registry.root}"]
        if manifest_sha256 and sha256_file(folder / MANIFEST) != manifest_sha256:
            return ["manifest checksum differs from the announcement"]
        problems = verify(folder)
        if problems:
            return problems
        if self.registry.show(version).probe is None:  # the post-swap check would have nothing to compare
            return [f"{version}: its manifest has no probe log-probs, so the engine's load cannot be checked"]
        mine, theirs = (json.loads((p / "config.json").read_text()) for p in (self.base_path, folder))
        for key in _ARCH_KEYS:
            if mine.get(key) != theirs.get(key):
                return [f"architecture differs: {key} {theirs.get(key)!r} != running {mine.get(key)!r}"]
        if self._base_shapes is None:
            self._base_shapes = _tensor_shapes(self.base_path)
        shapes = _tensor_shapes(folder)
        # tied embeddings may be saved with or without lm_head: compare the tensors both have
        bad = [k for k in shapes.keys() & self._base_shapes.keys() if shapes[k] != self._base_shapes[k]]
        missing = self._base_shapes.keys() - shapes.keys() - {"lm_head.weight"}
        if bad or missing:
            return [f"tensor shapes differ from the running model: {sorted(bad or missing)[:3]}"]
        name = _nonfinite(folder)
        return [f"non-finite values in {name}"] if name else []

    def check_once(self, version: str, manifest_sha256: str | None = None) -> list[str]:
        """`check`, remembered per version and manifest: rolling back or forth to a version verified
        before only re-hashes its manifest (the files it lists were checked against it)."""
        if version == BASE_VERSION:
            return []
        manifest = self.path_of(version) / MANIFEST
        if version_number(version) is None or not manifest.exists():
            return self.check(version, manifest_sha256)
        sha = sha256_file(manifest)
        if self._verified.get(version) == sha and manifest_sha256 in (None, sha):
            return []
        problems = self.check(version, manifest_sha256)
        if not problems:
            self._verified[version] = sha
        return problems

    # --- the swap ------------------------------------------------------------------------------
    async def activate(self, version: str, manifest_sha256: str | None = None, rollback_ok: bool = True) -> SwapRecord:
        previous = self.engine.model_version
        rec = await self._activate(version, manifest_sha256, rollback_ok)
        if self.status_redis is not None:  # the dashboard's swaps timeline
            await loop_status.arecord(self.status_redis, loop_status.SWAPS, loop_status.SwapStatus(
                version=version, previous=previous, result=rec.result, reason=rec.reason, seconds=rec.seconds,
                pause_s=rec.pause_s, replica=self.replica))
        return rec

    async def _activate(self, version: str, manifest_sha256: str | None, rollback_ok: bool) -> SwapRecord:
        async with self._lock:
            t0 = time.perf_counter()
            problems = await asyncio.to_thread(self.check_once, version, manifest_sha256)
            if problems:
                return self._record(SwapRecord(version, "refused", "; ".join(problems), seconds=time.perf_counter() - t0))
            previous = self.engine.model_version
            try:
                pause = await self.engine.load_weights(str(self.path_of(version)), version)
            except WeightsUnavailable as e:  # e.g. deleted since it was checked: nothing was changed
                return self._record(SwapRecord(version, "refused", str(e), seconds=time.perf_counter() - t0))
            PAUSE_SECONDS.observe(pause)
            metrics.set_model_version(version)
            t_probe = time.perf_counter()
            live = t_probe - t0
            healthy = not rollback_ok or await self.probe()
            diff = await self.logprob_diff(version) if healthy else None
            log.info("probe of %s: %s in %.3f s (log-prob diff %s)", version, "ok" if healthy else "FAILED",
                     time.perf_counter() - t_probe, diff)
            why = "health probe failed" if not healthy else (
                f"log-probs differ from the trainer's by {diff:.3f} nats/token (tolerance {self.logprob_tolerance})"
                if rollback_ok and diff is not None and not diff <= self.logprob_tolerance else "")
            if why:
                back_to, back = await self._roll_back(previous)
                return self._record(SwapRecord(version, "rolled_back", f"{why}; serving {back_to}",
                                               seconds=time.perf_counter() - t0, pause_s=pause + back, live_s=live,
                                               logprob_diff=diff))
            self._previous.append(previous)
            return self._record(SwapRecord(version, "ok", seconds=time.perf_counter() - t0, pause_s=pause,
                                           live_s=live, logprob_diff=diff))

    async def _roll_back(self, previous: str) -> tuple[str, float]:
        """Back to `previous`; to base if its files are gone (the registry keeps only the newest
        versions, so a long-lived replica's previous version may have been pruned)."""
        for target in dict.fromkeys((previous, BASE_VERSION)):
            try:
                back = await self.engine.load_weights(str(self.path_of(target)), target)
            except WeightsUnavailable as e:
                log.error("cannot roll back to %s: %s", target, e)
                continue
            PAUSE_SECONDS.observe(back)
            metrics.set_model_version(target)
            return target, back
        raise WeightsUnavailable(f"neither {previous} nor base can be read; still serving the failed candidate")

    async def probe(self) -> bool:
        """A few fixed prompts must give non-empty answers in time (run together: one engine batch)."""
        sampling = SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=8)

        async def answer(i: int, text: str) -> str:
            ids = self.prompts.token_ids([ChatMessage(role="user", content=text)])
            out = []
            async for step in self.engine.generate(ids, sampling, 1, f"probe-{time.time_ns()}-{i}"):
                out += [d.text for d in step.deltas]
            return "".join(out)

        try:
            async with asyncio.timeout(self.probe_timeout_s):
                answers = await asyncio.gather(*(answer(i, t) for i, t in enumerate(PROBE_PROMPTS)))
            return all(a.strip() for a in answers)
        except TimeoutError:
            return False

    async def logprob_diff(self, version: str) -> float | None:
        """Mean |engine − manifest| log-prob per probe token for `version`; None when its manifest has no probe
        (base, or a version published without one). NaN when the engine's log-probs are not finite."""
        manifest = self.registry.show(version) if version != BASE_VERSION else None
        if manifest is None or manifest.probe is None:
            return None
        got = await asyncio.gather(*(self.engine.prompt_logprobs(ids, f"logprobs-{time.time_ns()}-{i}")
                                     for i, ids in enumerate(manifest.probe.token_ids)))
        diff = mean_abs_diff(manifest.probe.logprobs, got)
        if diff == diff:  # not NaN
            LOGPROB_DIFF.set(diff)
        return diff

    def _record(self, rec: SwapRecord) -> SwapRecord:
        SWAPS.labels(result=rec.result).inc()
        SWAP_SECONDS.observe(rec.seconds)
        self.history.append(rec)
        del self.history[:-100]
        (log.info if rec.result == "ok" else log.warning)("swap to %s: %s %s", rec.version, rec.result, rec.reason)
        return rec

    def status(self) -> dict:
        latest = self.registry.latest()
        return {"current": self.engine.model_version, "latest_published": latest.name if latest else None,
                "updates_paused": self.paused, "history": [asdict(r) for r in self.history]}
