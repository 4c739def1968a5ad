"""Loss functions against hand-computed values."""

import math

import pytest
import torch

from trainer.losses import bradley_terry_loss, kwise_loss, prompt_aware_loss, tie_loss, utility


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_bradley_terry():
    # -log σ(2 - 1) = log(1 + e^-1)
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))


def test_tie_is_symmetric_and_minimal_at_equal_rewards():
    assert tie_loss(t(1.0), t(1.0)).item() == pytest.approx(math.log(2))
    d = 1.5  # -½ log σ(d) - ½ log σ(-d)
    expected = 0.5 * math.log(1 + math.exp(-d)) + 0.5 * math.log(1 + math.exp(d))
    assert tie_loss(t(d), t(0.0)).item() == pytest.approx(expected)
    assert tie_loss(t(0.0), t(d)).item() == pytest.approx(expected)


def test_kwise_is_the_mean_over_the_prompts_pairs():
    r = t(3.0, 1.0, 0.0)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(math.log(1 + math.exp(-(r[w] - r[l]).item())) for w, l in pairs) / 3
    assert kwise_loss(r, pairs).item() == pytest.approx(expected)
    with_tie = (3 * expected + math.log(2)) / 4  # a tie between equal rewards adds log 2
    assert kwise_loss(t(3.0, 1.0, 0.0, 0.0), pairs, [(2, 3)]).item() == pytest.approx(with_tie)


def test_utility_closed_is_linear_open_is_minus_inverse_with_linear_extension():
    closed, opened = torch.tensor([False]), torch.tensor([True])
    assert utility(t(0.3), closed).item() == pytest.approx(0.3)
    assert utility(t(0.5), opened, eps=0.05).item() == pytest.approx(-2.0)
    # below ε: tangent of -1/x at ε = -1/ε + (x-ε)/ε²
    assert utility(t(0.0), opened, eps=0.05).item() == pytest.approx(-20.0 - 0.05 / 0.0025)
    assert utility(t(-0.5), opened, eps=0.05).item() == pytest.approx(-20.0 + (-0.55) / 0.0025)
    # continuous at ε
    assert utility(t(0.05), opened, 0.05).item() == pytest.approx(utility(t(0.0499999), opened, 0.05).item(), abs=1e-3)


def test_prompt_aware_loss_uses_bounded_rewards():
    lw, ll = t(2.0), t(-1.0)
    gap = 1 / (1 + math.exp(-2.0)) - 1 / (1 + math.exp(1.0))
    assert prompt_aware_loss(lw, ll, torch.tensor([False])).item() == pytest.approx(-gap)
    assert prompt_aware_loss(lw, ll, torch.tensor([True])).item() == pytest.approx(1 / gap)


def test_losses_have_gradients_in_the_right_direction():
    rw, rl = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    bradley_terry_loss(rw, rl).backward()
    assert rw.grad.item() < 0 < rl.grad.item()  # descent raises the winner, lowers the loser
