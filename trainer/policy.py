"""The policy and its update, read top to bottom: config, the model (frozen base + fp32 adapters, the base
doubling as the reference), batched sampling, per-token log-probs, an RLOO round, a DPO round, a round on
users' direct signals (KTO on thumbs and both-bad, SFT on edits), state and export.

The trainer owns its policy state across rounds: adapter weights and AdamW moments in fp32 (bf16 only as
autocast on CUDA, never for optimizer steps), saved in every checkpoint. The registry only receives exports.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from feedback.comparisons import ChatMessage
from trainer.examples import PromptGroup
from trainer.lora import (adapter_parameters, adapter_state_dict, adapters_off, add_adapters,
                          load_adapter_state_dict, lora_layers, merged_state_dict)
from trainer.losses import (dpo_loss, kl_penalized_rewards, kto_loss, kto_weights, rloo_advantages, rloo_loss,
                            sft_loss)
from trainer.reward_model import pick_device

RewardFn = Callable[[list[ChatMessage], list[str]], torch.Tensor]  # (prompt, k answers) -> k rewards
# (prompt token ids, n) -> n completions' token ids per prompt, drawn by the live engine; None: sample locally
Rollouts = Callable[[list[list[int]], int], list[list[list[int]]] | None]
EXPORT_DTYPE = torch.bfloat16  # what serving loads (the base model's own dtype)


@dataclass
class PolicyConfig:
    algorithm: str = "rloo"  # or "dpo"
    beta: float = 0.05  # KL weight (RLOO) / inverse temperature (DPO)
    lr: float = 2e-4  # of the adapters (full fine-tuning would want ~100× less)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    k: int = 4  # RLOO samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # the full distribution, as served at the API's default
    prompts_per_step: int = 4  # prompts (RLOO) or pairs (DPO) per optimizer step
    micro_batch: int = 4  # sequences per forward/backward (the logits of 4 × 150 tokens × 49k vocab: ~120 MB)
    max_tokens: int = 512  # prompt + answer, truncated from the left
    # Users' direct signals, trained in each round after the RLOO/DPO steps. Each loss has its own AdamW: KTO's
    # gradients are bounded by β/4 per answer, ~100× smaller than RLOO's, and would vanish in a shared second
    # moment. The weights are their learning rates relative to `lr` (Adam makes a loss's scale moot).
    kto_weight: float = 1.0  # thumbs up/down and both-bad, KTO
    sft_weight: float = 1.0  # edits, supervised
    seed: int = 0


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


def load_causal_lm(path: str, device: torch.device):
    """A frozen model: fp32 on CPU (the bf16 weights upcast exactly; CPU bf16 matmuls are slow), bf16 on CUDA
    (what serving computes with, half the memory). Trained parameters (the adapters) are always fp32."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class PolicyTrainer:
    def __init__(self, cfg: PolicyConfig, base_path: str) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.device = pick_device()
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        self.model = load_causal_lm(base_path, self.device)
        add_adapters(self.model, cfg.lora_rank, cfg.lora_alpha)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(adapter_parameters(self.model), lr=cfg.lr, weight_decay=0.0)
        self.signal_optimizers = {  # see PolicyConfig.kto_weight
            name: torch.optim.AdamW(adapter_parameters(self.model), lr=cfg.lr * weight, weight_decay=0.0)
            for name, weight in (("kto", cfg.kto_weight), ("sft", cfg.sft_weight))}
        self.updates = 0  # optimizer steps over the trainer's life

    def reference(self):
        """Context manager: `self.model` as the reference (base) model."""
        return adapters_off(self.model)

    # --- sampling and log-probs --------------------------------------------------------------------------
    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        text = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-(self.cfg.max_tokens // 2):]

    @torch.no_grad()
    def sample(self, model, prompts: list[list[ChatMessage]], n: int, temperature: float | None = None,
               batch_prompts: int = 16) -> list[list[Sample]]:
        """n samples for each prompt, many prompts per `generate` call (left-padded)."""
        t = self.cfg.temperature if temperature is None else temperature
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        was_training = model.training
        model.eval()
        out: list[list[Sample]] = []
        for i in range(0, len(prompts), batch_prompts):
            ids = [self.prompt_ids(m) for m in prompts[i:i + batch_prompts]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
            attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
            with _autocast(self.device):
                gen = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=t > 0,
                                     temperature=t if t > 0 else None, top_p=1.0, top_k=0,  # as vLLM serves
                                     max_new_tokens=self.cfg.max_new_tokens, num_return_sequences=n,
                                     pad_token_id=pad)
            rows = gen[:, width:].tolist()
            for p, prompt in enumerate(ids):
                group = []
                for row in rows[p * n:(p + 1) * n]:
                    if eos in row:  # cut at (and keep) the first end-of-sequence
                        row = row[:row.index(eos) + 1]
                    group.append(Sample(prompt, row, self.tokenizer.decode(row, skip_special_tokens=True)))
                out.append(group)
        model.train(was_training)
        return out

    def answer_sample(self, messages: list[ChatMessage], answer: str) -> Sample:
        """A given answer (a user's vote or edit) as a completion of its prompt, ending in end-of-sequence."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][:self.cfg.max_tokens // 2 - 1]
        return Sample(self.prompt_ids(messages), ids + [self.tokenizer.eos_token_id], answer)

    def samples_from(self, prompt_ids: list[list[int]], completions: list[list[list[int]]]) -> list[list[Sample]]:
        return [[Sample(ids, list(c), self.tokenizer.decode(c, skip_special_tokens=True)) for c in group]
                for ids, group in zip(prompt_ids, completions)]

    def token_logprobs(self, model, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π(y_t | x, y_<t) of each completion, right-padded, and its mask."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        width = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=self.device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=self.device)
        with _autocast(self.device):
            logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        logp_all = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros_like(logp_all)
        for i, s in enumerate(samples):
            start = len(s.prompt_ids) - 1  # position predicting the first completion token
            mask[i, start:start + len(s.completion_ids)] = 1.0
        return logp_all, mask

    @torch.no_grad()
    def sequence_kl(self, model, samples: list[Sample], estimator: str = "k1") -> torch.Tensor:
        """Per sample, an unbiased estimate of KL(π‖π_ref) when y ~ π, summed over its tokens:
        "k1": Σ_t log π(y_t) − log π_ref(y_t) (what the RLOO reward is penalised with);
        "k3": Σ_t (ρ_t − 1) − log ρ_t with ρ_t = π_ref(y_t)/π(y_t), never negative, lower variance
        (Schulman, "Approximating KL divergence"; what the gate reports)."""
        out = []
        for i in range(0, len(samples), self.cfg.micro_batch):
            mb = samples[i:i + self.cfg.micro_batch]
            logp, mask = self.token_logprobs(model, mb)
            with self.reference():
                ref, _ = self.token_logprobs(self.model, mb)
            log_ratio = logp - ref
            per_token = log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio
            out.append((per_token * mask).sum(-1))
        return torch.cat(out)

    # --- RLOO ---------------------------------------------------------------------------------------------
    def rloo_round(self, prompts: list[list[ChatMessage]], reward_fn: RewardFn,
                   rollouts: Rollouts | None = None) -> dict[str, float]:
        """For each step of `prompts_per_step` prompts: k samples each, rewards, KL-penalised rewards,
        leave-one-out advantages, one AdamW step on the adapters. Samples come from `rollouts` (the live
        engine, which is this policy at the start of the round: all of the round's samples are drawn then,
        at once) or else from one batched `generate` per step."""
        cfg = self.cfg
        rewards_all, kls, losses, lengths = [], [], [], []
        clock = {"sample_s": 0.0, "reward_s": 0.0, "kl_s": 0.0, "update_s": 0.0}  # where a round's time goes
        t = time.perf_counter()
        ids = [self.prompt_ids(m) for m in prompts]
        drawn = rollouts(ids, cfg.k) if rollouts is not None else None
        served = self.samples_from(ids, drawn) if drawn is not None else None
        clock["sample_s"] += time.perf_counter() - t
        for i in range(0, len(prompts), cfg.prompts_per_step):
            step_prompts = prompts[i:i + cfg.prompts_per_step]
            t = time.perf_counter()
            groups = served[i:i + cfg.prompts_per_step] if served else self.sample(self.model, step_prompts, cfg.k)
            clock["sample_s"] += time.perf_counter() - t
            t = time.perf_counter()
            rewards = torch.stack([reward_fn(m, [s.text for s in g]).float().cpu()
                                   for m, g in zip(step_prompts, groups)]).to(self.device)  # [P, k]
            clock["reward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            flat = [s for g in groups for s in g]
            lengths += [len(s.completion_ids) for s in flat]
            kl = self.sequence_kl(self.model, flat)
            clock["kl_s"] += time.perf_counter() - t
            t = time.perf_counter()
            shaped = kl_penalized_rewards(rewards.flatten(), kl, cfg.beta)
            adv = rloo_advantages(shaped.view(len(groups), cfg.k)).flatten()
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for j in range(0, len(flat), cfg.micro_batch):
                mb = flat[j:j + cfg.micro_batch]
                logp, mask = self.token_logprobs(self.model, mb)
                loss = rloo_loss(logp, mask, adv[j:j + len(mb)]) * len(mb) / len(flat)
                loss.backward()
                step_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(adapter_parameters(self.model), 1.0)
            self.optimizer.step()
            self.updates += 1
            self.model.eval()
            clock["update_s"] += time.perf_counter() - t
            rewards_all.append(rewards.flatten())
            kls.append(kl)
            losses.append(step_loss)
        r, kl = torch.cat(rewards_all), torch.cat(kls)
        return {"loss": sum(losses) / len(losses), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "kl": float(kl.mean()), "prompts": len(prompts), "updates": self.updates,
                "sampled_by": "serving" if served else "trainer",
                "answer_tokens": sum(lengths) / len(lengths),
                **{k: round(v, 2) for k, v in clock.items()}}

    # --- DPO ----------------------------------------------------------------------------------------------
    def dpo_round(self, groups: list[PromptGroup]) -> dict[str, float]:
        pairs = [(g, w, l) for g in groups for w, l in g.pairs]
        self.rng.shuffle(pairs)
        losses, margins = [], []
        for i in range(0, len(pairs), self.cfg.prompts_per_step):
            step = pairs[i:i + self.cfg.prompts_per_step]
            samples = [self.answer_sample(g.messages, g.answers[j]) for g, w, l in step for j in (w, l)]
            with torch.no_grad(), self.reference():
                ref_logp, mask = self.token_logprobs(self.model, samples)
            ref_seq = (ref_logp * mask).sum(-1)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            logp, _ = self.token_logprobs(self.model, samples)
            seq = (logp * mask).sum(-1)
            loss = dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], self.cfg.beta)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter_parameters(self.model), 1.0)
            self.optimizer.step()
            self.updates += 1
            self.model.eval()
            losses.append(float(loss.detach()))
            margins.append(float(((seq[0::2] - ref_seq[0::2]) - (seq[1::2] - ref_seq[1::2])).mean().detach()))
        n = max(1, len(losses))
        return {"loss": sum(losses) / n, "margin": sum(margins) / n, "pairs": len(pairs), "updates": self.updates}

    # --- users' direct signals: KTO on labelled answers, SFT on edits ---------------------------------------
    def signal_round(self, groups: list[PromptGroup], z_ref: float) -> dict[str, float]:
        """KTO steps on every labelled answer in `groups` (thumbs up = desirable; thumbs down and both-bad =
        undesirable; weights balance the two), then SFT steps on every demonstration (edit), each loss with
        its own AdamW, `prompts_per_step × k` answers per step (as many as an RLOO step). `z_ref` is KTO's
        reference point, the policy's KL from the reference (the round's RLOO estimate)."""
        labelled = [(g, i, good) for g in groups for i, good in g.labelled]
        demos = [(g, i) for g in groups for i in g.demonstrations]
        out: dict[str, float] = {}
        per_step = self.cfg.prompts_per_step * self.cfg.k
        if labelled:
            self.rng.shuffle(labelled)
            w_d, w_u = kto_weights(sum(good for *_, good in labelled), sum(not good for *_, good in labelled))
            losses = []
            for i in range(0, len(labelled), per_step):
                step = labelled[i:i + per_step]
                samples = [self.answer_sample(g.messages, g.answers[j]) for g, j, _ in step]
                good = torch.tensor([x[2] for x in step], device=self.device)
                with torch.no_grad(), self.reference():
                    ref = torch.cat([self._sequence_logp(self.model, samples[j:j + self.cfg.micro_batch])
                                     for j in range(0, len(samples), self.cfg.micro_batch)])
                losses.append(self._step("kto", samples, lambda j, seq, logp, mask: kto_loss(
                    seq, ref[j:j + len(seq)], good[j:j + len(seq)], z_ref, self.cfg.beta, w_d, w_u)))
            out.update(kto_loss=sum(losses) / len(losses), kto_answers=len(labelled),
                       kto_desirable=sum(good for *_, good in labelled))
        if demos:
            self.rng.shuffle(demos)
            losses = [self._step("sft", [self.answer_sample(g.messages, g.answers[j]) for g, j in demos[i:i + per_step]],
                                 lambda j, seq, logp, mask: sft_loss(logp, mask))
                      for i in range(0, len(demos), per_step)]
            out.update(sft_loss=sum(losses) / len(losses), sft_answers=len(demos))
        return out

    def _sequence_logp(self, model, samples: list[Sample]) -> torch.Tensor:
        logp, mask = self.token_logprobs(model, samples)
        return (logp * mask).sum(-1)

    def _step(self, optimizer: str, samples: list[Sample], loss_fn) -> float:
        """One step of `optimizer` on the mean of `loss_fn(offset, seq_logp, logp, mask)` over micro-batches."""
        opt = self.signal_optimizers[optimizer]
        self.model.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(0, len(samples), self.cfg.micro_batch):
            mb = samples[j:j + self.cfg.micro_batch]
            logp, mask = self.token_logprobs(self.model, mb)
            loss = loss_fn(j, (logp * mask).sum(-1), logp, mask) * len(mb) / len(samples)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(adapter_parameters(self.model), 1.0)
        opt.step()
        self.updates += 1
        self.model.eval()
        return total

    # --- state and export ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: fp32 adapters, AdamW moments, the update count."""
        return {"adapters": adapter_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "signal_optimizers": {k: o.state_dict() for k, o in self.signal_optimizers.items()},
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        load_adapter_state_dict(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, opt_state in state.get("signal_optimizers", {}).items():  # absent in older checkpoints
            self.signal_optimizers[name].load_state_dict(opt_state)
        self.updates = int(state["updates"])

    def trained_weights(self) -> set[str]:
        """Names of the exported weights the adapters change."""
        return {f"{name}.weight" for name in lora_layers(self.model)}

    def export(self, folder: Path) -> dict[str, torch.Tensor]:
        """The layout vLLM loads: model.safetensors (adapters merged in fp32, then cast to bf16 like the
        base) + config + tokenizer. Returns the weights it wrote."""
        state = merged_state_dict(self.model, EXPORT_DTYPE)
        self.model.config.save_pretrained(folder)
        self.model.generation_config.save_pretrained(folder)
        from safetensors.torch import save_file

        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
        save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder)
        return state


def changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: set[str] | None = None) -> float:
    """Share of weights whose value differs between two state dicts (same names and shapes), over `keys`."""
    changed = total = 0
    for k, v in a.items():
        if k in b and (keys is None or k in keys):
            changed += int((v != b[k]).sum())
            total += v.numel()
    return changed / total if total else 0.0
