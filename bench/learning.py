"""Does the served model get better from votes at the defaults a user gets? (prints JSON, draws a plot)

Starts `duet up` with no settings but a fresh home, port and Redis database, then runs `duet simulate`:
simulated users chat with pairs forced and vote by a built-in rule (`shorter`, `keyword`, `polite`, `engaging`)
with 10 % random votes, paced to spread --votes over --minutes, asking for --max-tokens (96 by default: answers
of a realistic length, not 48). Reported per run:
- votes, minutes (voting; and the whole run including start-up and evaluations);
- the blind win rate of the live version against base on held-out topics, judged by the same rule without
  noise, with the prompt-clustered bootstrap 95 % interval;
- the A/A run: base against base (two independent samplings, same evaluation) at the start; its interval
  should contain 0.5;
- the reward model's held-out accuracy; policy rounds published / refused (from the dashboard API).
Targets (issue 22): win rate >= 0.80 with lower bound >= 0.60 within 500 votes (reported: the votes and minutes
at the first evaluation that met it); `shorter` >= 0.70 after <= 150 votes; the first version live <= 64 votes
after the first.
With `--feedback thumbs|edits|mixed` users rate, edit or mix instead of picking (`duet simulate --feedback`);
issue 17's targets: thumbs only >= 0.70 within 500 ratings and 30 minutes; mixed at least as fast as pairs.

Usage: python bench/learning.py --rule shorter --seed 0 [--feedback pairs] [--minutes 30] [--votes 500] [--set NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import httpx  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server, up_at_defaults  # noqa: E402

from duet.processes import stop_process  # noqa: E402

REDIS_DB = 11  # not the tests' databases


def dashboard(url: str, key: str) -> dict:
    return httpx.get(f"{url}/v1/dashboard?hours=720", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()


def canary_tests(url: str, admin_key: str) -> list[dict]:
    """Users' tests of each version, oldest first (GET /admin/canary): who was promoted, rejected or superseded,
    after how many cross-version votes and minutes. Empty when users did not judge (DUET_CANARY off)."""
    r = httpx.get(f"{url}/admin/canary", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    if r.status_code != 200:
        return []
    body = r.json()
    tests = list(reversed(body.get("history") or [])) + ([body["test"]] if body.get("test") else [])
    return [{"candidate": x["candidate"], "incumbent": x["incumbent"], "status": x["status"], "reason": x["reason"],
             "votes": x["votes"], "win_rate": x["win_rate"], "lower": x["lower"], "upper": x["upper"],
             "minutes": round(((x.get("decided_at") or time.time()) - x["started_at"]) / 60, 1)} for x in tests]


def worse_than_predecessor(curve: list[dict]) -> list[str]:
    """Live versions whose measured win rate against base (by the rule, held-out prompts) fell below the one they
    replaced: the upper end of their interval under the predecessor's estimate."""
    out, last = [], None
    for p in curve:
        if last is not None and p["model_version"] != last["model_version"] and p["win_rate"] is not None \
                and last["win_rate"] is not None and p["ci_high"] < last["win_rate"]:
            out.append(p["model_version"])
        last = p
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="shorter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--votes", type=int, default=500)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--feedback", default="pairs", choices=("pairs", "thumbs", "edits", "mixed"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop voting once the target (0.80, lower bound 0.60) is measured: for second seeds")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting off its default, as DUET_<NAME> (ablations only: the targets are at the defaults)")
    args = ap.parse_args()
    changed = dict(kv.split("=", 1) for kv in args.set)

    home, url, _, env = up_at_defaults("duet-learning-", REDIS_DB,
                                       **{f"DUET_{k.upper()}": v for k, v in changed.items()})
    me = [sys.executable, "-m", "duet.cli"]
    t0 = time.time()
    up = start_server(me + ["up"], env, url, home / "up.log", timeout_s=900)
    try:
        sim_dir = home / "simulation"
        sim = subprocess.run(me + ["simulate", "--rule", args.rule, "--feedback", args.feedback,
                                   "--seed", str(args.seed), "--noise", str(args.noise),
                                   "--votes", str(args.votes), "--minutes", str(args.minutes),
                                   "--eval-every", str(args.eval_every), "--max-tokens", str(args.max_tokens),
                                   # paced so the votes span the run, as users' votes would (unpaced, a CPU
                                   # serves 500 pairs in a few minutes, before any training could happen)
                                   "--rate", str(args.votes / (args.minutes * 60)),
                                   "--url", url, "--out", str(sim_dir)]
                             + (["--stop-at", "0.8", "0.6"] if args.stop_at_target else []), env=env)
        if sim.returncode != 0:
            raise SystemExit(f"duet simulate failed; logs under {home}")
        res = json.loads((sim_dir / "result.json").read_text())
        dev_key = (home / "dev_key").read_text().strip() if (home / "dev_key").exists() else ""
        board = dashboard(url, dev_key)
        canary = canary_tests(url, (home / "admin_key").read_text().strip()) if (home / "admin_key").exists() else []
    finally:
        stop_process(up, timeout=120)  # SIGTERM: duet up stops its children in order
    rounds = board.get("rounds", [])
    final, aa = res["final"], res["curve"][0]
    voting = [p for p in res["curve"] if p["votes"] > 0]
    met = next((p for p in voting if p["win_rate"] is not None and p["win_rate"] >= 0.8 and p["ci_low"] >= 0.6), None)
    at_70 = next((p for p in voting if p["win_rate"] is not None and p["win_rate"] >= 0.7), None)
    result = {
        "rule": args.rule, "feedback": args.feedback, "seed": args.seed, "noise": args.noise, "settings": changed or "defaults",
        "stopped_at_target": args.stop_at_target,
        "max_tokens": args.max_tokens,
        "target_met_at": {"votes": met["votes"], "minutes": round((met["seconds"] - aa["seconds"]) / 60, 1)} if met else None,
        "win_rate_0_7_at_votes": at_70["votes"] if at_70 else None,
        "votes": res["votes_cast"], "by_kind": res.get("by_kind"), "thumbs_bar": res.get("thumbs_bar"),
        "votes_failed": res["votes_failed"],
        "voting_minutes": round((voting[-1]["seconds"] - aa["seconds"]) / 60, 1) if voting else 0.0,
        "run_minutes": round((time.time() - t0) / 60, 1),
        "live_version": final["model_version"], "versions_seen": res["versions_seen"],
        "win_rate": final["win_rate"], "ci": [final["ci_low"], final["ci_high"]],
        "aa_win_rate": aa["win_rate"], "aa_ci": [aa["ci_low"], aa["ci_high"]],
        "aa_contains_half": aa["ci_low"] <= 0.5 <= aa["ci_high"],
        "rm_held_out_accuracy": final["rm_accuracy"],
        "rounds_published": sum(r.get("result") == "published" for r in rounds),
        "rounds_refused": sum(r.get("result") == "rejected" for r in rounds),
        "round_reasons": [r.get("reasons") for r in rounds if r.get("result") != "published"],
        "target_met": final["win_rate"] is not None and (
            final["win_rate"] >= 0.7 if args.feedback == "thumbs"
            else final["win_rate"] >= 0.8 and final["ci_low"] >= 0.6),
        "first_version_at_votes": res.get("first_version_at_votes"),
        "rounds_held": sum(r.get("result") == "held" for r in rounds),
        "canary_tests": canary,  # users judging each version (DUET_CANARY=auto: on where two engines fit)
        "promoted_worse_than_predecessor": worse_than_predecessor(res["curve"]),
        "curve": [{k: p[k] for k in ("votes", "seconds", "model_version", "win_rate", "ci_low", "ci_high")}
                  for p in res["curve"]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"learning-{args.rule}-seed{args.seed}" + ("" if args.feedback == "pairs" else f"-{args.feedback}") + (
        "" if args.max_tokens == 96 else f"-{args.max_tokens}tok")
    shutil.copy(res["plot"], out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    shutil.copytree(home / "runs", out / f"{stem}-logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.aof*"))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
