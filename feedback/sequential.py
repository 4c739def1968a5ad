"""Anytime-valid confidence sequences for a mean in [0, 1]: an interval that may be looked at after every
observation and still covers the true mean at every time at once with probability ≥ 1 − α.

Used where Duet decides from a stream of verdicts and must be allowed to stop as soon as the evidence is
in: promoting a candidate version from users' cross-version votes (win 1, tie ½, loss 0), and flagging a
voter whose agreement with the others is below chance. A fixed-n interval checked after every vote would
cross any margin by chance eventually; this one does not.

Boundary: Robbins' normal mixture for sub-Gaussian sums (Howard, Ramdas, McAuliffe & Sekhon 2021, eq. 14).
Observations in [0, 1] are ¼-sub-Gaussian, so with S_t = Σ (x_i − μ) and intrinsic time v = t/4,

    P(∃ t: |S_t| ≥ u(v)) ≤ α,   u(v) = sqrt((v + ρ) · log((v + ρ) / (ρ · α²)))

and the confidence sequence is  mean_t ± u(t/4) / t,  clipped to [0, 1]. The mixture over λ ~ N(0, 1/ρ) of
exp(λ S_t − λ² v / 2) is the supermartingale sqrt(ρ / (v + ρ)) · exp(S_t² / (2 (v + ρ))), symmetric in S_t,
so Ville's inequality bounds both sides at once: the level is two-sided α (each side ≤ α/2 where wins and
losses are symmetric, as in an A/A test). An earlier version put (α/2)² inside the log, a level of α/2
(simulated A/A: 3.5 % at α = 0.1), and took longer to decide than it needed. ρ sets where the boundary is
tightest; it is chosen for `tuned_for` observations (default 200).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


def mixture_boundary(v: float, rho: float, alpha: float) -> float:
    """u(v) above: two-sided normal-mixture boundary at intrinsic time v, level α."""
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha ** 2)))


@lru_cache(maxsize=64)  # every ConfidenceSequence asks again (the voter screen builds one per vote)
def rho_for(n: int, alpha: float) -> float:
    """The ρ that makes the boundary tightest (smallest u(v)/v) at v = n/4, by a log-spaced search."""
    v = n / 4
    candidates = [v * 10 ** (k / 20) for k in range(-60, 21)]
    return min(candidates, key=lambda r: mixture_boundary(v, r, alpha))


@dataclass
class ConfidenceSequence:
    alpha: float = 0.05
    tuned_for: int = 200
    n: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.rho = rho_for(self.tuned_for, self.alpha)

    def update(self, x: float) -> None:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"observations must lie in [0, 1], got {x}")
        self.n += 1
        self.total += x

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def interval(self) -> tuple[float, float]:
        if not self.n:
            return 0.0, 1.0
        half = mixture_boundary(self.n / 4, self.rho, self.alpha) / self.n
        return max(0.0, self.total / self.n - half), min(1.0, self.total / self.n + half)

    def decide(self, margin: float = 0.5) -> str:
        """'above' once the whole interval is above `margin`, 'below' once it is below, else 'undecided'."""
        low, high = self.interval()
        return "above" if low > margin else "below" if high < margin else "undecided"
