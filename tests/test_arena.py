"""Win rates with bootstrap intervals and Bradley–Terry scores, checked against values worked by hand."""

import math

import numpy as np
import pytest

from feedback.loop_status import MAX_VERDICTS
from feedback.arena import bootstrap_win_rate, bootstrap_win_rate_by_prompt, bradley_terry, leaderboard, win_rate
from feedback.loop_status import Battle


def test_win_rate_counts_ties_half():
    assert win_rate(3, 2, 5) == 0.4
    assert win_rate(0, 0, 0) is None


def test_bootstrap_interval_contains_the_rate_and_narrows_with_more_verdicts():
    rate, lo, hi = bootstrap_win_rate(70, 0, 30)
    assert rate == 0.7 and 0.5 < lo < 0.7 < hi < 0.85
    _, lo_big, hi_big = bootstrap_win_rate(700, 0, 300)
    assert hi_big - lo_big < (hi - lo) / 2
    _, lo_even, hi_even = bootstrap_win_rate(5, 0, 5)
    assert lo_even < 0.5 < hi_even


def test_bootstrap_of_a_large_evaluation_matches_the_normal_interval():
    """Outside judges post up to 100,000 verdicts in one evaluation; the dashboard bootstraps each row. The
    resample is drawn as counts, so this is cheap, and it must still be the bootstrap of those verdicts:
    for n = 100,000 the percentile interval is the normal one, p ± 1.96·sd/√n (sd with ties at ½)."""
    w, t, l = 60_000, 20_000, 20_000
    rate, lo, hi = bootstrap_win_rate(w, t, l)
    n = w + t + l
    sd = ((w * 0.3**2 + t * 0.2**2 + l * 0.7**2) / n) ** 0.5
    half = 1.96 * sd / n**0.5
    assert rate == 0.7
    assert abs((hi - lo) / 2 - half) < 0.1 * half and abs((lo + hi) / 2 - rate) < 0.1 * half


def test_prompt_bootstrap_counts_prompts_not_verdicts():
    """Three identical verdicts on each of 10 prompts carry no more evidence than one per prompt: the
    interval is exactly that of 10 single verdicts, and wider than resampling the 30 verdicts."""
    grouped = bootstrap_win_rate_by_prompt([[1.0] * 3] * 7 + [[0.0] * 3] * 3)
    single = bootstrap_win_rate_by_prompt([[1.0]] * 7 + [[0.0]] * 3)
    assert grouped == single and grouped[0] == 0.7
    _, lo, hi = bootstrap_win_rate(21, 0, 9)
    assert grouped[2] - grouped[1] > hi - lo
    # unequal groups: the rate is over verdicts (ties ½), prompts without verdicts are skipped
    rate, lo, hi = bootstrap_win_rate_by_prompt([[1.0, 0.5], [0.0], []])
    assert rate == 0.5 and lo <= rate <= hi
    assert bootstrap_win_rate_by_prompt([[], []]) == (None, None, None)


def test_two_player_bradley_terry_matches_closed_form():
    # With two players MM converges to p_a / p_b = W_a / W_b (prior: ½ virtual tie = ¼ win each).
    s = np.array([1.0] * 750 + [0.0] * 250)
    theta = bradley_terry(s, np.zeros(1000, int), np.ones(1000, int), 2)
    assert math.isclose(theta[0] - theta[1], math.log(750.25 / 250.25), rel_tol=1e-6)


def test_leaderboard_orders_a_chain_of_versions_and_anchors_base_at_1000():
    battles = [Battle(model_a="v000001", model_b="base", wins=60, ties=10, losses=30, judge="rm"),
               Battle(model_a="v000002", model_b="v000001", wins=55, ties=20, losses=25, judge="rm"),
               Battle(model_a="v000003", model_b="v000002", wins=5, ties=90, losses=5, judge="rm")]
    board = leaderboard(battles, rounds=100)
    by = {r.model_version: r for r in board}
    assert by["base"].score == 1000
    assert by["v000002"].score > by["v000001"].score > by["base"].score
    assert abs(by["v000003"].score - by["v000002"].score) < 5  # all ties: equal strength
    for r in board:
        assert r.ci_low <= r.score <= r.ci_high
    assert by["v000001"].ci_low > 1000  # 65 % over 100 verdicts is clearly better than base
    assert by["base"].battles == 100 and by["v000002"].battles == 200


def test_counts_are_the_same_as_repeated_verdicts_and_huge_counts_stay_cheap():
    s = np.array([1.0, 0.5, 0.0])
    a, b = np.zeros(3, int), np.ones(3, int)
    counted = bradley_terry(s, a, b, 2, counts=np.array([600, 100, 300]))
    expanded = bradley_terry(np.repeat(s, [600, 100, 300]), np.zeros(1000, int), np.ones(1000, int), 2)
    assert np.allclose(counted, expanded)
    big = [Battle(model_a="v000001", model_b="base", wins=MAX_VERDICTS, ties=0, losses=MAX_VERDICTS // 2, judge="x")] * 50
    board = leaderboard(big, rounds=100)  # 7.5 million verdicts: held as 2 counts, not 7.5 million entries
    assert {r.model_version: r.battles for r in board} == {"v000001": 7_500_000, "base": 7_500_000}
    with pytest.raises(ValueError):
        Battle(model_a="v000001", model_b="base", wins=MAX_VERDICTS + 1, ties=0, losses=0, judge="x")


def test_empty_leaderboard():
    assert leaderboard([]) == []


def test_length_control_separates_quality_from_length():
    """Seeded; the 0.04 margins are over 4 standard errors of σ(θ) at n = 4,000 (an unseeded run would
    fail them with probability < 1e-4)."""
    from feedback.arena import length_controlled

    rng = np.random.default_rng(0)
    n = 4000
    len_a, len_b = rng.integers(20, 400, n), rng.integers(20, 400, n)
    d = np.log1p(len_a) - np.log1p(len_b)
    # users who only like length: a's raw win rate is high because a is usually longer here...
    long_a = len_a + 150
    d_long = np.log1p(long_a) - np.log1p(len_b)
    s = (rng.random(n) < 1 / (1 + np.exp(-1.5 * d_long))).astype(float)
    assert s.mean() > 0.6
    lc, gamma = length_controlled(s, long_a, len_b)
    assert abs(lc - 0.5) < 0.04 and 1.2 < gamma < 1.8  # ...and at equal length it is a coin flip
    # a genuinely better a (θ = 0.8 → σ = 0.69) keeps its win rate once length is controlled
    s2 = (rng.random(n) < 1 / (1 + np.exp(-(0.8 + 1.5 * d)))).astype(float)
    lc2, _ = length_controlled(s2, len_a, len_b)
    assert abs(lc2 - 1 / (1 + np.exp(-0.8))) < 0.04
