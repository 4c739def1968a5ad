"""Low-rank adapters (LoRA, Hu et al. 2021) on a causal LM's linear layers: the policy's trainable state.

W' = W + (α/r) · B A, with W frozen (the reference model's weights), A: [r, in] (small random), B: [out, r]
(zeros, so a fresh adapter is the reference exactly). Why adapters for the policy:
- the reference is the same module with the adapters switched off (`adapters_off`): no second copy;
- the trainer's state (adapter weights + AdamW moments, fp32) is ~1/30 of the model: it is kept
  across rounds and written into every checkpoint;
- serving gets full weights: `merged_state_dict` folds B A into W in fp32, then casts once;
- every version also carries its adapters in PEFT's LoRA format (`peft_adapter`: what `peft.PeftModel` and vLLM's
  runtime LoRA load), so other tools can read, merge or serve them. Duet's module, not peft's, trains them: the
  same formula (PEFT's scaling α/r, no dropout), with the reference as the same module switched off.

Parameter names of the wrapped layers are unchanged (`…q_proj.weight`), so a merged state dict loads as
the original architecture.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(y.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns the wrapped modules' names."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {targets} to adapt")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


@contextmanager
def adapters_off(model: nn.Module):
    """The reference model: the same weights with every adapter switched off."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in params if ".lora_" in k and k not in state]
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full weights with each adapter folded in (W + (α/r) B A in fp32, then one cast to `dtype`),
    under the original parameter names."""
    layers = lora_layers(model)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        owner = k.rsplit(".", 1)[0]
        if owner in layers and k.endswith(".weight"):
            v = v.float() + layers[owner].delta().to(v.device)
        out[k] = v.to(dtype).cpu().contiguous()
    return out


def peft_adapter(model: nn.Module, base_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapters as PEFT saves a LoRA model: (adapter_config.json's content, adapter_model.safetensors' tensors,
    fp32) — keys `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], scaling
    lora_alpha / r as here."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no adapters")
    first = next(iter(layers.values()))
    rank = first.lora_A.shape[0]
    tensors = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": first.scale * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}), "use_rslora": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    return config, tensors

