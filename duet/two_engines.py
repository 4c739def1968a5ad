"""DUET_CANARY=auto: users judge each new version wherever the canary's second engine fits beside the first.

Where the candidate is a LoRA adapter on the live engine (DUET_CANARY_CANDIDATE=adapter, the default on a GPU),
nothing more has to fit: users judge. Otherwise a canary test serves the candidate from a second vLLM engine
(serving/canary.py). On a CPU both engines hold
their weights and KV cache in the machine's memory, beside the trainer; on a GPU each engine takes
`gpu_memory_utilization` of the device, so two fit only if twice that does. Where they do not fit the canary is
off: a version goes live when the trainer's gate passes it (trainer/gate.py — non-inferiority against the live
version and base, with its stated error rates) and release checks, and `duet up` / `duet serve` say so.

Decided from the machine's total memory, not what is free now, so that every process of one `duet up` that
resolves "auto" on its own reaches the same answer (the supervisor resolves it once and hands it down anyway).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# the trainer shares a CPU machine's memory: its peak RSS through a round is 2.6 GB in bf16 and 4.1 GB in fp32
# (bench/trainer_round.py, since the output head is fed contiguous inputs; 6.3–8.4 GB before), plus a margin
TRAINER_RESERVE_GB = 5.0
STACK_GB = 1.5  # the rest of one `duet up` beside engines and trainer: the API process, relay, broker, supervisor
ENGINE_OVERHEAD_GB = 1.0  # a vLLM CPU engine's process beyond its weights and KV cache (torch, vLLM, buffers)
GPU_SHARE_LIMIT = 0.95  # two engines' gpu_memory_utilization together, with room for the CUDA contexts


@dataclass(frozen=True)
class CanaryChoice:
    mode: Literal["off", "users"]
    why: str


def choose_canary(requested: str, *, on_gpu: bool, weights_gb: float, kv_cache_gb: float,
                  gpu_memory_utilization: float, mem_total_gb: float, candidate: str = "engine") -> CanaryChoice:
    """What DUET_CANARY=`requested` means on this machine; "off" and "users" are taken as said. `candidate`:
    how a candidate is served (DUET_CANARY_CANDIDATE, resolved); as an adapter it needs no second engine."""
    if requested in ("off", "users"):
        return CanaryChoice(requested, "DUET_CANARY=" + requested)  # type: ignore[arg-type]
    if candidate == "adapter":
        return CanaryChoice("users", "the candidate is served as a LoRA adapter on the live engine: no second engine")
    if on_gpu:
        if 2 * gpu_memory_utilization <= GPU_SHARE_LIMIT:
            return CanaryChoice("users", f"two engines at gpu_memory_utilization {gpu_memory_utilization} fit one GPU")
        return CanaryChoice("off", f"two engines at gpu_memory_utilization {gpu_memory_utilization} do not fit one "
                                   f"GPU (set DUET_GPU_MEMORY_UTILIZATION ≤ {GPU_SHARE_LIMIT / 2:.2f} for canary tests)")
    need = 2 * (weights_gb + kv_cache_gb + ENGINE_OVERHEAD_GB) + TRAINER_RESERVE_GB + STACK_GB
    fits = need <= mem_total_gb
    return CanaryChoice("users" if fits else "off",
                        f"two engines and the trainer need ~{need:.1f} GB, this machine has {mem_total_gb:.1f} GB")


def mem_total_gb() -> float:
    """The machine's (or cgroup's, if lower) memory in GB."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total / 1e9


def weights_gb(model_dir: str | Path, dtype: str) -> float:
    """The model's weights as an engine holds them: float32 doubles a 16-bit checkpoint (an upper bound)."""
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return size * (2 if dtype in ("float32", "fp32") else 1) / 1e9
