"""Which precision the trainer computes in: bf16 where the hardware runs it fast, else fp32 — detected, never
assumed (this project's CPU machines have come with and without AVX-512 BF16 / AMX).

bf16 is only ever an autocast over the matrix products: trained parameters (LoRA adapters, the reward model)
and their AdamW moments stay fp32; the frozen base is held in bf16, its own dtype and what serving computes
with. On a CPU without bf16 instructions bf16 matmuls are emulated and slower than fp32, so fp32 is kept there.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch

from duet.cpus import cpu_has_fast_bf16

Precision = Literal["auto", "bf16", "fp32"]
def use_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    """bf16 autocast on CUDA, and on a CPU with bf16 instructions; fp32 otherwise (or as configured)."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
