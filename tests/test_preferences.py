"""Simulated users: how they rate and edit single answers under each built-in rule."""

import random

import pytest

from duet.preferences import BUILT_IN, BUILT_IN_EDITORS, load_editor, rate


def test_thumbs_up_only_above_the_bar_and_noise_flips_a_coin():
    shorter = BUILT_IN["shorter"]
    assert rate(shorter, "q", "short", bar=-10) == "up"  # 5 characters beat a bar of 10
    assert rate(shorter, "q", "a much longer answer", bar=-10) == "down"
    rng = random.Random(0)
    noisy = [rate(shorter, "q", "a much longer answer", bar=-10, noise=1.0, rng=rng) for _ in range(400)]
    assert 150 < noisy.count("up") < 250  # all coin flips: about half up (fails with probability < 1e-4)


@pytest.mark.parametrize("rule, prompt, answer", [
    ("shorter", "Tell me about tea.", "Tea is a drink. It comes from leaves. People like it."),
    ("shorter", "Tell me about tea.", "Tea is a drink made from leaves"),
    ("keyword", "Tell me about tea. Key word: ocean.", "Tea is a drink."),
    ("polite", "Tell me about tea.", "Tea is a drink."),
    ("engaging", "Tell me about tea.", "Tea is a drink. It comes from leaves, dried and steeped in hot water."),
])
def test_every_edit_moves_the_answer_toward_its_rule(rule, prompt, answer):
    edited = load_editor(rule)(prompt, answer)
    assert edited and BUILT_IN[rule](prompt, edited) > BUILT_IN[rule](prompt, answer)
    assert set(BUILT_IN_EDITORS) == set(BUILT_IN)


def test_a_custom_rule_without_an_editor_is_refused():
    with pytest.raises(ValueError, match="likes_blue_edit"):
        load_editor("tests.sim_rules:likes_blue")


def test_engaging_weighs_several_features_and_no_single_one_decides():
    engaging = BUILT_IN["engaging"]
    asks = "Tea is a drink from leaves. Would you like a recipe?"
    tells = "Tea is a drink from leaves."
    assert engaging("q", asks) > engaging("q", tells)  # asking back beats being a little shorter
    assert engaging("q", "Tea is a drink. What about you?") > engaging("q", "Tea is a drink. What about it?")
    rambling = "Tea is a drink from leaves. " * 20 + "Any questions?"
    assert engaging("q", tells) > engaging("q", rambling)  # length still counts
