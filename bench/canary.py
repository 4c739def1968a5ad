"""The canary's promotion rule on its own (prints JSON): an anytime-valid confidence sequence over
cross-version votes (feedback/sequential.py), looked at after every vote, deciding promote / reject /
undecided at a vote budget. No engine: votes are drawn from a known true win rate, so the decision's
correctness, its speed and its type-I error are measured over many simulated tests.

Rows: A/A (candidate = incumbent: win rate ½, ties included) — how often it is wrongly promoted (target
≤ α/2, over ≥ 200 runs: the test is two-sided at α); better candidates (true win rate 0.60 and 0.65) and a
worse one (0.35), each with 10 % random votes — right decisions (target ≥ 95 %) and the median votes to a
decision. This is the statistics alone, as serving applies them (feedback/canary.py `decide`); the same
rule deciding the trainer's real versions from served answers is bench/canary_served.py.

Usage: python bench/canary.py [--runs 200] [--budget 1000] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

from feedback.sequential import ConfidenceSequence  # noqa: E402


def one_test(rng: random.Random, p_win: float, noise: float, budget: int, alpha: float, tie_share: float = 0.2):
    """Votes until the sequence decides or the budget is spent: (decision, votes)."""
    cs = ConfidenceSequence(alpha=alpha)
    for t in range(1, budget + 1):
        if rng.random() < noise:
            x = rng.choice((0.0, 0.5, 1.0))  # a careless user
        elif rng.random() < tie_share:
            x = 0.5
        else:  # decisive votes win this often, so that wins + ties/2 come to p_win overall
            x = 1.0 if rng.random() < (p_win - tie_share / 2) / (1 - tie_share) else 0.0
        cs.update(x)
        d = cs.decide(0.5)
        if d != "undecided":
            return ("promote" if d == "above" else "reject"), t
    return "undecided", budget


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.1, help="two-sided: each wrong direction at most alpha/2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = {}
    for name, p, noise, right in (("aa", 0.5, 0.0, None), ("better_0.60", 0.60, 0.1, "promote"),
                                  ("better_0.65", 0.65, 0.1, "promote"), ("worse_0.35", 0.35, 0.1, "reject")):
        outcomes = [one_test(rng, p, noise, args.budget, args.alpha) for _ in range(args.runs)]
        decided = [t for d, t in outcomes if d != "undecided"]
        row = {"runs": args.runs, "promoted": sum(d == "promote" for d, _ in outcomes),
               "rejected": sum(d == "reject" for d, _ in outcomes),
               "undecided": sum(d == "undecided" for d, _ in outcomes),
               "median_votes_to_decision": statistics.median(decided) if decided else None}
        if right:
            row["right_share"] = round(sum(d == right for d, _ in outcomes) / args.runs, 3)
        rows[name] = row
    aa = rows["aa"]
    result = {"alpha": args.alpha, "budget": args.budget, "rows": rows,
              "aa_promote_rate": round(aa["promoted"] / aa["runs"], 4),
              "targets": {"aa_promote_rate": f"<= alpha/2 = {args.alpha / 2}", "right_share": ">= 0.95"}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
