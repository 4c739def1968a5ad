"""Swap benchmark (prints JSON): hot-swapping SmolLM2-135M weights on this CPU under load.

8 concurrent streaming clients run for --seconds without swaps, then for --seconds while the admin
API alternates the live weights between `base` and a published copy every --every seconds. Reports
swap time end to end (verify + stage + pause + probe; target <= 1 s), how long until the new weights
answer requests (the same without the probe), the pause inside it (target <= 100 ms), p99 request latency with and without swaps (added p99 target <= 100 ms) and
failed requests (target 0).
Usage: python bench/swap.py [--seconds 30] [--every 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from duet.processes import stop_process  # noqa: E402
from duet.broker import free_port  # noqa: E402
from feedback.contract.registry import Registry  # noqa: E402

# benchlib sits beside this file: importable only now that `feedback` is the package in sys.modules
sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import start_server  # noqa: E402
from duet.wiring import policy_config  # noqa: E402

KEY, ADMIN = "bench-key", "bench-admin"


async def load(url: str, seconds: float, clients: int = 8) -> tuple[list[float], int, int]:
    latencies, failed, total = [], 0, 0
    end = time.time() + seconds
    body = {"model": "duet", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 32, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {KEY}"}) as s:
        async def client():
            nonlocal failed, total
            while time.time() < end:
                t0 = time.perf_counter()
                try:
                    async with s.post("/v1/chat/completions", json=body) as r:
                        text = await r.text()
                    ok = r.status == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
                except aiohttp.ClientError:
                    ok = False
                total += 1
                failed += not ok
                latencies.append(time.perf_counter() - t0)
        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, failed, total


async def swapper(url: str, versions: list[str], seconds: float, every: float) -> list[dict]:
    records = []
    end = time.time() + seconds
    i = 0
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        while time.time() < end - every:
            await asyncio.sleep(every)
            r = await c.post(f"/admin/models/{versions[i % 2]}/activate")
            records.append(r.json().get("swap") or r.json())
            i += 1
    return records


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--every", type=float, default=3)
    ap.add_argument("--out", default="bench/results/swap.json")
    args = ap.parse_args()

    from duet.model_assets import resolve_model
    from duet.settings import Settings

    s = Settings()
    base = resolve_model(s.model, s.home)
    tmp = Path(tempfile.mkdtemp(prefix="duet-swap-"))
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    copy = Registry(tmp / "registry").publish(  # with probe log-probs, as the trainer publishes: serving checks them
        lambda d: [shutil.copy(f, d / f.name) for f in Path(base).iterdir() if f.is_file()],
        base_model=base, algorithm="copy", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={},
        probe=probe_logprobs(PolicyTrainer(policy_config(), base), Path(base)))[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DUET_PORT": str(port), "DUET_DEV_KEY": KEY, "DUET_ADMIN_KEY": ADMIN, "DUET_MODEL": base,
           "DUET_HOME": str(tmp), "DUET_REGISTRY_DIR": str(tmp / "registry"), "DUET_REDIS_URL": "redis://127.0.0.1:6379/14",
           "DUET_RATE_LIMIT_RPM": "1000000", "HF_HUB_OFFLINE": "1"}
    server = start_server([sys.executable, "-m", "duet.cli", "serve"], env, url, tmp / "server.log")
    try:
        # the server loads the registry's latest at start: go back to base for the baseline
        httpx.post(url + "/admin/models/base/activate", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        quiet, quiet_failed, quiet_total = asyncio.run(load(url, args.seconds))

        async def both():
            return await asyncio.gather(load(url, args.seconds),
                                        swapper(url, [copy.name, "base"], args.seconds, args.every))
        (busy, busy_failed, busy_total), swaps = asyncio.run(both())
        # the start-up activation of the copy is the one swap that verified the files from scratch
        history = httpx.get(url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=60).json()["history"]
    finally:
        stop_process(server, timeout=60)
    ok = [r for r in swaps if r.get("result") == "ok"]
    result = {
        "model": base, "clients": 8, "seconds_each": args.seconds, "swaps": len(swaps), "swaps_ok": len(ok),
        "swap_seconds_median": round(statistics.median(r["seconds"] for r in ok), 3) if ok else None,
        "swap_seconds_max": round(max(r["seconds"] for r in ok), 3) if ok else None,
        "live_seconds_median": round(statistics.median(r["live_s"] for r in ok), 3) if ok else None,
        "first_swap_seconds_with_full_verification": round(history[0]["seconds"], 3) if history else None,
        "pause_seconds_median": round(statistics.median(r["pause_s"] for r in ok), 3) if ok else None,
        "pause_seconds_max": round(max(r["pause_s"] for r in ok), 3) if ok else None,
        "p99_latency_without_swaps_s": round(p99(quiet), 3), "p99_latency_with_swaps_s": round(p99(busy), 3),
        "added_p99_s": round(p99(busy) - p99(quiet), 3),
        "requests": quiet_total + busy_total, "failed_requests": quiet_failed + busy_failed,
        "targets": {"swap_seconds": "<= 1", "pause_seconds": "<= 0.1", "added_p99_s": "<= 0.1", "failed": 0},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
