"""Users judge new versions, end to end at the defaults (prints JSON; issue 16): `duet up` with
DUET_CANARY=users and nothing else set (SmolLM2-135M-Instruct, the trainer at its defaults), and
`duet simulate` users voting on forced pairs by a rule with 10 % random votes. The trainer publishes
candidates from their votes; each goes into a canary test that the same users decide through the blind
cross-version share of their pairs (DUET_CANARY_PAIR_SHARE, 0.5).

Reported per decided test: the decision and its reason, cross-version votes and minutes to it, and
whether it was right. "Right" is judged afterwards from every cross-version pair the users were shown
(the comparison records in Redis): the rule without noise picks between the candidate's and the
incumbent's answer, giving the candidate's true win rate on what users saw, with a bootstrap interval.
A promotion is right if that interval is above ½, a rejection if it is below; when it contains ½ the
two versions are too close to call with these pairs, and either decision is counted as acceptable.
The statistics alone, over thousands of simulated tests, are in bench/canary.py.

With --worse-candidate F (issue 23: a deliberately worse candidate is rejected by users), a version built worse
by construction is published and announced as soon as `duet up` is ready, before any vote: the base weights
with the end-of-turn token's embedding scaled by F (< 1; the model's output layer is tied to it, so the
answer's end gets less likely and answers run on: worse under `shorter`, and a different model under any
rule). It carries the trainer's probe log-probs, so serving checks it like any version. Reported:
`worse_candidate` (its test: status, votes, minutes; how much longer its answers were) and whether it was ever
promoted (target: never). A run of `--votes 200 --minutes 12` is enough for it to be decided.

Usage: python bench/canary_served.py --rule shorter --seed 0 [--minutes 30] [--votes 600] [--worse-candidate 0.6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import httpx  # noqa: E402
import redis  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)
from duet.preferences import judge, load_rule  # noqa: E402
from duet.processes import stop_process  # noqa: E402
from feedback.arena import bootstrap_win_rate  # noqa: E402
from feedback.contract.comparisons import PendingComparison  # noqa: E402
from feedback.contract.redis_keys import COMPARISON_PREFIX  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server, up_at_defaults  # noqa: E402
from duet.wiring import policy_config  # noqa: E402

REDIS_DB = 11  # not the tests' databases


def cross_pairs(r: redis.Redis) -> list[PendingComparison]:
    """Every comparison record whose answers came from two versions (the canary's blind pairs)."""
    out = []
    for key in r.scan_iter(f"{COMPARISON_PREFIX}cmp_*", count=500):
        raw = r.get(key)
        if raw is None:
            continue
        rec = PendingComparison.model_validate_json(raw)
        if len({a.model_version for a in rec.answers}) == 2:
            out.append(rec)
    return out


def true_win_rates(pairs: list[PendingComparison], tests: list[dict], rule) -> dict[tuple[str, str], dict]:
    """Per test (candidate, incumbent): the rule's noise-free verdicts on the cross pairs users were shown,
    and what they say of the candidate: "better" (interval above ½), "worse" (below) or "close"."""
    by_versions = {frozenset((t["candidate"], t["incumbent"])): (t["candidate"], t["incumbent"]) for t in tests}
    tallies: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"a": 0, "tie": 0, "b": 0})
    for rec in pairs:
        texts = {a.model_version: a.text for a in rec.answers}
        test = by_versions.get(frozenset(texts))
        if test is not None:  # a = the candidate's answer, b = the incumbent's
            tallies[test][judge(rule, rec.messages[-1].content, texts[test[0]], texts[test[1]])] += 1
    out = {}
    for test, c in tallies.items():
        rate, lo, hi = bootstrap_win_rate(c["a"], c["tie"], c["b"])
        out[test] = {"pairs": sum(c.values()), "wins": c["a"], "ties": c["tie"], "losses": c["b"],
                     "win_rate": rate, "ci": [lo, hi],
                     "candidate_is": "better" if lo > 0.5 else "worse" if hi < 0.5 else "close"}
    return out


