"""Soak (prints JSON): `duet up` at its defaults under steady load — chats, pairs and votes at a fixed
concurrency — with a weight swap every minute; then waits for the trainer to consume every vote.

Reports failed requests (target 0), chat latency p50 / p99 outside and inside the seconds around a swap,
swaps done, and votes accepted (202) against votes the trainer has consumed (trained + held out +
quarantined, from the dashboard; target: equal). With --kill-broker-every, the embedded broker is
SIGKILLed that often (`duet up` restarts it, empty): every accepted vote must still be accounted for —
read by the trainer (in its checkpoint), or waiting in the outbox or the unconfirmed set (target:
`votes_unaccounted` 0).

The swaps alternate between base and a copy of the base weights published as a version (with the
trainer's probe log-probs, so the full check runs): what is measured is the swap machinery, not a policy.

With --oversized-vote, one outbox entry larger than the broker takes (1.2 MB, as a vote accepted under a larger
body limit or a longer-context model would be) is put in the outbox a third of the way in: it must be dead-lettered with its
reason (`duet:outbox:dead`) and every vote behind it relayed (issue 24's target).

Usage: python bench/soak.py [--minutes 30] [--concurrency 16] [--kill-broker-every 10] [--oversized-vote]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import httpx  # noqa: E402
import redis  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path)

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server, up_at_defaults  # noqa: E402

from duet.processes import stop_process  # noqa: E402
from duet.wiring import policy_config  # noqa: E402

REDIS_DB = 10
PROMPTS = ["Say hello.", "Name a colour.", "What is 2 + 2?", "Give me a tip for sleeping well.",
           "Write one sentence about the sea.", "What is the capital of France?"]


def publish_copy_of_base(home: Path, model: str) -> str:
    from feedback.contract.registry import Registry
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    probe = probe_logprobs(PolicyTrainer(policy_config(), model), Path(model))

    def write(folder: Path) -> None:
        for f in Path(model).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    manifest, _ = Registry(home / "registry").publish(write, base_model=model, algorithm="soak-copy",
                                                      hyperparameters={}, train_metrics={}, eval={},
                                                      kafka_offsets={}, probe=probe)
    return manifest.name


def kill_broker(up_pid: int) -> bool:
    """SIGKILL the embedded broker `duet up` started (its supervisor starts a new, empty one)."""
    import signal
    import subprocess

    pids = subprocess.run(["pgrep", "-P", str(up_pid), "tansu"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    return bool(pids)


def account_votes(home: Path, redis_url: str) -> dict[str, int]:
    """Where every accepted vote is after the run: read by the trainer (its newest checkpoint's event
    ids), still in the outbox, or acknowledged by Kafka and not yet confirmed by a checkpoint."""
    from feedback.outbox import OUTBOX
    from feedback.unconfirmed import UNCONFIRMED
    from trainer import checkpoint

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    last = checkpoint.latest(home / "trainer" / "checkpoints")
    seen = set(checkpoint.read_state(last).seen_ids) if last else set()
    waiting = {f["event_id"] for _, f in r.xrange(OUTBOX)}
    unconfirmed = set(r.hkeys(UNCONFIRMED)) - seen - waiting
    return {"votes_in_trainer_checkpoint": len(seen), "votes_in_outbox": len(waiting - seen),
            "votes_unconfirmed": len(unconfirmed)}


OVERSIZED_ID = "soak-oversized-vote"


def inject_oversized_vote(redis_url: str) -> None:
    """An outbox entry over the broker's limit, as the vote script would have written it."""
    from feedback.outbox import OUTBOX

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.xadd(OUTBOX, {"event_id": OVERSIZED_ID, "key": "cmp_soak_oversized", "payload": "x" * 1_200_000})


def dead_letters(redis_url: str) -> dict[str, str]:
    """event id → reason of every dead-lettered outbox entry."""
    from feedback.outbox import DEAD_VOTES

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    return {f["event_id"]: f["reason"] for _, f in r.xrange(DEAD_VOTES)}


