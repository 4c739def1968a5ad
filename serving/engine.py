"""The engine interface the API talks to, and its vLLM implementation (AsyncLLM, in-process).

The API never sees vLLM types: it sends prompt token ids and sampling settings and receives
per-choice text deltas tagged with the model version that produced them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from feedback.contract.comparisons import SamplingSpec
from feedback.contract.registry import BASE_VERSION
from serving.adapters import Adapter

log = logging.getLogger(__name__)


@dataclass
class ChoiceDelta:
    index: int
    text: str
    new_tokens: int
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    token_ids: tuple[int, ...] = ()  # the new tokens themselves


@dataclass
class GenerationStep:
    deltas: list[ChoiceDelta]
    model_version: str  # version active when this step came out of the engine


class WeightsUnavailable(RuntimeError):
    """A version's weights could not be read; nothing was changed in the running engine."""


class EngineInputError(ValueError):
    """The engine refused a request's input (e.g. a token id outside the vocabulary): the caller's fault."""


class Engine(Protocol):
    model_version: str
    max_model_len: int

    def generate(
        self, prompt_token_ids: list[int], sampling: SamplingSpec, n: int, request_id: str
    ) -> AsyncIterator[GenerationStep]: ...

    async def abort(self, request_id: str) -> None: ...

    async def prompt_logprobs(self, token_ids: list[int], request_id: str) -> list[float]:
        """log π(token_t | tokens_<t) for t = 1 .. len − 1, by the weights being served."""
        ...

    async def load_weights(self, path: str, version: str) -> float:
        """Load `path` in place, return the generation pause in s; WeightsUnavailable if unreadable."""
        ...

    def num_unfinished(self) -> int: ...

    def shutdown(self) -> None: ...


class LoRAHost(Engine, Protocol):
    """An engine started with runtime LoRA: it also answers with an adapter on top of the weights it holds
    (serving/adapter_candidate.py serves a canary's candidate this way)."""

    def generate(
        self, prompt_token_ids: list[int], sampling: SamplingSpec, n: int, request_id: str,
        adapter: Adapter | None = None,
    ) -> AsyncIterator[GenerationStep]: ...

    async def prompt_logprobs(self, token_ids: list[int], request_id: str,
                              adapter: Adapter | None = None) -> list[float]: ...

    async def add_adapter(self, adapter: Adapter) -> None: ...

    async def remove_adapter(self, adapter: Adapter) -> None: ...


def prepare_cpu_env(kv_cache_gb: int, cache_root: str) -> None:
    """vLLM's CPU environment, set before vLLM is imported (it reads these at import / engine start)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
    # vLLM reserves a core for the front end by default; on 2 cores that costs ~25 % throughput.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", cache_root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


async def _input_errors(outputs):
    """vLLM's request outputs, with its input validation errors as EngineInputError."""
    from vllm.exceptions import VLLMValidationError

    try:
        async for out in outputs:
            yield out
    except VLLMValidationError as e:
        raise EngineInputError(str(e)) from None


