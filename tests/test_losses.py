"""Loss functions against hand-computed values."""

import math

import pytest
import torch

from trainer.losses import (bradley_terry_loss, kto_loss, kto_weights, kwise_loss, pointwise_loss, prompt_aware_loss,
                            sft_loss, tie_loss, utility)


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


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_against_hand_computed_values():
    pi, ref, good = t(-1.0, -2.0), t(-1.5, -1.0), torch.tensor([True, False])
    # r = [0.5, -1.0]; v0 = λ_D σ(β(r0 − z)), v1 = λ_U σ(β(z − r1)); L = mean(λ − v)
    z, beta, wd, wu = 0.2, 0.5, 2.0, 1.0
    v0, v1 = wd * sig(beta * (0.5 - z)), wu * sig(beta * (z + 1.0))
    assert kto_loss(pi, ref, good, z, beta, wd, wu).item() == pytest.approx(((wd - v0) + (wu - v1)) / 2)
    # the reference point is a KL estimate: never below 0
    assert kto_loss(pi, ref, good, -3.0, beta).item() == pytest.approx(kto_loss(pi, ref, good, 0.0, beta).item())


def test_kto_raises_desirable_and_lowers_undesirable_answers():
    pi = t(-1.0, -1.0).requires_grad_()
    kto_loss(pi, t(-1.0, -1.0), torch.tensor([True, False]), 0.0, 0.1).backward()
    assert pi.grad[0].item() < 0 < pi.grad[1].item()


def test_kto_weights_balance_the_labels():
    wd, wu = kto_weights(3, 1)
    assert wd * 3 == pytest.approx(wu * 1) and (3 * wd + wu) / 4 == pytest.approx(1.0)
    assert kto_weights(0, 5) == (1.0, 1.0) and kto_weights(4, 0) == (1.0, 1.0)


def test_sft_is_the_mean_per_token_nll_per_example():
    logp = t(-1.0, -2.0, -9.0, -3.0, -9.0, -9.0).view(2, 3)
    mask = t(1, 1, 0, 1, 0, 0).view(2, 3)
    assert sft_loss(logp, mask).item() == pytest.approx((1.5 + 3.0) / 2)


def test_pointwise_is_logistic_regression_of_the_label_on_the_reward():
    got = pointwise_loss(t(1.0, -2.0), torch.tensor([True, False])).item()
    assert got == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2)
    assert pointwise_loss(t(1.0), torch.tensor([False])).item() == pytest.approx(math.log(1 + math.e))
