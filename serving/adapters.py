"""A version as a runtime LoRA adapter on an engine that holds another version's merged weights.

Every version Duet publishes is the base plus LoRA adapters (feedback/contract/registry.py: `adapter/`, PEFT's
format), and the trainer continues from the live version, so each version's update is W_v = W_base + s_v B_v A_v
with its own B_v, A_v (s = lora_alpha / r). An engine serving the incumbent holds W_base + s_i B_i A_i merged; the
candidate is then that plus the difference, which is itself an adapter, exactly:

    ΔW = s_c B_c A_c − s_i B_i A_i = [s_c B_c | −s_i B_i] · [A_c ; A_i]        (rank r_c + r_i, scaling 1)

So a candidate is served on the incumbent's engine by one adapter of twice the training rank, with no second
engine; against base it is the candidate's own adapter. The engine's merged incumbent is rounded to its dtype
once, the adapter's product is not: serving checks the result against the trainer's probe log-probs like any
swap (serving/adapter_candidate.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from feedback.contract.registry import ADAPTER_DIR

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# vLLM's engine takes adapters up to a rank fixed at start, one of these (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterUnavailable(ValueError):
    """A version's adapter is missing, unreadable or does not fit the other side's; nothing was loaded."""


@dataclass(frozen=True)
class Adapter:
    """What an engine needs to serve a LoRA adapter. `name` and `id` are new for every adapter an engine loads:
    vLLM keys its prefix cache by the adapter's name and path, and an adapter reloaded under an old name has
    served the KV cache of the one before (vllm#42125)."""
    name: str
    id: int  # > 0, unique within one engine
    path: str  # a PEFT folder


def engine_lora_rank(training_rank: int) -> int:
    """The rank an engine must accept to serve a candidate on an incumbent: 2 × the training rank, rounded up
    to a rank vLLM takes."""
    need = 2 * training_rank
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ValueError(f"LoRA rank {training_rank} needs an engine rank of {need}, above vLLM's largest "
                     f"({VLLM_LORA_RANKS[-1]})")


def _read(version_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    folder = version_dir / ADAPTER_DIR
    try:
        cfg = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as e:
        raise AdapterUnavailable(f"{version_dir.name} has no readable adapter ({type(e).__name__}: {e})") from None
    if (cfg.get("peft_type") != "LORA" or cfg.get("use_rslora") or not cfg.get("r")
            or cfg.get("rank_pattern") or cfg.get("alpha_pattern")):  # one scaling for every layer, or refuse
        raise AdapterUnavailable(f"{version_dir.name}: not a plain LoRA adapter")
    return cfg, tensors


def _modules(tensors: dict) -> dict[str, tuple]:
    """module prefix -> (A [r, in], B [out, r])"""
    out = {}
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            prefix = k[: -len(".lora_A.weight")]
            b = tensors.get(prefix + ".lora_B.weight")
            if b is None:
                raise AdapterUnavailable(f"{prefix}: lora_A without lora_B")
            out[prefix] = (a.float(), b.float())
    return out


def write_delta(candidate_dir: Path, incumbent_dir: Path | None, out: Path) -> int:
    """Write into `out` the PEFT adapter that turns the incumbent's merged weights into the candidate's (module
    docstring); `incumbent_dir` None: the incumbent is base, and the adapter is the candidate's own (its scaling
    folded into B). Returns its rank. AdapterUnavailable if either side has no adapter or their layers differ."""
    import torch
    from safetensors.torch import save_file

    cfg_c, t_c = _read(candidate_dir)
    mods_c = _modules(t_c)
    s_c = cfg_c["lora_alpha"] / cfg_c["r"]
    mods_i, s_i = {}, 0.0
    if incumbent_dir is not None:
        cfg_i, t_i = _read(incumbent_dir)
        mods_i, s_i = _modules(t_i), cfg_i["lora_alpha"] / cfg_i["r"]
        if mods_i.keys() != mods_c.keys():
            raise AdapterUnavailable(f"{candidate_dir.name} and {incumbent_dir.name} adapt different layers")
    tensors = {}
    rank = None
    for prefix, (a_c, b_c) in mods_c.items():
        a, b = a_c, s_c * b_c
        if prefix in mods_i:
            a_i, b_i = mods_i[prefix]
            if a_i.shape[1] != a_c.shape[1] or b_i.shape[0] != b_c.shape[0]:
                raise AdapterUnavailable(f"{prefix}: shapes differ between the two versions")
            a, b = torch.cat([a_c, a_i], 0), torch.cat([b, -s_i * b_i], 1)
        if rank not in (None, a.shape[0]):
            raise AdapterUnavailable(f"{candidate_dir.name}: layers have different ranks")
        rank = a.shape[0]
        tensors[prefix + ".lora_A.weight"] = a.contiguous()
        tensors[prefix + ".lora_B.weight"] = b.contiguous()
    if rank is None:
        raise AdapterUnavailable(f"{candidate_dir.name}: its adapter has no layers")
    cfg = {**cfg_c, "r": rank, "lora_alpha": float(rank), "use_rslora": False, "rank_pattern": {},
           "alpha_pattern": {}}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(cfg, indent=2))
    return rank