async def run_load(url: str, key: str, minutes: float, concurrency: int, swap_times: list[float]) -> dict:
    chats, failures, votes = [], [], 0
    deadline = time.time() + minutes * 60
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        async def worker(i: int) -> None:
            nonlocal votes
            rng = random.Random(i)
            while time.time() < deadline:
                pairs = "force" if rng.random() < 0.5 else "never"
                t0 = time.time()
                try:
                    r = await c.post("/v1/chat/completions", json={
                        "model": "duet", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                        "max_tokens": 32, "temperature": 0.8, "duet": {"pairs": pairs}})
                    if r.status_code != 200:
                        failures.append(("chat", r.status_code, r.text[:200]))
                        continue
                    chats.append((t0, time.time() - t0))
                    d = r.json()["duet"]
                    body = ({"comparison_id": d["comparison_id"], "choice": rng.choice("ab")} if d["comparison_id"]
                            else {"completion_id": d["completion_id"], "rating": rng.choice(("up", "down"))})
                    v = await c.post("/v1/feedback", json={**body, "vote_token": d["vote_token"]})
                    if v.status_code == 202:
                        votes += 1
                    else:
                        failures.append(("vote", v.status_code, v.text[:200]))
                except httpx.HTTPError as e:
                    failures.append(("transport", 0, repr(e)[:200]))
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    near = [dt for t0, dt in chats if any(s - 5 <= t0 <= s + 10 for s in swap_times)]
    away = [dt for t0, dt in chats if not any(s - 5 <= t0 <= s + 10 for s in swap_times)]

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1], 3) if len(xs) >= 2 else None
    return {"chats": len(chats), "votes_accepted": votes, "failed": len(failures), "failures": failures[:5],
            "p50_s": pct(away, 50), "p99_s": pct(away, 99), "p50_near_swap_s": pct(near, 50),
            "p99_near_swap_s": pct(near, 99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kill-broker-every", type=float, default=0.0, help="minutes; 0: never")
    ap.add_argument("--oversized-vote", action="store_true", help="inject one 1.2 MB outbox entry halfway")
    ap.add_argument("--catch-up-minutes", type=float, default=10.0, help="wait this long for the trainer")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()

    from duet.model_assets import resolve_model
    from duet.settings import Settings

    # one key stands for all the simulated users: no per-key caps on it
    home, url, redis_url, env = up_at_defaults("duet-soak-", REDIS_DB, DUET_RATE_LIMIT_RPM="1000000",
                                               DUET_VOTE_CAP_PER_KEY="100000000")
    version = publish_copy_of_base(home, resolve_model(Settings().model, home))
    up = start_server([sys.executable, "-m", "duet.cli", "up"], env, url, home / "up.log", timeout_s=900)
    swaps: list[dict] = []
    swap_times: list[float] = []
    kills: list[bool] = []
    try:
        key, admin = ((home / f).read_text().strip() for f in ("dev_key", "admin_key"))

        async def swapper() -> None:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as c:
                await c.post("/admin/updates/pause")  # only the bench swaps: the trainer's versions wait
                target = version
                end = time.time() + args.minutes * 60
                while time.time() + 60 < end:
                    await asyncio.sleep(60)
                    swap_times.append(time.time())
                    try:
                        r = await c.post(f"/admin/models/{target}/activate", timeout=300)
                        swaps.append({"to": target, "status": r.status_code, **r.json().get("swap", {}),
                                      **({"error": r.json()["error"]["message"][:200]} if r.status_code != 200 else {})})
                    except httpx.HTTPError as e:  # a swap that hangs is a finding, not the end of the soak
                        swaps.append({"to": target, "status": 0, "error": repr(e)[:200]})
                    target = "base" if target == version else version

        async def broker_killer() -> None:
            if not args.kill_broker_every:
                return
            end = time.time() + args.minutes * 60
            while time.time() + args.kill_broker_every * 60 < end:
                await asyncio.sleep(args.kill_broker_every * 60)
                kills.append(kill_broker(up.pid))

        async def oversized() -> None:
            if args.oversized_vote:
                await asyncio.sleep(args.minutes * 20)  # a third of the way in (apart from a broker kill)
                inject_oversized_vote(redis_url)

        async def both():
            return (await asyncio.gather(run_load(url, key, args.minutes, args.concurrency, swap_times), swapper(),
                                         broker_killer(), oversized()))[0]
        load = asyncio.run(both())
        deadline = time.time() + args.catch_up_minutes * 60  # the trainer consumes every vote
        consumed = None
        while time.time() < deadline:
            rm = httpx.get(f"{url}/v1/dashboard?hours=24", headers={"Authorization": f"Bearer {key}"},
                           timeout=30).json()["reward_model"]
            if rm:
                last = rm[-1]
                consumed = last["votes_trained"] + last["votes_held_out"] + last.get("votes_quarantined", 0)
                if consumed >= load["votes_accepted"]:
                    break
            time.sleep(10)
    finally:
        stop_process(up, timeout=120)  # SIGTERM: duet up stops its children in order
    accounted = account_votes(home, redis_url)
    dead = dead_letters(redis_url)
    result = {"minutes": args.minutes, "concurrency": args.concurrency, **load, "votes_consumed_by_trainer": consumed,
              "broker_kills": sum(kills), **accounted,
              "votes_unaccounted": load["votes_accepted"] - sum(accounted.values()),
              "swaps": len(swaps), "swaps_ok": sum(s.get("result") == "ok" for s in swaps),
              "swap_pause_s": [round(s.get("pause_s", 0), 3) for s in swaps],
              "swap_failures": [s.get("error") for s in swaps if s.get("result") != "ok"][:5],
              **({"oversized_vote_dead_lettered": OVERSIZED_ID in dead, "dead_letter_reason": dead.get(OVERSIZED_ID)}
                 if args.oversized_vote else {}),
              "targets": {"failed": 0, "votes_consumed_by_trainer": "== votes_accepted", "votes_unaccounted": 0,
                          "oversized_vote_dead_lettered": True}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
