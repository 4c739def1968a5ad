"""The policy and its update, read top to bottom: config, the model (frozen base + fp32 adapters, the base
doubling as the reference), batched sampling, per-token log-probs, an RLOO round on the groups that carry
signal, DPO on users' own pairs, a round on users' direct signals (KTO on thumbs and both-bad, SFT on edits),
state and export.

The trainer owns its policy state across rounds: adapter weights and AdamW moments in fp32 (bf16 only as
autocast where the device runs it fast — trainer/precision.py — never for optimizer steps), saved in every
checkpoint. The registry only receives exports.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from feedback.contract.comparisons import ChatMessage
from feedback.contract.registry import ADAPTER_DIR
from trainer.distributed import SINGLE, World, interleave
from trainer.examples import PromptGroup
from trainer.lora import (adapter_parameters, adapter_state_dict, adapters_off, add_adapters, peft_adapter,
                          load_adapter_state_dict, lora_layers, merged_state_dict)
from trainer.losses import (dpo_loss, kl_penalized_rewards, kto_loss, kto_weights, rloo_advantages,
                            rloo_clipped_loss, sft_loss)
from trainer.precision import Precision, autocast, contiguous_head, use_bf16
from trainer.reward_model import pick_device

RewardFn = Callable[[list[ChatMessage], list[str]], torch.Tensor]  # (prompt, k answers) -> k rewards
# (prompt token ids, n) -> n completions' token ids per prompt, drawn by the live engine; None: sample locally
Rollouts = Callable[[list[list[int]], int], list[list[list[int]]] | None]
EXPORT_DTYPE = torch.bfloat16  # what serving loads (the base model's own dtype)


@dataclass
class PolicyConfig:
    """Bound from the settings' policy_* fields by duet/wiring.py, where their defaults live (one place); the
    fields with defaults here are not settings."""
    algorithm: str  # "rloo": RLOO with the reward model + DPO on users' pairs; "dpo": the pairs alone
    beta: float  # KL weight (RLOO) / inverse temperature (DPO)
    lr: float  # of the adapters (full fine-tuning would want ~100× less)
    lora_rank: int
    lora_alpha: float
    # RLOO draws k answers for each prompt (serving samples them cheaply: K = 9 costs 1.25× K = 2) and trains on
    # at most `groups_per_round` groups whose rewards spread by at least `min_spread` (reward-model logits;
    # 0.5: the model prefers the group's best to its worst with P ≥ σ(0.5) = 0.62). A group without a hit has
    # only reward-model noise to follow; with a taste the base shows with p = 0.05, k = 8 holds a hit and a
    # miss in 1 − 0.05⁸ − 0.95⁸ = 34 % of groups, k = 4 in 19 %.
    k: int
    groups_per_round: int
    min_spread: float
    # The groups are split over this many AdamW steps; steps after the first see samples of an earlier policy and
    # weigh them by PPO's clipped ratio (clip_eps)
    steps_per_round: int
    clip_eps: float
    max_new_tokens: int  # when a prompt's own max_tokens is unknown, and for the gate's samples
    max_rollout_tokens: int  # users' own max_tokens, capped: a round's compute grows with answer length
    prompts_per_step: int  # ×2 pairs per DPO step, ×4 labelled answers per KTO / SFT step
    # Users' own pairs (each vote is an on-policy pair labelled without a reward model in between), replayed
    # every round with DPO: `pairs_per_round` of them, label smoothing for careless votes (cDPO).
    pairs_per_round: int
    label_smoothing: float
    dpo_weight: float  # its AdamW's learning rate relative to `lr`
    precision: Precision
    # Users' direct signals, trained in each round after the RLOO/DPO steps. Each loss has its own AdamW: KTO's
    # gradients are bounded by β/4 per answer, ~100× smaller than RLOO's, and would vanish in a shared second
    # moment. The weights are their learning rates relative to `lr` (Adam makes a loss's scale moot).
    kto_weight: float  # thumbs up/down and both-bad, KTO
    sft_weight: float  # edits, supervised
    seed: int
    temperature: float = 1.0  # the full distribution, as served at the API's default
    micro_batch: int = 4  # sequences per forward/backward (the logits of 4 × 150 tokens × 49k vocab: ~120 MB)
    # sequences per `generate` call when the trainer samples itself on CPU (a GPU takes a round's all at once):
    # 32 cost no speed there against 128 and hold a quarter of the memory (bench/README, trainer_round.py)
    sample_batch: int = 32
    max_tokens: int = 512  # prompt + answer, truncated from the left


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


def load_causal_lm(path: str, device: torch.device, bf16: bool | None = None):
    """A frozen model: bf16 where the device computes in bf16 (its own dtype, what serving computes with, half
    the memory), fp32 otherwise (the bf16 weights upcast exactly). Trained parameters (the adapters) are fp32."""
    from transformers import AutoModelForCausalLM

    bf16 = use_bf16(device) if bf16 is None else bf16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
    contiguous_head(model)
    model.eval()
    model.requires_grad_(False)
    return model


def informative_groups(rewards: list[torch.Tensor], keep: int, min_spread: float) -> tuple[list[int], int]:
    """The groups worth a policy-gradient step: those whose rewards spread (max − min) by at least `min_spread`,
    widest first, at most `keep`. Returns (their indices, how many were informative at all)."""
    spread = [float(r.max() - r.min()) if r.numel() > 1 else 0.0 for r in rewards]
    informative = sorted((i for i, s in enumerate(spread) if s >= min_spread), key=lambda i: -spread[i])
    return informative[:keep], len(informative)


class PolicyTrainer:
    def __init__(self, cfg: PolicyConfig, base_path: str, world: World = SINGLE) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.world = world  # under torchrun: each rank samples and trains its share (trainer/distributed.py)
        self.device = pick_device()
        self.bf16 = use_bf16(self.device, cfg.precision)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.base_path = base_path
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        self.model = load_causal_lm(base_path, self.device, self.bf16)
        add_adapters(self.model, cfg.lora_rank, cfg.lora_alpha)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(adapter_parameters(self.model), lr=cfg.lr, weight_decay=0.0)
        self.signal_optimizers = {  # see PolicyConfig.kto_weight
            name: torch.optim.AdamW(adapter_parameters(self.model), lr=cfg.lr * weight, weight_decay=0.0)
            for name, weight in (("kto", cfg.kto_weight), ("sft", cfg.sft_weight), ("dpo", cfg.dpo_weight))}
        self.updates = 0  # optimizer steps over the trainer's life
        # log π_ref(y|x) of users' answers, by (event id, answer index, text): the reference never changes
        self.ref_cache: dict[tuple[str, int, str], float] = {}

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
               batch_prompts: int = 16, max_new_tokens: int | None = None, seed: int | None = None) -> list[list[Sample]]:
        """n samples for each prompt, many prompts per `generate` call (left-padded). With `seed`, each call draws
        from its own seeded stream (the global one is left alone): two models sampled with the same seed on the
        same prompts draw paired answers, alike wherever the models agree."""
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
            with autocast(self.device, self.bf16), torch.random.fork_rng(
                    devices=[self.device] if self.device.type == "cuda" else [], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed + i)
                gen = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=t > 0,
                                     temperature=t if t > 0 else None, top_p=1.0, top_k=0,  # as vLLM serves
                                     max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
                                     num_return_sequences=n,
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

    def answer_sample(self, messages: list[ChatMessage], answer: str, stopped: bool = True) -> Sample:
        """A given answer (a user's vote or edit) as a completion of its prompt. It ends in end-of-sequence only
        if it stopped by itself: an answer cut at max_tokens must not teach the policy to stop there."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][:self.cfg.max_tokens // 2 - 1]
        return Sample(self.prompt_ids(messages), ids + [self.tokenizer.eos_token_id] if stopped else ids, answer)

    def group_sample(self, g: PromptGroup, i: int) -> Sample:
        return self.answer_sample(g.messages, g.answers[i], g.ended(i))

    def samples_from(self, prompt_ids: list[list[int]], completions: list[list[list[int]]]) -> list[list[Sample]]:
        return [[Sample(ids, list(c), self.tokenizer.decode(c, skip_special_tokens=True)) for c in group]
                for ids, group in zip(prompt_ids, completions)]

    def token_logprobs(self, model, samples: list[Sample], temperature: float = 1.0,
                       completions_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π(y_t | x, y_<t), right-padded, and the mask of the completions' tokens; with
        `temperature` T, of the policy sampled at T (logits / T): what users are served. With `completions_only`
        the vocabulary projection and softmax run only from the first completion token of the batch on (a third
        of the positions are prompt); column j is then position `offset + j`. Otherwise every position."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        width = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=self.device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=self.device)
        offset = min(len(s.prompt_ids) for s in samples) - 1 if completions_only else 0
        with autocast(self.device, self.bf16):
            logits = model(input_ids=input_ids, attention_mask=attn, logits_to_keep=width - offset).logits[:, :-1]
        logits = logits.float() if temperature == 1.0 else logits.float() / temperature
        targets = input_ids[:, offset + 1:]
        logp_all = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros_like(logp_all)
        for i, s in enumerate(samples):
            start = len(s.prompt_ids) - 1 - offset  # column predicting the first completion token
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
                   rollouts: Rollouts | None = None, temperature: float = 1.0,
                   max_new_tokens: int | None = None) -> dict[str, float]:
        """RLOO: k answers for each prompt — from `rollouts` (the live engine, which *is* this policy at the start
        of the round) or else batched `generate` here — all scored by `reward_fn`; on the groups that carry
        signal (`informative_groups`), KL-penalised rewards and leave-one-out advantages, and `steps_per_round`
        AdamW steps over them.

        Only the first step is on-policy. Later steps see samples of the policy as it was at the round's start
        (π_old) and weigh them by PPO's clipped ratio (`rloo_clipped_loss`), so π_old's log-probs of their groups
        are taken before the first step. Each group is one micro-batch: the first step's log-probs for the KL
        penalty come from its gradient pass itself (detached). `temperature`: the answers were sampled at T, so
        log-probs are the tempered policy's."""
        cfg = self.cfg
        clock = {"sample_s": 0.0, "reward_s": 0.0, "kl_s": 0.0, "update_s": 0.0}  # where a round's time goes
        t = time.perf_counter()
        ids = [self.prompt_ids(m) for m in prompts]
        world = self.world
        drawn = world.broadcast(rollouts(ids, cfg.k) if rollouts is not None and world.main else None)
        if drawn is not None:
            groups = self.samples_from(ids, drawn)
        else:  # each rank draws its share of the prompts
            mine = world.mine(len(prompts))
            share = self.sample(self.model, [prompts[i] for i in mine], cfg.k, temperature,
                                batch_prompts=max(1, cfg.sample_batch // cfg.k) if self.device.type == "cpu"
                                else len(prompts), max_new_tokens=max_new_tokens) if mine else []
            groups = interleave(world.gather(share), len(prompts), world.size)
        clock["sample_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # each rank scores its share; every rank then chooses from the same gathered rewards (scored everywhere,
        # rounding could differ with the thread count, and ranks choosing different groups would hang)
        share = [reward_fn(prompts[i], [s.text for s in groups[i]]).float().cpu() for i in world.mine(len(groups))]
        rewards = interleave(world.gather(share), len(groups), world.size)
        clock["reward_s"] = time.perf_counter() - t
        chosen, informative = informative_groups(rewards, cfg.groups_per_round, cfg.min_spread)
        steps = [chosen[i::max(1, min(cfg.steps_per_round, len(chosen)))]
                 for i in range(min(cfg.steps_per_round, len(chosen)))]
        # under several ranks each trains its share of every step's groups; the gradients are summed
        shares = [[step[i] for i in world.mine(len(step))] for step in steps]
        t = time.perf_counter()
        ref: dict[int, torch.Tensor] = {}
        old: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for s_i, step in enumerate(shares):
                for gi in step:
                    if s_i > 0:  # π_old's log-probs, before the first step moves the policy
                        old[gi], _ = self.token_logprobs(self.model, groups[gi], temperature)
                    with self.reference():
                        ref[gi], _ = self.token_logprobs(self.model, groups[gi], temperature)
        clock["kl_s"] = time.perf_counter() - t
        t = time.perf_counter()
        kls, loss_total, grad_norm = [], 0.0, 0.0
        for s_i, (step, share) in enumerate(zip(steps, shares)):
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            for gi in share:
                logp, mask = self.token_logprobs(self.model, groups[gi], temperature)
                behaviour = old.get(gi, logp.detach())
                kl = ((behaviour - ref[gi]) * mask).sum(-1)
                adv = rloo_advantages(kl_penalized_rewards(rewards[gi].to(self.device), kl, cfg.beta).view(1, -1))
                loss = rloo_clipped_loss(logp, behaviour, mask, adv.flatten(), cfg.clip_eps) / len(step)
                loss.backward()
                loss_total += float(loss.detach()) / len(steps)
                kls.append(kl.cpu())
            world.all_reduce_grads(adapter_parameters(self.model))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(adapter_parameters(self.model), 1.0))
            self.optimizer.step()
            self.updates += 1
        self.model.eval()
        clock["update_s"] = time.perf_counter() - t
        kls = [kl for share in world.gather(kls) for kl in share]
        loss_total = world.sum(loss_total)
        r = torch.cat(rewards)
        lengths = [len(s.completion_ids) for g in groups for s in g]
        return {"loss": loss_total, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "kl": float(torch.cat(kls).mean()) if kls else 0.0, "prompts": len(prompts),
                "groups_trained": len(chosen), "informative_fraction": informative / max(1, len(groups)),
                "updates": self.updates, "sampled_by": "serving" if drawn is not None else "trainer",
                "grad_norm": grad_norm,  # of the round's last step, before clipping
                "answer_tokens": sum(lengths) / max(1, len(lengths)), "temperature": temperature,
                **{k: round(v, 2) for k, v in clock.items()}}

    # --- DPO on users' own pairs ----------------------------------------------------------------------
    def pair_round(self, groups: list[PromptGroup], max_pairs: int | None = None) -> dict[str, float]:
        """DPO steps on users' ordered pairs in `groups` (at most `max_pairs`, newest groups first), with label
        smoothing ε for careless votes and the reference's log-probs cached per answer (they never change).
        Its own AdamW (`dpo_weight`), `prompts_per_step` × 2 pairs per step."""
        cap = self.cfg.pairs_per_round if max_pairs is None else max_pairs
        pairs = [(g, w, l) for g in groups for w, l in g.pairs][:cap]
        if not pairs:
            return {}
        self.rng.shuffle(pairs)
        per_step = self.cfg.prompts_per_step * 2
        losses, margins = [], []
        for i in range(0, len(pairs), per_step):
            step = pairs[i:i + per_step]
            samples = [self.group_sample(g, j) for g, w, l in step for j in (w, l)]
            ref = self._reference_logp([(g.event_id, j, g.answers[j]) for g, w, l in step for j in (w, l)], samples)
            stats: list[torch.Tensor] = []

            def loss_fn(j: int, seq: torch.Tensor, logp, mask) -> torch.Tensor:
                r = ref[j:j + len(seq)]
                stats.append(((seq[0::2] - r[0::2]) - (seq[1::2] - r[1::2])).detach().cpu())
                return dpo_loss(seq[0::2], seq[1::2], r[0::2], r[1::2], self.cfg.beta, self.cfg.label_smoothing)

            losses.append(self._step("dpo", samples, loss_fn, micro_batch=max(2, self.cfg.micro_batch // 2 * 2)))
            margins.append(float(torch.cat([m for share in self.world.gather(stats) for m in share]).mean()))
        return {"dpo_loss": sum(losses) / len(losses), "dpo_margin": sum(margins) / len(margins),
                "dpo_pairs": len(pairs), "updates": self.updates}

    def _reference_logp(self, keys: list[tuple[str, int, str]], samples: list[Sample]) -> torch.Tensor:
        """log π_ref(y|x) per sample, computed once per (event id, answer index, text); with ranks, each computes
        its share of the keys any rank lacks and all keep all. The union, not this rank's own list: the caches can
        differ (rank 0 alone restarts from base when users reject a candidate), and ranks that split different
        lists would pair values with the wrong keys."""
        todo = sorted(set().union(*self.world.gather([i for i, k in enumerate(keys) if k not in self.ref_cache])))
        mine = [todo[j] for j in self.world.mine(len(todo))]
        values: list[float] = []
        for j in range(0, len(mine), self.cfg.micro_batch):
            with torch.no_grad(), self.reference():
                values += self._sequence_logp(self.model, [samples[i] for i in mine[j:j + self.cfg.micro_batch]]).tolist()
        for i, v in zip(todo, interleave(self.world.gather(values), len(todo), self.world.size)):
            self.ref_cache[keys[i]] = v
        return torch.tensor([self.ref_cache[k] for k in keys], device=self.device)

    # --- users' direct signals: KTO on labelled answers, SFT on edits ---------------------------------------
    def signal_round(self, groups: list[PromptGroup], z_ref: float) -> dict[str, float]:
        """KTO steps on every labelled answer in `groups` (thumbs up = desirable; thumbs down and both-bad =
        undesirable; weights balance the two), then SFT steps on every demonstration (edit), each loss with
        its own AdamW, `prompts_per_step × 4` answers per step. `z_ref` is KTO's
        reference point, the policy's KL from the reference (the round's RLOO estimate)."""
        labelled = [(g, i, good) for g in groups for i, good in g.labelled]
        demos = [(g, i) for g in groups for i in g.demonstrations]
        out: dict[str, float] = {}
        per_step = self.cfg.prompts_per_step * 4
        if labelled:
            self.rng.shuffle(labelled)
            w_d, w_u = kto_weights(sum(good for *_, good in labelled), sum(not good for *_, good in labelled))
            losses = []
            for i in range(0, len(labelled), per_step):
                step = labelled[i:i + per_step]
                samples = [self.group_sample(g, j) for g, j, _ in step]
                good = torch.tensor([x[2] for x in step], device=self.device)
                ref = self._reference_logp([(g.event_id, j, g.answers[j]) for g, j, _ in step], samples)
                losses.append(self._step("kto", samples, lambda j, seq, logp, mask: kto_loss(
                    seq, ref[j:j + len(seq)], good[j:j + len(seq)], z_ref, self.cfg.beta, w_d, w_u)))
            out.update(kto_loss=sum(losses) / len(losses), kto_answers=len(labelled),
                       kto_desirable=sum(good for *_, good in labelled))
        if demos:
            self.rng.shuffle(demos)
            losses = [self._step("sft", [self.group_sample(g, j) for g, j in demos[i:i + per_step]],
                                 lambda j, seq, logp, mask: sft_loss(logp, mask))
                      for i in range(0, len(demos), per_step)]
            out.update(sft_loss=sum(losses) / len(losses), sft_answers=len(demos))
        return out

    def _sequence_logp(self, model, samples: list[Sample]) -> torch.Tensor:
        logp, mask = self.token_logprobs(model, samples)
        return (logp * mask).sum(-1)

    def _step(self, optimizer: str, samples: list[Sample], loss_fn, micro_batch: int | None = None) -> float:
        """One step of `optimizer` on the mean of `loss_fn(offset, seq_logp, logp, mask)` over micro-batches."""
        opt = self.signal_optimizers[optimizer]
        mbs = micro_batch or self.cfg.micro_batch
        self.model.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        starts = list(range(0, len(samples), mbs))
        for j in (starts[i] for i in self.world.mine(len(starts))):  # this rank's micro-batches
            mb = samples[j:j + mbs]
            logp, mask = self.token_logprobs(self.model, mb)
            loss = loss_fn(j, (logp * mask).sum(-1), logp, mask) * len(mb) / len(samples)
            loss.backward()
            total += float(loss.detach())
        self.world.all_reduce_grads(adapter_parameters(self.model))
        torch.nn.utils.clip_grad_norm_(adapter_parameters(self.model), 1.0)
        opt.step()
        self.updates += 1
        self.model.eval()
        return self.world.sum(total)

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
        base) + config + tokenizer; and the adapters alone in PEFT's format under `adapter/` (trainer/lora.py
        `peft_adapter`). Returns the merged weights it wrote."""
        state = merged_state_dict(self.model, EXPORT_DTYPE)
        self.model.config.save_pretrained(folder)
        self.model.generation_config.save_pretrained(folder)
        from safetensors.torch import save_file

        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
        save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder)
        adapter_cfg, adapter = peft_adapter(self.model, self.base_path)
        (Path(folder) / ADAPTER_DIR).mkdir(exist_ok=True)
        (Path(folder) / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        save_file(adapter, str(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
        return state


def changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: set[str] | None = None) -> float:
    """Share of weights whose value differs between two state dicts (same names and shapes), over `keys`."""
    changed = total = 0
    for k, v in a.items():
        if k in b and (keys is None or k in keys):
            changed += int((v != b[k]).sum())
            total += v.numel()
    return changed / total if total else 0.0
