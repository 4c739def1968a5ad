"""A policy round while a user is chatting and voting, against one while nobody is (prints JSON, draws a plot).

`duet up` at its defaults (a fresh home, port and Redis database; the cores split between serving and the
trainer unless --cpu-split off), then one simulated user: a chat with two answers forced every --vote-every
seconds (--max-tokens, 96 by default, at the API's default temperature), and a vote by --rule (`keyword` by
default: a taste that leaves the answers' length alone, so rounds stay comparable; under `shorter` later rounds
train on ever shorter answers). The user stops after --load-minutes; once the trainer is idle, a burst of
`DUET_POLICY_EVERY_VOTES` votes (as fast as serving answers, 4 at a time) makes one more round due, which then runs
with nobody using Duet. From the trainer's log (one `round metrics:` line per round) each round is classed "under
load" (the user's requests flowed throughout it), "idle" (no request while it ran) or "both"; from the user's own
requests, the pair latency (p50, p99) and the answer tokens per second served, inside rounds and outside them.
CPU affinity of each child is read from /proc.

Usage: python bench/round_under_load.py [--load-minutes 12] [--idle-minutes 8] [--vote-every 4] [--cpu-split auto]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import httpx  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server, up_at_defaults  # noqa: E402

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from duet.preferences import judge, load_rule  # noqa: E402
from duet.settings import Settings  # noqa: E402
from duet.processes import stop_process  # noqa: E402
from duet.prompts import KEYWORDS, TOPICS  # noqa: E402

REDIS_DB = 13


class User:
    """Chats with two answers forced and votes by `rule`; each request's time and tokens go to `out`."""

    def __init__(self, url: str, key: str, rule: str, max_tokens: int, seed: int) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]
        self.rule, self.max_tokens, self.rng = load_rule(rule), max_tokens, random.Random(seed)
        self.out: list[dict] = []

    def pair_and_vote(self, _: object = None) -> None:
        t0 = time.time()
        prompt = f"Tell me about {self.rng.choice(TOPICS)}, in a few sentences. Key word: {self.rng.choice(KEYWORDS)}."
        try:
            body = self.http.post("/v1/chat/completions", json={
                "model": self.model, "max_tokens": self.max_tokens, "duet": {"pairs": "force"},
                "messages": [{"role": "user", "content": prompt}]}).json()
            took = time.time() - t0
            a, b = (c["message"]["content"] for c in body["choices"])
            self.http.post("/v1/feedback", json={"comparison_id": body["duet"]["comparison_id"],
                                                 "vote_token": body["duet"]["vote_token"],
                                                 "choice": judge(self.rule, prompt, a, b, 0.1, self.rng)})
            self.out.append({"t": t0, "end": t0 + took, "seconds": took, "tokens": body["usage"]["completion_tokens"]})
        except (httpx.HTTPError, KeyError, ValueError) as e:
            self.out.append({"t": t0, "end": time.time(), "error": f"{type(e).__name__}: {e}"})

    def steady(self, stop: threading.Event, every_s: float) -> None:
        while not stop.is_set():
            t0 = time.time()
            self.pair_and_vote()
            stop.wait(max(0.0, every_s - (time.time() - t0)))

    def burst(self, n: int, concurrency: int = 4) -> None:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(self.pair_and_vote, range(n)))


