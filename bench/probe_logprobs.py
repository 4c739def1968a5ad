"""How far apart are the trainer's and the serving engine's log-probs of the same weights? (prints JSON)

What DUET_SWAP_LOGPROB_TOLERANCE is set from: the trainer computes the probe log-probs of a version from
its exported files (fp32 on CPU, bf16 on CUDA: trainer/probe.py); serving computes them through vLLM
(bf16 here). Both on the default model's own weights, so any difference is arithmetic, not weights;
also reported: the same against a manifest made from other weights (the base with its last layer's MLP
scaled), the kind of gap a silent load bug shows.

Usage: python bench/probe_logprobs.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import feedback  # noqa: E402,F401  (the package, before bench/ could shadow it)
from duet.wiring import policy_config  # noqa: E402


def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from duet.model_assets import resolve_model
    from duet.settings import Settings
    from feedback.contract.probes import mean_abs_diff
    from duet.wiring import engine_config
    from serving.app import vllm_engine_factory
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    s = Settings()
    model = resolve_model(s.model, s.home)
    pt = PolicyTrainer(policy_config(), model)
    same = probe_logprobs(pt, Path(model))
    other_dir = Path(tempfile.mkdtemp(prefix="duet-probe-"))
    for f in Path(model).iterdir():
        if f.is_file():
            shutil.copy(f, other_dir / f.name)
    weights = load_file(str(other_dir / "model.safetensors"))
    last = max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
    key = f"model.layers.{last}.mlp.down_proj.weight"
    weights[key] = (weights[key].float() * 1.5).to(weights[key].dtype)
    save_file(weights, str(other_dir / "model.safetensors"), metadata={"format": "pt"})
    other = probe_logprobs(pt, other_dir)
    del pt

    engine = vllm_engine_factory(engine_config(s), model)
    try:
        async def served(ids_list):
            return await asyncio.gather(*(engine.prompt_logprobs(ids, f"p{i}") for i, ids in enumerate(ids_list)))
        got = asyncio.run(served(same.token_ids))
    finally:
        engine.shutdown()
    flat = [abs(a - b) for es, gs in zip(same.logprobs, got) for a, b in zip(es, gs)]
    result = {"model": model, "tokens": len(flat), "trainer_device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
              "same_weights": {"mean_abs_diff": round(mean_abs_diff(same.logprobs, got), 4),
                               "max_abs_diff": round(max(flat), 4)},
              "other_weights_manifest": {"mean_abs_diff": round(mean_abs_diff(other.logprobs, got), 4),
                                         "changed": f"{key} x1.5"},
              "default_tolerance": s.swap_logprob_tolerance}
    print(json.dumps(result, indent=2))
    shutil.rmtree(other_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
