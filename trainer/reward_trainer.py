"""The reward-model update, read top to bottom: a config, one step on a batch of prompt groups
(new ones mixed with replayed ones), and held-out accuracy."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import torch

from trainer.distributed import SINGLE, World
from trainer.examples import PromptGroup
from trainer.losses import kwise_loss, pointwise_loss, prompt_aware_loss, tie_loss
from trainer.precision import use_bf16
from trainer.reward_model import RewardModel, pick_device


@dataclass
class RewardTrainerConfig:
    """Bound from the settings' rm_* fields by duet/wiring.py, where their defaults live; the fields with defaults
    here are not settings."""
    backbone: str  # HF folder of the backbone
    loss: str  # "bradley_terry" or "prompt_aware" (Song et al., 2023)
    lr: float
    replay_ratio: float  # replayed groups per new group in a step
    replay_capacity: int
    utility_eps: float
    max_tokens: int
    tie_weight: float  # a group with only ties says little about quality: it weighs this much in a step
    precision: str  # trainer/precision.py
    seed: int
    weight_decay: float = 0.0
    grad_clip: float = 1.0


class ReplayBuffer:
    """Bounded memory of trained prompt groups; old ones fall out first."""

    def __init__(self, capacity: int, items: list[PromptGroup] | None = None, seed: int = 0) -> None:
        self.items: deque[PromptGroup] = deque(items or [], maxlen=capacity)
        self.rng = random.Random(seed)

    def add(self, groups: list[PromptGroup]) -> None:
        self.items.extend(groups)

    def sample(self, n: int) -> list[PromptGroup]:
        return self.rng.sample(list(self.items), min(n, len(self.items)))


class RewardTrainer:
    def __init__(self, cfg: RewardTrainerConfig, model: RewardModel | None = None, world: World = SINGLE) -> None:
        self.cfg = cfg
        self.world = world  # under torchrun: each rank computes its share of a step (trainer/distributed.py)
        self.device = pick_device()
        self.model = (model or RewardModel.from_backbone(cfg.backbone, cfg.max_tokens, cfg.seed)).to(self.device)
        self.model.bf16 = use_bf16(self.device, cfg.precision)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.replay = ReplayBuffer(cfg.replay_capacity, seed=cfg.seed)
        self.steps = 0

    def _rewards(self, groups: list[PromptGroup]) -> list[torch.Tensor]:
        """One forward pass over every answer of every group; rewards split back per group."""
        texts = [self.model.format(g.messages, a) for g in groups for a in g.answers]
        flat = self.model(texts)
        return list(torch.split(flat, [len(g.answers) for g in groups]))

    def group_loss(self, rewards: torch.Tensor, g: PromptGroup) -> torch.Tensor:
        """The group's ordering loss (pairs and ties), plus the pointwise term on its labelled answers (thumbs,
        both bad) — a group with only labels (a thumbs vote) has only that term."""
        order = self._order_loss(rewards, g) if g.pairs or g.ties else None
        if not g.labelled:
            return order if order is not None else rewards.sum() * 0.0
        idx, good = zip(*g.labelled)
        point = pointwise_loss(rewards[list(idx)], torch.tensor(good, device=rewards.device))
        return point if order is None else order + point

    def _order_loss(self, rewards: torch.Tensor, g: PromptGroup) -> torch.Tensor:
        if self.cfg.loss == "prompt_aware" and g.pairs:
            w, l = zip(*g.pairs)
            open_ended = torch.full((len(w),), g.open_ended, dtype=torch.bool, device=rewards.device)
            loss = prompt_aware_loss(rewards[list(w)], rewards[list(l)], open_ended, self.cfg.utility_eps)
            if g.ties:
                a, b = zip(*g.ties)
                loss = loss + tie_loss(rewards[list(a)], rewards[list(b)])
            return loss
        return kwise_loss(rewards, g.pairs, g.ties)

    def step(self, new: list[PromptGroup], replay: int | None = None) -> dict[str, float]:
        """One optimizer step on `new` plus replayed groups (`replay_ratio` per new one, or `replay`); then `new`
        joins the replay buffer. With no new groups it is a replay-only step (the trainer's idle time)."""
        return self.train_on(self.draw(new, replay), len(new))

    def draw(self, new: list[PromptGroup], replay: int | None = None) -> list[PromptGroup]:
        """A step's batch: `new`, then the replayed groups."""
        return new + self.replay.sample(int(len(new) * self.cfg.replay_ratio) if replay is None else replay)

    def train_on(self, batch: list[PromptGroup], n_new: int) -> dict[str, float]:
        """One optimizer step on `batch`, whose first `n_new` groups are new (they join the replay buffer). Under
        several ranks each computes the loss of its share of the groups, scaled to the batch's weighted mean, and
        the gradients are summed before the step: the step one process would take."""
        if not batch:
            return {"loss": float("nan"), "new": 0, "replayed": 0}
        self.model.train()
        # Weighted mean over prompts: each prompt counts once, however many pairs its ranking has; tie-only groups
        # count `tie_weight` (mostly "both alike", little about what users want).
        weights = torch.tensor([self.cfg.tie_weight if g.ties and not (g.pairs or g.labelled) else 1.0
                                for g in batch], device=self.device)
        mine = self.world.mine(len(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        if mine:
            share = [batch[i] for i in mine]
            losses = torch.stack([self.group_loss(r, g) for r, g in zip(self._rewards(share), share)])
            loss = (losses * weights[mine]).sum() / weights.sum()
            loss.backward()
        self.world.all_reduce_grads(self.model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.replay.add(batch[:n_new])
        self.steps += 1
        return {"loss": self.world.sum(float(loss.detach())), "new": n_new, "replayed": len(batch) - n_new,
                "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def agreement(self, g: PromptGroup) -> float | None:
        """How far the model agrees with one group's verdicts (its share of pairs ranked the same way and of
        labels on the same side of 0); None when the group has neither (ties only, or an edit)."""
        if not (g.pairs or g.labelled):
            return None
        self.model.eval()
        r = self._rewards([g])[0]
        hits = [float(r[w] > r[l]) for w, l in g.pairs] + [float((r[j] > 0) == good) for j, good in g.labelled]
        return sum(hits) / len(hits)

    @torch.no_grad()
    def accuracy(self, groups: list[PromptGroup], batch: int = 16) -> float | None:
        """Share of verdicts the model agrees with: ordered pairs ranked as the voter ranked them (ties ignored),
        and labelled answers on the right side of 0 (σ(r) > ½ for a thumbs-up)."""
        self.model.eval()
        right = total = 0
        for i in range(0, len(groups), batch):
            chunk = [g for g in groups[i:i + batch] if g.pairs or g.labelled]
            if not chunk:
                continue
            for r, g in zip(self._rewards(chunk), chunk):
                for w, l in g.pairs:
                    right += int(r[w] > r[l])
                    total += 1
                for j, good in g.labelled:
                    right += int((r[j] > 0) == good)
                    total += 1
        return right / total if total else None

