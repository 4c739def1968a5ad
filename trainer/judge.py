"""The gate's judges: reward models the policy was never optimised against.

The policy is trained to please the fine-tuned reward model, so that model's verdict on the policy says
little (it read "win rate 1.00" in a demo where users saw 0.77). The gate instead asks an ensemble of
linear Bradley–Terry models on features of a *frozen* sentence encoder (all-MiniLM-L6-v2):

    φ(x, y) = [e(y), e(x) ⊙ e(y), log(1 + tokens(y))],   r_j(x, y) = w_j · φ(x, y),
    w_j = argmin_{w,b}  mean_{(x, y₊, y₋) ∈ bootstrap_j(pairs)} −log σ(w·(φ(x,y₊) − φ(x,y₋)))
                      + mean_{(x, y, s) ∈ bootstrap_j(labels)} −log σ(s (w·φ(x,y) + b)) + λ‖w‖²

Labels are thumbs (s = +1 up, −1 down) and both-bad answers (s = −1): with only thumbs, the judges still
learn what users like (the bias b absorbs how often they say yes; verdicts compare w·φ alone).

Each judge is fitted on its own bootstrap resample of every vote (trained and held out), so the spread of
their verdicts carries the uncertainty of having few votes; the gate decides on a bound over judges and
prompts, never a point estimate. Fitting J judges takes well under a second; encoding is cached per text.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from feedback.contract.comparisons import ChatMessage
from trainer.examples import PromptGroup


class SentenceEncoder:
    """Mean-pooled, L2-normalised embeddings of a frozen encoder, cached by text."""

    def __init__(self, path: str, max_tokens: int = 256) -> None:
        self.path = path
        self.max_tokens = max_tokens
        self.cache: dict[str, torch.Tensor] = {}
        self._loaded = None  # (tokenizer, model), loaded at the first gate: the trainer starts faster

    def _load(self):
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer

            model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()
            model.requires_grad_(False)
            self._loaded = AutoTokenizer.from_pretrained(self.path), model
        return self._loaded

    @property
    def tokenizer(self):
        return self._load()[0]

    @property
    def model(self):
        return self._load()[1]

    @torch.no_grad()
    def __call__(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            for t, e in zip(chunk, emb):
                self.cache[t] = e
        out = torch.stack([self.cache[t] for t in texts])
        if len(self.cache) > 50_000:  # bounded: drop the oldest half
            for k in list(self.cache)[:25_000]:
                del self.cache[k]
        return out

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_text(messages: list[ChatMessage]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


class JudgeEnsemble:
    def __init__(self, encoder: SentenceEncoder, n_judges: int = 8, l2: float = 1e-3, seed: int = 0) -> None:
        self.encoder = encoder
        self.n_judges = n_judges
        self.l2 = l2
        self.seed = seed
        self.weights: torch.Tensor | None = None  # [J, features]

    def features(self, prompts: list[str], answers: list[str]) -> torch.Tensor:
        ex, ey = self.encoder(prompts), self.encoder(answers)
        length = torch.tensor([[math.log1p(self.encoder.n_tokens(a))] for a in answers])
        return torch.cat([ey, ex * ey, length], dim=-1)

    def fit(self, groups: list[PromptGroup], steps: int = 200) -> int:
        """Fit every judge on a bootstrap resample of the ordered pairs and of the labelled answers in
        `groups`; returns how many verdicts (pairs + labels) it fitted on."""
        prompts, winners, losers, lab_prompts, lab_answers, signs = [], [], [], [], [], []
        for g in groups:
            x = _prompt_text(g.messages)
            for w, l in g.pairs:
                prompts.append(x)
                winners.append(g.answers[w])
                losers.append(g.answers[l])
            for i, good in g.labelled:
                lab_prompts.append(x)
                lab_answers.append(g.answers[i])
                signs.append(1.0 if good else -1.0)
        if not prompts and not lab_prompts:
            self.weights = None
            return 0
        n_feat = self.features(["x"], ["y"]).shape[1]
        rng = random.Random(self.seed)
        w = torch.zeros(self.n_judges, n_feat, requires_grad=True)
        b = torch.zeros(self.n_judges, requires_grad=True)
        terms = []  # (bootstrapped rows [J, N, F], signs [J, N], with bias?) per kind of verdict
        if prompts:
            d = self.features(prompts, winners) - self.features(prompts, losers)  # [N, F]
            terms.append((d[_bootstrap(rng, len(d), self.n_judges)], None))
        if lab_prompts:
            p = self.features(lab_prompts, lab_answers)
            idx = _bootstrap(rng, len(p), self.n_judges)
            terms.append((p[idx], torch.tensor(signs)[idx]))
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.l2 * (w ** 2).sum()
            for rows, s in terms:
                z = torch.einsum("jnf,jf->jn", rows, w)
                loss = loss - F.logsigmoid(z if s is None else s * (z + b.unsqueeze(1))).mean(1).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weights = w.detach()
        return len(prompts) + len(lab_prompts)

    @torch.no_grad()
    def prefer(self, messages: list[ChatMessage], first: list[str], second: list[str]) -> torch.Tensor:
        """Each judge's verdict on each (first[i], second[i]) for one prompt: [J, n] of 1 (first better),
        ½ (equal score) or 0. Without a single ordered vote to fit on (only ties so far), every verdict is ½."""
        if self.weights is None:
            return torch.full((self.n_judges, len(first)), 0.5)
        x = [_prompt_text(messages)] * len(first)
        diff = (self.features(x, first) - self.features(x, second)) @ self.weights.T  # [n, J]
        return ((diff > 0).float() + 0.5 * (diff == 0).float()).T


def _bootstrap(rng: random.Random, n: int, times: int) -> torch.Tensor:
    """[times, n] row indices, each row a resample of range(n) with replacement."""
    return torch.tensor([[rng.randrange(n) for _ in range(n)] for _ in range(times)])


def bounded_win_rate(verdicts: list[torch.Tensor], level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Win rate with a bootstrap interval over prompts (verdicts on one prompt move together) and judges:
    each replicate draws prompts with replacement and one judge, and averages that judge's verdicts.
    verdicts: one [J, n] tensor per prompt. Returns (mean, low, high)."""
    if not verdicts:
        return float("nan"), 0.0, 1.0
    per = torch.stack([v.mean(dim=1) for v in verdicts])  # [prompts, J]
    point = float(per.mean())
    g = torch.Generator().manual_seed(seed)
    p_idx = torch.randint(len(per), (resamples, len(per)), generator=g)
    j_idx = torch.randint(per.shape[1], (resamples,), generator=g)
    reps = per[p_idx, j_idx.unsqueeze(1)].mean(dim=1)
    lo, hi = torch.quantile(reps, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return point, lo, hi
