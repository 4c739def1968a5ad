"""Votes benchmark (prints JSON): POST /v1/feedback at concurrency 32 against the real server, Redis
and embedded broker; then relay throughput draining a backlog into Kafka.

Comparisons to vote on are written straight into Redis beforehand (the same records and vote tokens
the chat path writes), so the measurement is the vote path alone, not the engine.
Target on the 2-core machine: >= 2,000 votes/s with p99 < 50 ms.
Usage: python bench/feedback.py [--votes 20000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Run as `python bench/feedback.py`, this file's folder comes first on sys.path and its own name
# would shadow the `feedback` package; drop that entry before importing Duet.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
from tqdm import tqdm  # noqa: E402

from duet.processes import stop_process  # noqa: E402
from duet.broker import EmbeddedBroker, free_port
from feedback.contract.comparisons import Answer, ChatMessage, PendingComparison, SamplingSpec, comparison_key
from feedback.outbox import OUTBOX
from serving.auth import hash_key
from serving.pairing import vote_token

# benchlib sits beside this file: importable only now that `feedback` is the package in sys.modules
sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server  # noqa: E402

SECRET, KEY = "bench-secret", "bench-key"


def seed_comparisons(r: redis.Redis, n: int, prefix: str) -> list[dict]:
    key_id = hash_key(KEY)[:12]
    now = datetime.now(UTC)
    exp = now + timedelta(hours=1)
    ballots = []
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        cid = f"cmp_{prefix}{i:08d}"
        cmp = PendingComparison(
            comparison_id=cid, key_id=key_id, user_hash=None, model="duet",
            messages=[ChatMessage(role="user", content="Write a haiku about autumn leaves.")],
            answers=[Answer(index=j, text="Leaves fall, red and gold; the wind hums a quiet song. " * 4,
                            finish_reason="stop", model_version="base", completion_tokens=60) for j in range(2)],
            sampling=SamplingSpec(temperature=0.7, top_p=1.0, max_tokens=256), prompt_tokens=40,
            created_at=now, expires_at=exp)
        pipe.set(comparison_key(cid), cmp.model_dump_json(), ex=3600)
        ballots.append({"comparison_id": cid, "choice": "ab"[i % 2],
                        "vote_token": vote_token(SECRET, cid, key_id, int(exp.timestamp()))})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return ballots


async def post_votes(url: str, ballots: list[dict], concurrency: int, desc: str) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(ballots)
    bar = tqdm(total=len(ballots), desc=desc, leave=False)
    # aiohttp, not httpx: on 2 shared cores httpx's own CPU cost caps the load near 500 req/s.
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {KEY}"},
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        async def worker():
            for b in queue:
                t0 = time.perf_counter()
                async with client.post("/v1/feedback", data=json.dumps(b),
                                       headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if len(latencies) % 200 == 0:
                    bar.update(200)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bar.close()
    q = statistics.quantiles(latencies, n=100)
    return {"votes": len(ballots), "concurrency": concurrency, "wall_s": round(wall, 3),
            "votes_per_s": round(len(ballots) / wall, 1), "p50_ms": round(q[49] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2), "statuses": statuses}


def wait_drained(r: redis.Redis, timeout_s: float = 300) -> float:
    t0 = time.perf_counter()
    while r.xlen(OUTBOX) and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.02)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--votes", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--redis-db", type=int, default=14)
    ap.add_argument("--out", default="bench/results/feedback.json")
    args = ap.parse_args()

    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-"))
    broker = EmbeddedBroker(log_path=tmp / "tansu.log").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DUET_PORT": str(port), "DUET_DEV_KEY": KEY, "DUET_SECRET": SECRET,
           "DUET_REDIS_URL": redis_url, "DUET_KAFKA_BOOTSTRAP": broker.bootstrap, "DUET_HOME": str(tmp),
           "DUET_RATE_LIMIT_RPM": "100000000", "DUET_OUTBOX_MAX": str(args.votes * 2),
           "DUET_VOTE_CAP_PER_KEY": "100000000",  # one key casts every vote here: throughput, not caps
           "HF_HUB_OFFLINE": "1"}
    server = None
    try:
        # waits for the engine too: its loading would steal the CPU from the measurement
        server = start_server([sys.executable, "-m", "duet.cli", "serve"], env, url, tmp / "server.log")
        result: dict = {}
        asyncio.run(post_votes(url, seed_comparisons(r, 1000, "warm"), args.concurrency, "warm-up"))
        wait_drained(r)
        proc = psutil.Process(server.pid)
        runs = []
        for i in range(args.repeats):  # this VM's speed varies run to run: report each and the median
            ballots = seed_comparisons(r, args.votes, f"run{i}-")
            cpu0, own0 = proc.cpu_times(), time.process_time()
            run = asyncio.run(post_votes(url, ballots, args.concurrency, f"votes {i + 1}/{args.repeats}"))
            cpu1 = proc.cpu_times()
            # Where the 2 cores went: the API process vs this load generator (the relay is a child).
            run["server_cpu_s"] = round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 2)
            run["client_cpu_s"] = round(time.process_time() - own0, 2)
            run["outbox_left_at_end"] = r.xlen(OUTBOX)
            run["drain_after_load_s"] = round(wait_drained(r), 3)
            runs.append(run)
        result["http_runs"] = runs
        result["http"] = {k: statistics.median(run[k] for run in runs) for k in ("votes_per_s", "p50_ms", "p99_ms")}

        # Relay throughput: a backlog built while the broker is down, drained once it is back.
        broker.stop()
        backlog = seed_comparisons(r, args.votes, "backlog")
        asyncio.run(post_votes(url, backlog, args.concurrency, "backlog"))
        depth = r.xlen(OUTBOX)
        broker.start()
        t0 = time.perf_counter()
        while r.xlen(OUTBOX) == depth and time.perf_counter() - t0 < 60:  # relay's reconnect back-off
            time.sleep(0.005)
        reconnect = time.perf_counter() - t0
        drain = wait_drained(r)
        result["relay"] = {"backlog": depth, "reconnect_s": round(reconnect, 3), "drain_s": round(drain, 3),
                           "votes_per_s": round(depth / drain, 1) if drain else None}
        result["targets"] = {"votes_per_s": ">= 2000", "p99_ms": "< 50"}
    finally:
        stop_process(server, timeout=60)
        broker.stop()
        r.flushdb()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
