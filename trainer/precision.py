"""Which precision the trainer computes in: bf16 where the hardware runs it fast, else fp32 — detected, never
assumed (this project's CPU machines have come with and without AVX-512 BF16 / AMX).

bf16 is only ever an autocast over the matrix products: trained parameters (LoRA adapters, the reward model)
and their AdamW moments stay fp32; the frozen base is held in bf16, its own dtype and what serving computes
with. On a CPU without bf16 instructions bf16 matmuls are emulated and slower than fp32, so fp32 is kept there.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags for native bf16 dot products / tiles


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo); empty where it does not."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 products natively; without it they are emulated, slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


Precision = Literal["auto", "bf16", "fp32"]
def use_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    """bf16 autocast on CUDA, and on a CPU with bf16 instructions; fp32 otherwise (or as configured)."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class ContiguousHead(torch.nn.Module):
    """A model's output projection (`lm_head`), fed a contiguous input; the same weight (tied or not), the same
    parameter name. On CPU, torch 2.13's bf16 matmul of a frozen weight and a *non-contiguous* 3-D input — what
    `logits_to_keep` slices from the hidden states, in generate's prefill and in the trainer's log-prob passes —
    materialises the weight once per batch row: 1.7 GB for 32 rows through SmolLM2's 49k × 576 head (fp32 and a
    trainable weight do not; a contiguous copy of the slice costs kilobytes). That was the trainer's peak memory
    (8.3 GB sampling 128 sequences)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.contiguous(), self.weight, self.bias)


def contiguous_head(model: torch.nn.Module) -> None:
    """Wrap `model`'s output projection in `ContiguousHead` (in place; idempotent)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:  # not a subclass (a quantized head): its own forward is kept
        model.set_output_embeddings(ContiguousHead(head))
