"""Policy updates anchored to the reference (base) model: RLOO with a reward function (the reward
model), or DPO directly on vote pairs. Read top to bottom: config, sampling, log-probs, the two rounds."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from feedback.comparisons import ChatMessage
from trainer.examples import PromptGroup
from trainer.losses import dpo_loss, rloo_advantages, rloo_loss
from trainer.reward_model import pick_device

RewardFn = Callable[[list[ChatMessage], list[str]], torch.Tensor]  # (prompt, k answers) -> k rewards


@dataclass
class PolicyConfig:
    algorithm: str = "rloo"  # or "dpo"
    beta: float = 0.05  # KL weight (RLOO) / inverse temperature (DPO)
    lr: float = 1e-6
    k: int = 4  # RLOO samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    grad_accum: int = 4  # prompts (RLOO) or pairs (DPO) per optimizer step
    max_tokens: int = 512  # prompt + answer, truncated from the left
    seed: int = 0


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


def load_causal_lm(path: str, device: torch.device, trainable: bool):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


class PolicyTrainer:
    def __init__(self, cfg: PolicyConfig, policy_path: str, ref_path: str) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.device = pick_device()
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.policy = load_causal_lm(policy_path, self.device, trainable=True)
        self.ref = load_causal_lm(ref_path, self.device, trainable=False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr)

    # --- helpers ----------------------------------------------------------------------------
    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        text = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-(self.cfg.max_tokens // 2):]

    @torch.no_grad()
    def sample(self, model, messages: list[ChatMessage], n: int, temperature: float | None = None) -> list[Sample]:
        ids = self.prompt_ids(messages)
        t = self.cfg.temperature if temperature is None else temperature
        out = model.generate(torch.tensor([ids], device=self.device), do_sample=t > 0, temperature=t if t > 0 else None,
                             top_p=1.0, top_k=0,  # the full distribution, as vLLM serves it (HF defaults to 50)
                             max_new_tokens=self.cfg.max_new_tokens, num_return_sequences=n,
                             pad_token_id=self.tokenizer.pad_token_id)
        samples = []
        for row in out[:, len(ids):].tolist():
            # cut at (and keep) the first end-of-sequence; drop padding after it
            if self.tokenizer.eos_token_id in row:
                row = row[:row.index(self.tokenizer.eos_token_id) + 1]
            samples.append(Sample(ids, row, self.tokenizer.decode(row, skip_special_tokens=True)))
        return samples

    def token_logprobs(self, model, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π(y_t | x, y_<t) of each completion, right-padded, and its mask."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        width = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=self.device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=self.device)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        logp_all = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros_like(logp_all)
        for i, s in enumerate(samples):
            start = len(s.prompt_ids) - 1  # position predicting the first completion token
            mask[i, start:start + len(s.completion_ids)] = 1.0
        return logp_all, mask

    # --- RLOO -----------------------------------------------------------------------------------
    def rloo_round(self, prompts: list[list[ChatMessage]], reward_fn: RewardFn) -> dict[str, float]:
        rewards_all, kls, losses = [], [], []
        self.optimizer.zero_grad(set_to_none=True)
        for i, messages in enumerate(prompts):
            self.policy.eval()
            samples = self.sample(self.policy, messages, self.cfg.k)
            rewards = reward_fn(messages, [s.text for s in samples]).to(self.device).float()
            self.policy.train()
            logp, mask = self.token_logprobs(self.policy, samples)
            with torch.no_grad():
                ref_logp, _ = self.token_logprobs(self.ref, samples)
            loss = rloo_loss(logp, ref_logp, mask, rloo_advantages(rewards), self.cfg.beta)
            (loss / self.cfg.grad_accum).backward()
            if (i + 1) % self.cfg.grad_accum == 0 or i == len(prompts) - 1:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            rewards_all.append(rewards)
            kls.append(float((((logp - ref_logp) * mask).sum(-1)).mean().detach()))
            losses.append(float(loss.detach()))
        r = torch.cat(rewards_all)
        return {"loss": sum(losses) / len(losses), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "kl": sum(kls) / len(kls), "prompts": len(prompts)}

    # --- DPO ------------------------------------------------------------------------------------
    def dpo_round(self, groups: list[PromptGroup]) -> dict[str, float]:
        pairs = [(g, w, l) for g in groups for w, l in g.pairs]
        self.rng.shuffle(pairs)
        losses, margins = [], []
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (g, w, l) in enumerate(pairs):
            ids = self.prompt_ids(g.messages)
            eos = [self.tokenizer.eos_token_id]
            samples = [Sample(ids, self.tokenizer(g.answers[j], add_special_tokens=False)["input_ids"] + eos, "")
                       for j in (w, l)]
            logp, mask = self.token_logprobs(self.policy, samples)
            with torch.no_grad():
                ref_logp, _ = self.token_logprobs(self.ref, samples)
            seq, ref_seq = (logp * mask).sum(-1), (ref_logp * mask).sum(-1)
            loss = dpo_loss(seq[0], seq[1], ref_seq[0], ref_seq[1], self.cfg.beta)
            (loss / self.cfg.grad_accum).backward()
            if (i + 1) % self.cfg.grad_accum == 0 or i == len(pairs) - 1:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            margins.append(float(((seq[0] - ref_seq[0]) - (seq[1] - ref_seq[1])).detach()))
        n = max(1, len(losses))
        return {"loss": sum(losses) / n, "margin": sum(margins) / n, "pairs": len(pairs)}

    def save(self, folder) -> None:
        """The layout vLLM loads: model.safetensors + config + tokenizer (bf16 like the base)."""
        self.policy.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        self.policy.to(torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.tokenizer.save_pretrained(folder)
