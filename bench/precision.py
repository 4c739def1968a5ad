"""bf16 autocast against fp32 for the trainer's policy step, on the cores `duet up` gives the trainer (prints JSON).

The policy at the defaults (SmolLM2-135M-Instruct + rank-16 LoRA adapters in fp32), one micro-batch the size of an
RLOO group (8 sequences: a 40-token prompt and a 96-token answer): the time of a forward pass without gradient (the
reference's log-probs) and of a forward + backward pass (an update), median of --reps, in each precision; and
whether this CPU has bf16 instructions (trainer/precision.py decides from that).

Usage: python bench/precision.py [--reps 5]
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

from trainer.policy import PolicyTrainer, Sample  # noqa: E402
from trainer.precision import cpu_flags, cpu_has_fast_bf16  # noqa: E402
from duet.wiring import policy_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    _, cores, base = on_trainer_cores()
    result = {"cores": list(cores), "cpu_bf16_instructions": cpu_has_fast_bf16(),
              "flags": sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f or f == "avx512f")}
    for precision in ("fp32", "bf16"):
        pt = PolicyTrainer(policy_config(precision=precision), base)
        g = torch.Generator().manual_seed(0)
        batch = [Sample(torch.randint(100, 40000, (40,), generator=g).tolist(),
                        torch.randint(100, 40000, (96,), generator=g).tolist(), "") for _ in range(8)]

        def forward(pt=pt):
            with torch.no_grad(), pt.reference():
                pt.token_logprobs(pt.model, batch)

        def update(pt=pt):
            logp, mask = pt.token_logprobs(pt.model, batch)
            (logp * mask).sum().backward()

        result[precision] = {"forward_s": timed(forward, args.reps), "forward_backward_s": timed(update, args.reps)}
        del pt
    result["bf16_speedup"] = {k: round(result["fp32"][k] / result["bf16"][k], 2) for k in result["fp32"]}
    out = Path("bench/results/precision.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
