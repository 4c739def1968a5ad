"""Reward-model benchmark (prints JSON): Duet's RewardTrainer vs TRL's RewardTrainer on the same
synthetic preference pairs (the answer with a marker word wins), the same backbone, batch size,
learning rate, epochs and max length, fp32 on this machine's CPU. Reports time per epoch (ratio
Duet / TRL, target <= 1.0) and held-out accuracy of both.

TRL is a benchmark-only dependency: if it is missing, this script installs it into the running
environment, pinned to what is already installed (nothing present changes).
Usage: python bench/reward_model.py [--backbone PATH] [--pairs 128] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from duet.wiring import reward_config

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages


def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                                text=True, check=True).stdout
        cons = Path("bench/results/constraints.txt")
        cons.parent.mkdir(parents=True, exist_ok=True)
        cons.write_text(frozen)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(cons), "trl"], check=True)


def held_out_accuracy(score, pairs) -> float:
    right = sum(int(score(p["prompt"] + p["chosen"]) > score(p["prompt"] + p["rejected"])) for p in pairs)
    return right / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="", help="HF folder (default: the served base model, SmolLM2-135M)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default="bench/results/reward_model.json")
    args = ap.parse_args()
    ensure_trl()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    from duet.model_assets import resolve_model
    from duet.settings import Settings
    from trainer.examples import to_prompt_group
    from trainer.reward_trainer import RewardTrainer
    from trainer.synthetic import marker_event

    torch.set_num_threads(torch.get_num_threads())
    s = Settings()
    backbone = args.backbone or resolve_model(s.model, s.home)
    rng = random.Random(0)
    train = [to_prompt_group(marker_event(rng)) for _ in range(args.pairs)]
    held = [to_prompt_group(marker_event(rng)) for _ in range(args.held_out)]

    def as_pairs(groups):  # TRL's conversational preference format
        out = []
        for g in groups:
            (w, l), = g.pairs
            prompt = [m.model_dump() for m in g.messages]
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": g.answers[w]}],
                        "rejected": [{"role": "assistant", "content": g.answers[l]}]})
        return out

    result: dict = {"backbone": backbone, "train_pairs": args.pairs, "held_out_pairs": args.held_out,
                    "epochs": args.epochs, "batch_pairs": args.batch, "lr": args.lr, "max_length": args.max_length,
                    "threads": torch.get_num_threads()}

    # --- Duet ---------------------------------------------------------------------------
    duet = RewardTrainer(reward_config(backbone=backbone, lr=args.lr, replay_ratio=0.0,
                                             max_tokens=args.max_length, seed=0))
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(train), args.batch):
            duet.step(train[i:i + args.batch])
    duet_epoch = (time.perf_counter() - t0) / args.epochs
    result["duet"] = {"seconds_per_epoch": round(duet_epoch, 2), "held_out_accuracy": duet.accuracy(held)}
    del duet

    # --- TRL --------------------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(backbone)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    cfg = RewardConfig(output_dir=str(Path("bench/results/trl-out")), per_device_train_batch_size=args.batch,
                       num_train_epochs=args.epochs, learning_rate=args.lr, max_length=args.max_length,
                       report_to="none", save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False,
                       disable_tqdm=True, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    trl = TRLRewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(as_pairs(train)),
                           processing_class=tok)
    t0 = time.perf_counter()
    trl.train()
    trl_epoch = (time.perf_counter() - t0) / args.epochs
    model.eval()

    @torch.no_grad()
    def trl_score(messages) -> float:
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(text, return_tensors="pt", truncation=True, max_length=args.max_length, add_special_tokens=False)
        return float(model(**ids).logits[0, 0])

    result["trl"] = {"seconds_per_epoch": round(trl_epoch, 2),
                     "held_out_accuracy": held_out_accuracy(trl_score, as_pairs(held))}
    result["time_ratio_duet_over_trl"] = round(duet_epoch / trl_epoch, 3)
    result["target"] = "time ratio <= 1.0"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
