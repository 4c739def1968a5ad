"""The eval gate's decision rule, measured (prints JSON): how often it passes a candidate whose true win rate
against the live version is 0.40 (target ≤ 5 %) and 0.55 (target ≥ 80 %), for a grid of gate prompt counts,
at the gate's defaults otherwise (trainer/gate.py `gate_decision`).

Simulated verdicts, no model: what the judges' verdicts look like to the rule. Per prompt a true win rate
p ~ w + N(0, 0.1) (candidates are better on some prompts than others), per answer pair an outcome (a tie with
probability 0.15 — the same seed gives the same answer often enough — else a win with the probability that
makes the mean p), and per judge that outcome or, with probability 0.3, an independent draw from the same
prompt (judges fitted on different resamples of the votes disagree). "True win rate" is the mean verdict.

With --served, the judges as served: the base model (at the defaults: SmolLM2) answers the gate prompts and
20 vote prompts 8 times each; judges are fitted (trainer/judge.py, as the gate fits them) on 200 votes by a
built-in rule (`--rule`, 10 % random votes) on the vote prompts' answers; then, per trial, candidate and live
answers to the 48 gate prompts are drawn from those answers so that the candidate's true win rate by the rule
is 0.40 or 0.55 (for each answer pair, the rule's better answer goes to the candidate with the probability
that makes the mean come out; ties stay ties), and the gate decides on the judges' verdicts.

Usage: python bench/gate.py [--trials 400] [--seed 0] [--served --rule engaging]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from trainer.gate import gate_decision  # noqa: E402
from duet.wiring import gate_config, policy_config  # noqa: E402


def simulated_verdicts(g: torch.Generator, w: float, prompts: int, samples: int, judges: int = 8,
                       tie: float = 0.15, prompt_sd: float = 0.1, judge_noise: float = 0.3) -> list[torch.Tensor]:
    out = []
    for _ in range(prompts):
        p = float((w + prompt_sd * torch.randn((), generator=g)).clamp(0.0, 1.0))
        win = min(1.0, max(0.0, (p - tie / 2) / (1 - tie)))

        def outcome(shape):
            u = torch.rand(shape, generator=g)
            return torch.where(u < tie, torch.tensor(0.5), (torch.rand(shape, generator=g) < win).float())

        shared = outcome((1, samples)).expand(judges, samples)
        own = outcome((judges, samples))
        out.append(torch.where(torch.rand((judges, samples), generator=g) < judge_noise, own, shared))
    return out


def served(args) -> dict:
    """The gate with real judges on real answers (see the module docstring)."""
    import random

    from duet.model_assets import resolve_model
    from duet.preferences import judge, load_rule
    from duet.settings import Settings
    from feedback.contract.comparisons import ChatMessage
    from trainer.examples import PromptGroup
    from trainer.gate import gate_answers, load_gate_prompts
    from trainer.judge import JudgeEnsemble, SentenceEncoder
    from trainer.policy import PolicyTrainer
    from trainer.reward_model import minilm_path
    from trainer.synthetic import TOPICS

    s, cfg, rule, rng = Settings(), gate_config(), load_rule(args.rule), random.Random(args.seed)
    pt = PolicyTrainer(policy_config(precision=s.trainer_precision), resolve_model(s.model, s.home))
    gate = [[ChatMessage(role="user", content=p)] for p in load_gate_prompts("", cfg.prompts)[:cfg.prompts]]
    voted = [[ChatMessage(role="user", content=f"Tell me about {t}.")] for t in TOPICS]
    pools = []
    for i in tqdm(range(0, len(gate) + len(voted), 8), desc="base answers (8 per prompt)", unit="8 prompts"):
        chunk = (gate + voted)[i:i + 8]
        pools += [[a.text for a in g] for g in gate_answers(pt, pt.model, chunk, gate_config(samples_per_prompt=8,
                                                                                            seed=args.seed + i))]
    gate_pools, vote_pools = pools[:len(gate)], pools[len(gate):]
    votes = []
    for n in range(200):
        j = rng.randrange(len(voted))
        a, b = rng.sample(vote_pools[j], 2)
        v = judge(rule, voted[j][-1].content, a, b, noise=0.1, rng=rng)
        votes.append(PromptGroup(comparison_id=f"c{n}", event_id=f"e{n}", messages=voted[j], answers=[a, b],
                                 pairs=[] if v == "tie" else [(0, 1) if v == "a" else (1, 0)],
                                 ties=[(0, 1)] if v == "tie" else [], open_ended=True))
    judges = JudgeEnsemble(SentenceEncoder(minilm_path()), seed=args.seed)
    judges.fit(votes)

    def verdict(prompt: str, a: str, b: str) -> float:
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[judge(rule, prompt, a, b)]

    pairs = [(p, rng.sample(pool, 2)) for p, pool in zip(gate, gate_pools)]
    tie = sum(verdict(p[-1].content, a, b) == 0.5 for p, (a, b) in pairs) / len(pairs)
    rows = []
    for w in (0.40, 0.55):
        q = min(1.0, max(0.0, (w - tie / 2) / (1 - tie)))  # P(the candidate gets the better answer | no tie)
        passed, true = 0, []
        for _ in tqdm(range(args.trials), desc=f"gate at true win rate {w}", unit="trial"):
            cand, live = [], []
            for p, pool in zip(gate, gate_pools):
                c_side, l_side = [], []
                for _ in range(cfg.samples_per_prompt):
                    a, b = rng.sample(pool, 2)
                    better, worse = (a, b) if verdict(p[-1].content, a, b) >= 0.5 else (b, a)
                    c, o = (better, worse) if rng.random() < q else (worse, better)
                    c_side.append(c)
                    l_side.append(o)
                    true.append(verdict(p[-1].content, c, o))
                cand.append(c_side)
                live.append(l_side)
            v = [judges.prefer(p, c, o) for p, c, o in zip(gate, cand, live)]
            passed += gate_decision(v, cfg)[0]
        rows.append({"true_win_rate": w, "realised_true_win_rate": round(sum(true) / len(true), 3),
                     "pass_rate": round(passed / args.trials, 3)})
    return {"rule": args.rule, "judge_votes": len(votes), "tie_share": round(tie, 3), "rows": rows,
            "targets_met": rows[0]["pass_rate"] <= 0.05 and rows[1]["pass_rate"] >= 0.80}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="16,32,48,64")
    ap.add_argument("--served", action="store_true", help="the judges as served, on the base model's answers")
    ap.add_argument("--rule", default="engaging")
    args = ap.parse_args()
    if args.served:
        print(json.dumps(served(args), indent=2))
        return
    cfg = gate_config()
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    grid = [(n, w) for n in map(int, args.prompts.split(",")) for w in (0.40, 0.50, 0.55, 0.60)]
    for n, w in tqdm(grid, desc="gate decisions", unit="cell"):
        passed = sum(gate_decision(simulated_verdicts(g, w, n, cfg.samples_per_prompt), cfg)[0]
                     for _ in range(args.trials))
        rows.append({"prompts": n, "samples_per_prompt": cfg.samples_per_prompt, "true_win_rate": w,
                     "pass_rate": round(passed / args.trials, 3)})
    at = {(r["prompts"], r["true_win_rate"]): r["pass_rate"] for r in rows}
    n = cfg.prompts
    print(json.dumps({
        "rule": f"pass iff the one-sided {1 - cfg.alpha:.0%} lower bound of the win rate >= {cfg.min_win_rate}",
        "trials": args.trials, "rows": rows,
        "at_defaults": {"prompts": n, "pass_at_0.40": at.get((n, 0.40)), "pass_at_0.55": at.get((n, 0.55))},
        "targets": {"pass_at_0.40": "<= 0.05", "pass_at_0.55": ">= 0.80"},
        "targets_met": (at.get((n, 0.40), 1) <= 0.05 and at.get((n, 0.55), 0) >= 0.80),
    }, indent=2))


if __name__ == "__main__":
    main()