def start_then_nice(nice: int, fn, *args):
    """`fn(*args)` — which starts processes — at this process's own priority; then every thread of each process it
    started is lowered by `nice` (Linux nice is per thread; threads started later inherit it). On one machine a
    candidate's engine then loads at full speed for a minute and afterwards only takes CPU time the incumbent's
    engine leaves. Started at nice 19 from the first, it never loaded: on the 2-core machine, with one user voting
    every ~4.7 s at the defaults, the candidate's engine had not finished loading after 14 minutes (bench/README,
    polite run) — the incumbent left it nothing. Processes this process starts meanwhile for other reasons would be
    lowered too; serving starts none during a canary load. No-op where /proc is missing."""
    if nice <= 0:
        return fn(*args)
    before = descendants(os.getpid())
    value = fn(*args)
    for pid in descendants(os.getpid()) - before:
        lower_priority(pid, nice)
    return value


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, ...), from /proc; empty where there is none."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def lower_priority(pid: int, nice: int) -> None:
    """Raise the nice value of every thread of `pid` by `nice` (at most 19); a thread or process gone is skipped."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:
            pass


class VLLMEngine:
    """vLLM's AsyncLLM behind the Engine interface. One per process."""

    def __init__(self, llm, model_path: str, max_model_len: int, max_lora_rank: int = 0) -> None:
        self._llm = llm
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank  # 0: started without runtime LoRA
        self.model_version = BASE_VERSION
        self._swap_lock = asyncio.Lock()

    @classmethod
    def start(
        cls,
        model_path: str,
        *,
        served_model_name: str,
        max_model_len: int,
        dtype: str,
        enforce_eager: bool,
        seed: int,
        kv_cache_gb: int,
        gpu_memory_utilization: float,
        cache_root: str,
        max_lora_rank: int = 0,
    ) -> VLLMEngine:
        """`max_lora_rank` > 0: with runtime LoRA, one adapter at a time up to that rank (on a CPU this also turns
        off vLLM's compilation for every request, adapter or not: serving/adapter_candidate.py)."""
        prepare_cpu_env(kv_cache_gb, cache_root)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        lora = dict(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank) if max_lora_rank else {}
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=served_model_name,
            max_model_len=max_model_len,
            dtype=dtype,
            enforce_eager=enforce_eager,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls="serving.worker_extension.DuetWorkerExtension",
            **lora,
        )
        llm = AsyncLLM.from_engine_args(args)
        return cls(llm, model_path, max_model_len, max_lora_rank)

    @staticmethod
    def _lora_request(adapter: Adapter | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=adapter.path)

    async def add_adapter(self, adapter: Adapter) -> None:
        """Load `adapter` into the engine now (else its first request would)."""
        if not self.max_lora_rank:
            raise RuntimeError("this engine was started without runtime LoRA")
        await self._llm.add_lora(self._lora_request(adapter))

    async def remove_adapter(self, adapter: Adapter) -> None:
        await self._llm.remove_lora(adapter.id)

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingSpec, n: int, request_id: str,
        adapter: Adapter | None = None,
    ) -> AsyncIterator[GenerationStep]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=sampling.stop or None,
            output_kind=RequestOutputKind.DELTA,
        )
        # AsyncLLM.generate aborts the request itself when this generator is closed or
        # cancelled (client gone), so no request outlives its HTTP connection.
        async for out in _input_errors(self._llm.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                                          request_id, lora_request=self._lora_request(adapter))):
            deltas = [
                ChoiceDelta(
                    index=c.index,
                    text=c.text,
                    new_tokens=len(c.token_ids),
                    finish_reason=c.finish_reason,
                    token_ids=tuple(c.token_ids),
                )
                for c in out.outputs
            ]
            yield GenerationStep(deltas=deltas, model_version=self.model_version)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def prompt_logprobs(self, token_ids: list[int], request_id: str,
                              adapter: Adapter | None = None) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.max_lora_rank:
            return await self._next_token_logprobs(token_ids, request_id, adapter)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)  # 0: only the actual token
        final = None
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=token_ids), params, request_id,
                                            lora_request=self._lora_request(adapter)):
            final = out
        per_position = final.prompt_logprobs  # [None, {token id: Logprob}, ...]
        return [per_position[t][token_ids[t]].logprob for t in range(1, len(token_ids))]

    async def _next_token_logprobs(self, token_ids: list[int], request_id: str,
                                   adapter: Adapter | None) -> list[float]:
        """`prompt_logprobs` on an engine with runtime LoRA: vLLM's prompt log-probs map LoRA per request, not per
        prompt token, once LoRA is enabled (vllm#16668, #29955: on its CPU backend the engine dies, for requests
        with or without an adapter). Instead each position is one request for one token, scored by
        `logprob_token_ids` from the raw logits (the same log-softmax); they share their prefix in one batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        async def one(t: int) -> float:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[token_ids[t]])
            final = None
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=token_ids[:t]), params,
                                                f"{request_id}-{t}", lora_request=self._lora_request(adapter)):
                final = out
            return final.outputs[0].logprobs[0][token_ids[t]].logprob

        return list(await asyncio.gather(*(one(t) for t in range(1, len(token_ids)))))

    async def stage_weights(self, path: str, timeout_s: float = 600.0) -> None:
        """Read `path`'s weights into memory inside the workers while generation goes on
        (serving/worker_extension.py). Raises WeightsUnavailable if they cannot be read."""
        t0 = time.perf_counter()
        await self._llm.collective_rpc("duet_start_staging", args=(path,))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = await self._llm.collective_rpc("duet_staging_status")
            if all(st == "ready" for st in states):
                log.info("staged %s in %.3f s", path, time.perf_counter() - t0)
                return
            if any(st not in ("running", "ready") for st in states):
                raise WeightsUnavailable(f"could not read the weights in {path}: {states[0]}")
            await asyncio.sleep(0.05)
        raise WeightsUnavailable(f"reading the weights in {path} took over {timeout_s:.0f} s")

    async def load_weights(self, path: str, version: str) -> float:
        """Swap weights in place (requests in flight are frozen, not dropped). Returns the pause in s.
        The weights are staged in memory first, so the pause covers the in-place load, not the disk read,
        and a version whose files cannot be read is refused before anything is paused: vLLM's in-place
        reload stops the engine for good when it fails half-way (its layers are left on the meta device)."""
        async with self._swap_lock:
            await self.stage_weights(path)
            t0 = time.perf_counter()
            await self._llm.pause_generation(mode="keep", clear_cache=True)
            try:
                reload_s = await self._llm.collective_rpc("duet_load_staged")
                # KV computed by the old weights must never be reused by the new ones.
                await self._llm.reset_prefix_cache()
                self.model_version = version
            finally:
                await self._llm.resume_generation()
            pause = time.perf_counter() - t0
            log.info("weights of %s loaded; generation paused %.3f s (in-place load %s s)", version, pause,
                     ", ".join(f"{x:.3f}" for x in reload_s))
            return pause

    def num_unfinished(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None  # idempotent
        if llm is not None:
            llm.shutdown()
