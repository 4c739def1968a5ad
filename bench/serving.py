"""Serving benchmark (prints JSON): Duet's API vs vLLM's own OpenAI server, and pair vs single.

1. Same model, same prompts, greedy, streaming; concurrency 1 and 8: output tokens/s and time to
   first token for each server. Target: Duet throughput >= 0.95x vLLM's.
2. Duet: a forced pair against a single answer, same sampling: wall-time ratio. Target <= 1.3x.
3. Duet: K answers to rank (one engine call with n = K) for K = 2, 4, 9: wall time per request and
   answer tokens/s; K = 9 against K = 2.

Servers run one at a time (2 cores here). Usage: python bench/serving.py [--requests 16] [--max-tokens 64]
[--only-k: Duet's K answers only]
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
from pathlib import Path

import httpx
from benchlib import free_port, start_server
from tqdm import tqdm

from duet.processes import stop_process

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "What are three tips for learning a new language?",
    "Summarise the plot of Romeo and Juliet briefly.",
    "How does a bicycle stay upright?",
    "Give me a short recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Name three planets and one fact about each.",
]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """(time to first content token, total time, completion tokens) for one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0, tokens


async def load(url: str, headers: dict, model: str, concurrency: int, requests: int, max_tokens: int,
               extra: dict | None = None, desc: str = "") -> dict:
    body = lambda i: {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                      "max_tokens": max_tokens, "temperature": 0, "stream": True,
                      "stream_options": {"include_usage": True}, **(extra or {})}
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=requests, desc=desc, leave=False)
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        await one(client, url, body(0))  # warm-up

        async def task(i):
            async with sem:
                r = await one(client, url, body(i))
                bar.update()
                return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    bar.close()
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "ttft_median_s": round(statistics.median(r[0] for r in results), 4),
            "latency_median_s": round(statistics.median(r[1] for r in results), 4)}


async def pair_vs_single(url: str, headers: dict, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        async def timed(pairs: str, i: int) -> float:
            body = {"model": "duet", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "duet": {"pairs": pairs}}
            t0 = time.perf_counter()
            r = await client.post(url, json=body)
            r.raise_for_status()
            assert len(r.json()["choices"]) == (2 if pairs == "force" else 1)
            return time.perf_counter() - t0

        await timed("never", 0)
        single, paired = [], []
        for i in tqdm(range(requests), desc="pair vs single", leave=False):
            single.append(await timed("never", i))
            paired.append(await timed("force", i))
    return {"requests": requests, "single_median_s": round(statistics.median(single), 4),
            "pair_median_s": round(statistics.median(paired), 4),
            "pair_over_single": round(sum(paired) / sum(single), 3), "target": "<= 1.3"}


async def k_answers(url: str, headers: dict, requests: int, max_tokens: int, ks=(2, 4, 9)) -> dict:
    """Wall time of a request for K answers to rank (`duet.k`), same prompts and sampling for every K."""
    out = {}
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        for k in ks:
            times, tokens = [], 0
            for i in tqdm(range(requests), desc=f"K={k}", leave=False):
                body = {"model": "duet", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "duet": {"pairs": "force", "k": k}}
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                r.raise_for_status()
                assert len(r.json()["choices"]) == k
                times.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]
            out[f"k{k}"] = {"median_s": round(statistics.median(times), 3),
                            "answer_tokens_per_s": round(tokens / sum(times), 1)}
    out["k9_over_k2"] = round(out["k9"]["median_s"] / out["k2"]["median_s"], 2) if "k9" in out else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results/serving.json")
    ap.add_argument("--only-k", action="store_true", help="only Duet's K-answer cost (section 3)")
    args = ap.parse_args()

    from duet.model_assets import resolve_model
    from duet.settings import Settings

    s = Settings()
    model = resolve_model(s.model, s.home)
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}
    result: dict = {"model": model, "max_tokens": args.max_tokens}

    # --- Duet ---------------------------------------------------------------------------
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    duet_env = {**env, "DUET_PORT": str(port), "DUET_DEV_KEY": "bench-key", "DUET_MODEL": model,
                "DUET_HOME": str(tmp), "DUET_RATE_LIMIT_RPM": "1000000"}
    proc = start_server([sys.executable, "-m", "duet.cli", "serve"], duet_env, url, tmp / "duet.log")
    hdr = {"Authorization": "Bearer bench-key"}
    try:
        result["k_answers"] = asyncio.run(k_answers(url + "/v1/chat/completions", hdr, args.requests, args.max_tokens))
        if not args.only_k:
            duet = {f"c{c}": asyncio.run(load(url + "/v1/chat/completions", hdr, "duet", c, args.requests,
                                              args.max_tokens, desc=f"duet c={c}")) for c in (1, 8)}
            result["pair_vs_single"] = asyncio.run(pair_vs_single(url + "/v1/chat/completions", hdr,
                                                                  args.requests, args.max_tokens))
    finally:
        stop_process(proc, timeout=60)
    if args.only_k:
        _write(args.out, result)
        return

    # --- vLLM's own OpenAI server, same engine settings -----------------------------------
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           "duet", "--port", str(port), "--enforce-eager", "--max-model-len", str(s.max_model_len),
           "--dtype", s.dtype, "--seed", str(s.seed)]
    proc = start_server(cmd, env, url, tmp / "vllm.log", "/health")
    try:
        vllm = {f"c{c}": asyncio.run(load(url + "/v1/chat/completions", {}, "duet", c, args.requests,
                                          args.max_tokens, desc=f"vllm c={c}")) for c in (1, 8)}
    finally:
        stop_process(proc, timeout=60)

    result["duet"], result["vllm"] = duet, vllm
    result["throughput_ratio"] = {k: round(duet[k]["tokens_per_s"] / vllm[k]["tokens_per_s"], 3) for k in duet}
    result["ttft_diff_s"] = {k: round(duet[k]["ttft_median_s"] - vllm[k]["ttft_median_s"], 4) for k in duet}
    result["targets"] = {"throughput_ratio": ">= 0.95", "pair_over_single": "<= 1.3"}
    _write(args.out, result)


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