def screenshot_panel(url: str, key: str, path: Path) -> None:
    """The dashboard's canary card, for people to look at (skipped without Debian's Chromium)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        return
    from playwright.sync_api import sync_playwright

    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/dashboard#key={key}")
        page.locator("#canary-card svg").wait_for()
        page.locator("#canary-card").screenshot(path=path)
        browser.close()


def publish_worse_candidate(home: Path, factor: float, bootstrap: str) -> str:
    """The base with its end-of-turn embedding × factor, published with probe log-probs and announced."""
    import torch
    from kafka import KafkaProducer
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from duet.model_assets import resolve_model
    from duet.settings import Settings
    from feedback.contract.events import WeightsAnnouncement
    from feedback.contract.registry import MANIFEST, Registry, manifest_checksum
    from feedback.contract.topics import WEIGHTS
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    base = Path(resolve_model(Settings().model, home))
    eos = AutoConfig.from_pretrained(base).eos_token_id
    built = home / "worse-candidate"
    shutil.copytree(base, built)
    for f in built.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                t[eos] = (t[eos].float() * factor).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    torch.manual_seed(0)
    probe = probe_logprobs(PolicyTrainer(policy_config(), str(built)), built)

    def write(folder: Path) -> None:
        for f in built.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    manifest, folder = Registry(Settings(home=home).registry_root()).publish(
        write, base_model=str(base), algorithm=f"worse-by-construction (end-of-turn embedding x {factor})",
        hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={}, probe=probe)
    ann = WeightsAnnouncement(version=manifest.version, name=manifest.name, manifest_location=str(folder / MANIFEST),
                              manifest_sha256=manifest_checksum(folder))
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(WEIGHTS, value=ann.model_dump_json().encode()).get(30)
    producer.close()
    return manifest.name


def broker_of(up_log: Path) -> str:
    """The embedded broker's address, as `duet up` printed it."""
    for line in up_log.read_text().splitlines():
        if line.startswith("duet: broker"):
            return line.split()[2]
    raise SystemExit(f"no broker address in {up_log}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="shorter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--votes", type=int, default=600)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--worse-candidate", type=float, default=None, metavar="F",
                    help="publish the base with its end-of-turn embedding x F before any vote")
    args = ap.parse_args()

    home, url, redis_url, env = up_at_defaults("duet-canary-", REDIS_DB, DUET_CANARY="users")
    r = redis.Redis.from_url(redis_url)
    me = [sys.executable, "-m", "duet.cli"]
    t0 = time.time()
    up = start_server(me + ["up"], env, url, home / "up.log", timeout_s=900)
    worse = None
    try:
        if args.worse_candidate is not None:
            worse = publish_worse_candidate(home, args.worse_candidate, broker_of(home / "up.log"))
        sim_dir = home / "simulation"
        sim = subprocess.run(me + ["simulate", "--rule", args.rule, "--seed", str(args.seed), "--noise", str(args.noise),
                                   "--votes", str(args.votes), "--minutes", str(args.minutes), "--eval-every", "100",
                                   "--rate", str(args.votes / (args.minutes * 60)), "--url", url, "--out", str(sim_dir)],
                             env=env)
        if sim.returncode != 0:
            raise SystemExit(f"duet simulate failed; logs under {home}")
        admin = {"Authorization": f"Bearer {(home / 'admin_key').read_text().strip()}"}
        status = httpx.get(f"{url}/admin/canary", headers=admin, timeout=30).json()
        models = httpx.get(f"{url}/admin/models", headers=admin, timeout=30).json()
        dev_key = (home / "dev_key").read_text().strip()
        rounds = httpx.get(f"{url}/v1/dashboard?hours=720", headers={"Authorization": f"Bearer {dev_key}"},
                           timeout=30).json()["rounds"]
        screenshot_panel(url, dev_key, Path(args.out) / f"canary-panel-{args.rule}-seed{args.seed}.png")
    finally:
        stop_process(up, timeout=120)
    tests = list(reversed(status["history"])) + ([status["test"]] if status["test"] else [])
    truth = true_win_rates(cross_pairs(r), tests, load_rule(args.rule))
    r.flushdb()

    rows = []
    for t in tests:
        true = truth.get((t["candidate"], t["incumbent"]))
        verdict = true["candidate_is"] if true else None
        right = {"promoted": verdict in ("better", "close"), "rejected": verdict in ("worse", "close")}.get(t["status"])
        rows.append({"candidate": t["candidate"], "incumbent": t["incumbent"], "status": t["status"],
                     "reason": t["reason"], "votes": t["votes"], "win_rate": t["win_rate"],
                     "bounds": [t["lower"], t["upper"]],
                     "minutes": round(((t["decided_at"] or time.time()) - t["started_at"]) / 60, 1),
                     "true_under_rule": true, "right": right if verdict else None})
    res = json.loads((sim_dir / "result.json").read_text())
    result = {"rule": args.rule, "seed": args.seed, "noise": args.noise, "settings": "defaults + DUET_CANARY=users",
              "votes": res["votes_cast"], "votes_failed": res["votes_failed"],
              "run_minutes": round((time.time() - t0) / 60, 1), "live_version": models["current"],
              "rounds_published": sum(x.get("result") == "published" for x in rounds),
              "final_vs_base": {k: res["final"][k] for k in ("model_version", "win_rate", "ci_low", "ci_high")},
              "aa_vs_base": {k: res["curve"][0][k] for k in ("model_version", "win_rate", "ci_low", "ci_high")},
              "tests": rows, "decided": sum(x["status"] in ("promoted", "rejected") for x in rows),
              **({"worse_candidate": {"factor": args.worse_candidate, "name": worse,
                                      "test": next((x for x in rows if x["candidate"] == worse), None),
                                      "ever_promoted": any(x["candidate"] == worse and x["status"] == "promoted"
                                                           for x in rows) or models["current"] == worse}}
                 if worse else {}),
              "right": sum(x["right"] is True for x in rows), "wrong": sum(x["right"] is False for x in rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-worse{args.worse_candidate}" if worse else ""
    (out / f"canary-served-{args.rule}-seed{args.seed}{tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