def wait_idle(log: Path, timeout_s: float) -> None:
    """Until the trainer is not in a round (every `policy round:` start has its `round metrics:` line)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text()
        if text.count("policy round: ") <= text.count("round metrics: "):
            return
        time.sleep(2)


def rounds_from(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if "round metrics: " in line:
            out.append(json.loads(line.split("round metrics: ", 1)[1]))
    return out


def affinity(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def children_affinity(up_pid: int) -> dict[str, str]:
    got = {}
    for name in ("duet.cli serve", "duet.cli train"):
        pids = subprocess.run(["pgrep", "-P", str(up_pid), "-f", name], capture_output=True, text=True).stdout.split()
        if pids:
            got[name.split()[-1]] = affinity(int(pids[0]))
    return got


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def served(requests: list[dict], inside) -> dict:
    ok = [r for r in requests if "seconds" in r and inside(r)]
    span = sum(r["seconds"] for r in ok)
    return {"pairs": len(ok), "p50_s": pct([r["seconds"] for r in ok], 0.5), "p99_s": pct([r["seconds"] for r in ok], 0.99),
            "answer_tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 1) if span else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-minutes", type=float, default=12.0)
    ap.add_argument("--idle-minutes", type=float, default=8.0)
    ap.add_argument("--rule", default="keyword")
    ap.add_argument("--vote-every", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--cpu-split", default="auto", choices=("auto", "off"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    home, url, _, env = up_at_defaults("duet-load-", REDIS_DB, DUET_CPU_SPLIT=args.cpu_split)
    up = start_server([sys.executable, "-m", "duet.cli", "up"], env, url, home / "up.log", timeout_s=900)
    try:
        log = next((home / "runs").glob("*/trainer.log"))
        me = User(url, (home / "dev_key").read_text().strip(), args.rule, args.max_tokens, args.seed)
        cores = children_affinity(up.pid)
        stop = threading.Event()
        t_user = threading.Thread(target=me.steady, args=(stop, args.vote_every))
        t0 = time.time()
        t_user.start()
        time.sleep(args.load_minutes * 60)
        stop.set()
        t_user.join()
        user_stopped = time.time()
        wait_idle(log, args.idle_minutes * 60)
        rounds_before = len(rounds_from(log))
        me.burst(Settings().policy_every_votes)  # one more round due, to run with nobody chatting
        deadline = time.time() + args.idle_minutes * 60
        while len(rounds_from(log)) <= rounds_before and time.time() < deadline:
            time.sleep(2)
        wait_idle(log, max(0.0, deadline - time.time()))
    finally:
        stop_process(up, timeout=120)
    requests = me.out
    rounds = rounds_from(log)
    for r in rounds:
        start, end = r["started"], r["started"] + r["seconds"]
        overlapping = [q for q in requests if q["t"] < end and q["end"] > start]
        r["when"] = ("idle" if not overlapping else
                     "under load" if end <= user_stopped and all(q["t"] < user_stopped for q in overlapping) else "both")
    in_round = lambda q: any(r["started"] <= q["t"] <= r["started"] + r["seconds"] for r in rounds)  # noqa: E731

    def summary(kind: str) -> dict:
        rs = [r for r in rounds if r["when"] == kind]
        return {"rounds": len(rs), "median_s": pct([r["seconds"] for r in rs], 0.5),
                "seconds": [r["seconds"] for r in rs]}

    loaded, idle = summary("under load"), summary("idle")
    result = {
        "settings": "defaults", "cpu_split": args.cpu_split, "cores": cores, "rule": args.rule,
        "vote_every_s": args.vote_every,
        "max_tokens": args.max_tokens, "votes": sum("seconds" in r for r in requests),
        "failed": sum("error" in r for r in requests), "load_minutes": args.load_minutes,
        "round_under_load": loaded, "round_idle": idle,
        "ratio_load_to_idle": round(loaded["median_s"] / idle["median_s"], 2) if loaded["median_s"] and idle["median_s"] else None,
        "serving_during_rounds": served(requests, in_round),
        "serving_outside_rounds": served(requests, lambda q: not in_round(q) and q["t"] < user_stopped),
        "first_round_published_after_s": next((round(r["started"] + r["seconds"] - t0) for r in rounds if r["published"]), None),
        "rounds": [{k: r.get(k) for k in ("when", "seconds", "published", "reasons", "sample_s", "reward_s", "kl_s",
                                          "update_s", "dpo_s", "signal_s", "gate_s", "export_s", "groups_trained",
                                          "informative_fraction", "dpo_pairs", "answer_tokens", "temperature", "kl")}
                   for r in rounds],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"round_under_load-{args.cpu_split}-{args.rule}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rounds, requests, t0, user_stopped, out / f"{stem}.png")
    print(json.dumps(result, indent=2))


def plot(rounds: list[dict], requests: list[dict], t0: float, stopped: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ok = [r for r in requests if "seconds" in r]
    ax.plot([(r["t"] - t0) / 60 for r in ok], [r["seconds"] for r in ok], ".", ms=3, label="pair latency (s)")
    for r in rounds:
        ax.axvspan((r["started"] - t0) / 60, (r["started"] + r["seconds"] - t0) / 60, color="tab:orange", alpha=0.2)
    ax.axvline((stopped - t0) / 60, color="k", ls="--", lw=1, label="user stops")
    ax.set_xlabel("minutes (orange: policy rounds)")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
