"""Serving two versions at once (prints JSON; issue 16): which way to serve a candidate beside the incumbent.

A. A second engine (what Duet does): the incumbent's output tokens/s at a fixed concurrency
   (1) alone, (2) with a second engine loaded and idle, (3) with the second engine answering a
   candidate's share at the same time (a quarter of the workers; with DUET_PAIR_RATE 0.2 and
   DUET_CANARY_PAIR_SHARE 0.5 one answer in ten goes to the candidate, so this is a heavy case).
   Target: (2) and (3) >= 0.8x (1).
B. A runtime LoRA adapter on the incumbent's engine (the other way open): output tokens/s of plain
   requests with LoRA enabled, and of requests through a rank-16 adapter on every linear layer (the
   trainer's shape), against plain requests on an engine without LoRA.

Engines are vLLM AsyncLLM in this process, SmolLM2-135M-Instruct at Duet's engine settings.
Usage: python bench/two_versions.py [--seconds 40] [--concurrency 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

PROMPTS = ["Explain why the sky is blue in two sentences.", "Write a haiku about autumn leaves.",
           "What are three tips for learning a new language?", "How does a bicycle stay upright?",
           "Give me a short recipe for pancakes.", "Name three planets and one fact about each."]


def engine_args(model: str, lora: bool = False):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from duet.settings import Settings

    s = Settings()
    kw = dict(model=model, max_model_len=s.max_model_len, dtype=s.dtype, enforce_eager=s.enforce_eager, seed=0,
              gpu_memory_utilization=s.gpu_memory_utilization)
    if lora:
        kw.update(enable_lora=True, max_lora_rank=16, max_loras=1)
    return AsyncEngineArgs(**kw)


def start(model: str, lora: bool = False, nice: int = 0):
    from vllm.v1.engine.async_llm import AsyncLLM

    from serving.engine import prepare_cpu_env, start_then_nice

    prepare_cpu_env(1, tempfile.mkdtemp(prefix="duet-bench-vllm-"))
    return start_then_nice(nice, AsyncLLM.from_engine_args, engine_args(model, lora))


async def worker(llm, tok, seconds: float, max_tokens: int, counter: list, lora_request=None) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from feedback.contract.comparisons import ChatMessage

    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        ids = tok.token_ids([ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
        params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=i)
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex,
                                      lora_request=lora_request):
            final = out
        counter[0] += len(final.outputs[0].token_ids)
        i += 1


async def measure(llm, tok, seconds, concurrency, max_tokens, side=None, side_workers=0, lora_request=None,
                  side_lora_request=None, side_out: dict | None = None) -> float:
    """Output tokens/s of `llm` (the incumbent), while `side` (the candidate) runs `side_workers` workers;
    the side's own tokens/s go into side_out["tok_s"]."""
    main, other = [0], [0]
    jobs = [worker(llm, tok, seconds, max_tokens, main, lora_request) for _ in range(concurrency)]
    jobs += [worker(side, tok, seconds, max_tokens, other, side_lora_request) for _ in range(side_workers)]
    t0 = time.perf_counter()
    await asyncio.gather(*jobs)
    elapsed = time.perf_counter() - t0
    if side_out is not None:
        side_out["tok_s"] = round(other[0] / elapsed, 1)
    return round(main[0] / elapsed, 1)


def make_adapter(model: str, out: Path, rank: int = 16) -> Path:
    """A PEFT-format LoRA adapter (random A, small random B) on the trainer's target layers."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from trainer.lora import TARGETS

    cfg = AutoConfig.from_pretrained(model)
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for name in TARGETS:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = shapes[name]
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank) * 0.001
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": list(TARGETS), "bias": "none",
        "base_model_name_or_path": model, "task_type": "CAUSAL_LM", "lora_dropout": 0.0}))
    return out


async def main_async(args) -> dict:
    from vllm.lora.request import LoRARequest

    from duet.model_assets import resolve_model
    from duet.settings import Settings
    from serving.prompting import PromptBuilder

    s = Settings()
    model = resolve_model(s.model, s.home)
    tok = PromptBuilder(model)
    m = (args.seconds, args.concurrency, args.max_tokens)
    nice = s.canary_engine_nice if args.candidate_nice is None else args.candidate_nice
    side_workers = max(1, args.concurrency // 4)  # the candidate's share when it is busy
    out: dict = {"model": model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                 "seconds": args.seconds, "candidate_nice": nice}

    incumbent = start(model)
    await measure(incumbent, tok, 8, *m[1:])  # warm-up
    out["A_alone_tok_s"] = await measure(incumbent, tok, *m)
    candidate = start(model, nice=nice)  # as serving starts it (DUET_CANARY_ENGINE_NICE)
    await measure(candidate, tok, 5, 2, args.max_tokens)  # warm it up too, then leave it idle
    out["A_with_idle_candidate_tok_s"] = await measure(incumbent, tok, *m)
    candidate_rate: dict = {}
    out["A_with_busy_candidate_tok_s"] = await measure(incumbent, tok, *m, side=candidate, side_workers=side_workers,
                                                       side_out=candidate_rate)
    out["A_busy_candidate_own_tok_s"] = candidate_rate["tok_s"]
    out["A_candidate_workers"] = side_workers
    for k in ("idle", "busy"):
        out[f"A_{k}_ratio"] = round(out[f"A_with_{k}_candidate_tok_s"] / out["A_alone_tok_s"], 3)
    candidate.shutdown()
    incumbent.shutdown()
    if args.skip_lora:
        return out

    llm = start(model, lora=True)
    adapter = make_adapter(model, Path(tempfile.mkdtemp(prefix="duet-bench-lora-")))
    req = LoRARequest("candidate", 1, str(adapter))
    await measure(llm, tok, 8, *m[1:])
    await measure(llm, tok, 8, *m[1:], lora_request=req)
    out["B_plain_on_lora_engine_tok_s"] = await measure(llm, tok, *m)
    out["B_lora_tok_s"] = await measure(llm, tok, *m, lora_request=req)
    adapter_rate: dict = {}  # the candidate's share through the adapter, in the same batches as the incumbent's
    out["B_plain_with_busy_lora_tok_s"] = await measure(llm, tok, *m, side=llm, side_workers=side_workers,
                                                        side_lora_request=req, side_out=adapter_rate)
    out["B_busy_lora_own_tok_s"] = adapter_rate["tok_s"]
    out["B_busy_ratio"] = round(out["B_plain_with_busy_lora_tok_s"] / out["A_alone_tok_s"], 3)
    out["B_lora_vs_plain_no_lora_engine"] = round(out["B_lora_tok_s"] / out["A_alone_tok_s"], 3)
    out["B_plain_with_lora_enabled_vs_no_lora_engine"] = round(out["B_plain_on_lora_engine_tok_s"] / out["A_alone_tok_s"], 3)
    llm.shutdown()
    out["targets"] = {"A_idle_ratio": ">= 0.8", "A_busy_ratio": ">= 0.8", "B_busy_ratio": ">= 0.8"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--candidate-nice", type=int, default=None,
                    help="the candidate engine's nice (default: serving's, DUET_CANARY_ENGINE_NICE)")
    ap.add_argument("--skip-lora", action="store_true", help="measure the two engines only")
    ap.add_argument("--out", default="bench/results/two_versions.json")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
