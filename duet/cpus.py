"""How serving and the trainer share one machine's CPU cores.

On one machine (`duet up`) the engine and the trainer would otherwise run their thread pools on the same cores:
OpenMP workers that spin while they wait, in two processes, make each other wait. Measured on the 2-core
machine (bench/trainer_round.py, bench/README.md): a policy round took 18x longer while one user was chatting
than when idle, with the trainer niced; disjoint cores keep each side at its own speed. So `duet up` splits the
cores it may use into two disjoint sets — serving (API, engine(s), relay) and the trainer — and each process
pins itself at start: serving through `VLLM_CPU_OMP_THREADS_BIND` and its affinity, the trainer through its
affinity and torch's intra-op thread count. The canary's second engine runs on serving's cores at a raised
nice value (DUET_CANARY_ENGINE_NICE), so it only takes what the incumbent leaves.

Settings: DUET_CPU_SPLIT=auto|off, DUET_SERVING_CPUS and DUET_TRAINER_CPUS ("0", "2-5,7"; empty = every
core this process may use). A GPU host needs few CPU cores for either side; the split still keeps the
trainer's data work off serving's cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from duet.settings import parse_cpus  # noqa: F401  (the settings' CPU-list format)


def engine_dtype(requested: str, on_gpu: bool, flags: frozenset[str] | None = None) -> str:
    """The dtype vLLM serves in. "auto" keeps the model's own (bf16 for the default model) on a GPU and on a CPU
    with bf16 instructions, and serves float32 on a CPU without them: measured on an AVX2-only 2-core machine
    with SmolLM2-135M on one core, bf16 gave 15.9 tok/s alone and 20.4 with 4 requests, float32 19.8 and 47.6."""
    from trainer.precision import cpu_has_fast_bf16  # the same fact decides the trainer's precision

    if requested != "auto" or on_gpu or cpu_has_fast_bf16(flags):
        return requested
    return "float32"


def format_cpus(cpus: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class CoreSplit:
    serving: tuple[int, ...]
    trainer: tuple[int, ...]

    @property
    def disjoint(self) -> bool:
        return not set(self.serving) & set(self.trainer)


def plan_split(available: tuple[int, ...], serving: str = "", trainer: str = "") -> CoreSplit:
    """Serving's and the trainer's cores. Explicit lists are kept; a side left empty gets what the other leaves
    (or, with both empty, serving the first half rounded up and the trainer the rest). One core: both share it."""
    avail = tuple(sorted(available))
    s, t = parse_cpus(serving), parse_cpus(trainer)
    outside = sorted((set(s) | set(t)) - set(avail))
    if outside:
        raise ValueError(f"CPU {outside[0]} is not available to this process (available: {format_cpus(avail)})")
    if len(avail) < 2 and not (s or t):
        return CoreSplit(avail, avail)
    if not s and not t:
        half = (len(avail) + 1) // 2
        return CoreSplit(avail[:half], avail[half:])
    if not s:
        s = tuple(c for c in avail if c not in t) or avail
    if not t:
        t = tuple(c for c in avail if c not in s) or avail
    return CoreSplit(s, t)


def pin_serving(cpus: tuple[int, ...]) -> None:
    """Before vLLM starts: the engine's OpenMP threads (one per core, bound) and this process tree on `cpus`."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = format_cpus(cpus)
    os.sched_setaffinity(0, cpus)


def rank_cpus(cpus: tuple[int, ...], local_rank: int, local_ranks: int) -> tuple[int, ...]:
    """A trainer rank's share of the trainer's cores (round-robin); with fewer cores than ranks, they share."""
    share = tuple(sorted(cpus))[local_rank::local_ranks]
    return share or tuple(sorted(cpus))


def pin_trainer(cpus: tuple[int, ...]) -> None:
    """This process on `cpus`, with one torch intra-op thread per core."""
    import torch

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
