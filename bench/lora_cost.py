"""Duet's own LoRA module against peft's, on the trainer's policy step (prints JSON) — issue 26's condition for
training through peft: "unless it costs more than a few per cent of a round".

The policy at the defaults (SmolLM2-135M-Instruct, rank-16 adapters on q/k/v/o/gate/up/down, in the precision the
trainer picks on this CPU) and one micro-batch the size of an RLOO group (8 sequences: a 40-token prompt and a
96-token answer): median time of a forward pass without gradient and of a forward + backward pass, with Duet's
`trainer/lora.py` and with `peft.get_peft_model` (the same adapters copied in, so both compute the same: the
largest logit difference is reported too). On the cores `duet up` gives the trainer.

Usage: python bench/lora_cost.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import torch  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import on_trainer_cores, timed  # noqa: E402

from duet.wiring import policy_config  # noqa: E402
from trainer.lora import TARGETS, lora_layers  # noqa: E402
from trainer.policy import PolicyTrainer, load_causal_lm  # noqa: E402
from trainer.precision import autocast  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    s, cores, base = on_trainer_cores()
    cfg = policy_config(s)
    duet = PolicyTrainer(cfg, base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters (B is zero when fresh)
        for m in lora_layers(duet.model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    theirs = get_peft_model(load_causal_lm(base, duet.device, duet.bf16),
                            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                       target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    with torch.no_grad():  # the same adapters in both, fp32 as the trainer keeps them
        mine = lora_layers(duet.model)
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
                src = mine[name.removeprefix("base_model.model.")]
                module.lora_A["default"].to(torch.float32).weight.copy_(src.lora_A)
                module.lora_B["default"].to(torch.float32).weight.copy_(src.lora_B)
    ids = torch.randint(100, 40000, (8, 136), generator=g)

    def step(model, grad: bool) -> torch.Tensor:
        with autocast(duet.device, duet.bf16), torch.set_grad_enabled(grad):
            logits = model(input_ids=ids).logits
        if grad:
            logits.float().logsumexp(-1).sum().backward()
        return logits

    with torch.no_grad():
        diff = float((step(duet.model, False).float() - step(theirs, False).float()).abs().max())
    result = {"cores": list(cores), "precision": "bf16" if duet.bf16 else "fp32", "max_logit_difference": diff}
    for label, model in (("duet", duet.model), ("peft", theirs)):
        result[label] = {"forward_s": timed(lambda m=model: step(m, False), args.reps),
                         "forward_backward_s": timed(lambda m=model: step(m, True), args.reps)}
    result["peft_over_duet"] = {k: round(result["peft"][k] / result["duet"][k], 3) for k in result["duet"]}
    out = Path("bench/results/lora_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
