"""Statistics over verdicts between model versions: win rates with bootstrap confidence intervals and
Bradley–Terry scores (ties count ½ to each side, as in Chatbot Arena's leaderboard)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from feedback.loop_status import Battle


def win_rate(wins: float, ties: float, losses: float) -> float | None:
    """(wins + ties/2) / n."""
    n = wins + ties + losses
    return (wins + 0.5 * ties) / n if n else None


def bootstrap_win_rate(wins: int, ties: int, losses: int, rounds: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """Win rate and its percentile-bootstrap interval, resampling the n verdicts with replacement. A
    resample of n verdicts of three kinds is one multinomial draw of their counts, so the cost does not
    grow with n (drawing n indices per round made a dashboard holding a 100,000-verdict evaluation take
    minutes)."""
    n = wins + ties + losses
    if n == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.array([wins, ties, losses]) / n, size=rounds)
    means = (draws[:, 0] + 0.5 * draws[:, 1]) / n
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (wins + 0.5 * ties) / n, float(lo), float(hi)


def bootstrap_win_rate_by_prompt(scores: list[list[float]], rounds: int = 2000, level: float = 0.95,
                                 seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """Win rate and a cluster-bootstrap interval: `scores[i]` are prompt i's verdicts (1 win, ½ tie,
    0 loss) and whole prompts are resampled. Verdicts on one prompt move together (a policy that is
    shorter on a prompt tends to be shorter on every sample of it), so resampling single verdicts
    would claim more certainty about unseen prompts than a few dozen prompts give."""
    groups = [g for g in scores if g]
    if not groups:
        return None, None, None
    sums = np.array([sum(g) for g in groups], dtype=float)
    sizes = np.array([len(g) for g in groups], dtype=float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(groups), size=(rounds, len(groups)))
    means = sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(sums.sum() / sizes.sum()), float(lo), float(hi)


def bradley_terry(outcomes: np.ndarray, a: np.ndarray, b: np.ndarray, players: int, iters: int = 200,
                  prior: float = 0.5, counts: np.ndarray | None = None) -> np.ndarray:
    """Log-strengths θ maximising Σ c·[s·log σ(θ_a − θ_b) + (1 − s)·log σ(θ_b − θ_a)] over verdicts
    (s = 1 win, ½ tie, 0 loss for a; c how many times that verdict was given, default 1), by Hunter's MM
    updates p_i ← W_i / Σ_j n_ij / (p_i + p_j). `prior` adds that many virtual ties to every pair that met
    (c > 0), so a version that never lost or never won still gets a finite score. Returned centred."""
    c = np.ones(len(outcomes)) if counts is None else np.asarray(counts, dtype=float)
    wins = np.zeros(players)
    games = np.zeros((players, players))
    np.add.at(wins, a, outcomes * c)
    np.add.at(wins, b, (1.0 - outcomes) * c)
    np.add.at(games, (a, b), c)
    games = games + games.T
    met = games > 0
    games = games + prior * met
    wins = wins + 0.5 * prior * met.sum(axis=1)
    p = np.ones(players)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, wins / np.maximum(denom, 1e-12), p)
        new = new / np.exp(np.log(np.maximum(new, 1e-12)).mean())
        if np.allclose(new, p, rtol=1e-9, atol=1e-12):
            p = new
            break
        p = new
    theta = np.log(np.maximum(p, 1e-12))
    return theta - theta.mean()


@dataclass
class Rating:
    model_version: str
    score: float  # Elo-like: 1000 + 400·log10 of strength relative to the anchor
    ci_low: float
    ci_high: float
    battles: int


def leaderboard(battles: Iterable[Battle], anchor: str = "base", rounds: int = 300, level: float = 0.95,
                seed: int = 0) -> list[Rating]:
    """Bradley–Terry scores per version with percentile-bootstrap intervals (verdicts resampled).

    Verdicts are kept as counts per (a, b, outcome), never one entry each, and a bootstrap resample of n
    verdicts is one multinomial draw of those counts: the cost grows with the number of kinds of verdict,
    not with how many there are."""
    names: dict[str, int] = {}
    tally: dict[tuple[int, int, float], int] = defaultdict(int)
    for bt in battles:
        ia, ib = (names.setdefault(m, len(names)) for m in (bt.model_a, bt.model_b))
        for s, count in ((1.0, bt.wins), (0.5, bt.ties), (0.0, bt.losses)):
            if count:
                tally[(ia, ib, s)] += count
    if not tally:
        return []
    keys = list(tally)
    a, b, s = (np.array([key[i] for key in keys]) for i in range(3))
    c = np.array([tally[key] for key in keys], dtype=float)
    k = len(names)
    ref = names.get(anchor)

    def elo(theta: np.ndarray) -> np.ndarray:
        shifted = theta - (theta[ref] if ref is not None else 0.0)
        return 1000 + 400 * shifted / np.log(10)

    point = elo(bradley_terry(s, a, b, k, counts=c))
    rng = np.random.default_rng(seed)
    n = int(c.sum())
    boots = np.stack([elo(bradley_terry(s, a, b, k, counts=rng.multinomial(n, c / n))) for _ in range(rounds)])
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2], axis=0)
    count = defaultdict(int)
    for i, j, m in zip(a, b, c):
        count[int(i)] += int(m)
        count[int(j)] += int(m)
    ratings = [Rating(name, float(point[i]), float(lo[i]), float(hi[i]), count[i]) for name, i in names.items()]
    return sorted(ratings, key=lambda r: -r.score)


def length_controlled(outcomes: np.ndarray, len_a: np.ndarray, len_b: np.ndarray, iters: int = 50,
                      l2: float = 1e-3) -> tuple[float, float]:
    """Style control (Chatbot Arena's, for length): a Bradley–Terry model of a's win with the answers'
    length difference as a covariate,
        P(a wins) = σ(θ + γ · d),   d = log(1 + len_a) − log(1 + len_b),
    fitted by Newton's method on the log-likelihood Σ s log p + (1 − s) log(1 − p) (s = 1 win, ½ tie,
    0 loss; a small ridge keeps it finite when one side always wins). Returns (σ(θ), γ): σ(θ) is the win
    rate a would have against b at equal lengths — the length-controlled win rate."""
    s = np.asarray(outcomes, dtype=float)
    d = np.log1p(np.asarray(len_a, dtype=float)) - np.log1p(np.asarray(len_b, dtype=float))
    x = np.stack([np.ones_like(d), d], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (s - p) - l2 * w
        hess = -(x.T * (p * (1 - p))) @ x - l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0]))), float(w[1])
