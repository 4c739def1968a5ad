"""Anytime-valid confidence sequences: they cover the truth at every look, and they do decide."""

import random

import pytest

from feedback.sequential import ConfidenceSequence, mixture_boundary


def test_boundary_by_hand():
    # u(v) = sqrt((v + ρ) · log((v + ρ) / (ρ α²))) with v = 25, ρ = 5, α = 0.05
    import math
    assert mixture_boundary(25, 5, 0.05) == pytest.approx(math.sqrt(30 * math.log(30 / (5 * 0.05 ** 2))))


def test_looking_after_every_vote_rarely_excludes_the_truth():
    """A/A: a true win rate of exactly ½, looked at after each of 1,000 votes (ties included), 300 times.
    Each run excludes ½ at some look with probability ≤ α = 0.05 by construction (the bound is
    conservative: 1 of these 300 did); the test fails only if 30 or more of 300 do: a binomial(300, 0.05)
    exceeds 29 with probability < 0.1 %, so this fails by chance less than once in a thousand runs."""
    rng = random.Random(0)
    crossed = 0
    for _ in range(300):
        cs = ConfidenceSequence(alpha=0.05)
        for _ in range(1000):
            cs.update(rng.choice((0.0, 0.5, 1.0, 1.0, 0.0)))  # mean ½
            if cs.decide(0.5) != "undecided":
                crossed += 1
                break
    assert crossed < 30, crossed


def test_a_real_difference_is_decided_and_in_the_right_direction():
    rng = random.Random(1)
    for p, expected in ((0.65, "above"), (0.35, "below")):
        decided_at = []
        for _ in range(50):
            cs = ConfidenceSequence()
            for t in range(1, 2001):
                cs.update(1.0 if rng.random() < p else 0.0)
                if cs.decide(0.5) != "undecided":
                    assert cs.decide(0.5) == expected
                    decided_at.append(t)
                    break
        assert len(decided_at) == 50  # every run decides within 2,000 votes (p = 0.65: median ~250)
    with pytest.raises(ValueError):
        ConfidenceSequence().update(1.5)
