"""Pair decisions and vote tokens (pure functions; no engine)."""

import random

import pytest

from serving.errors import APIError
from serving.pairing import decide_pair, pairs_mode, verify_vote_token, vote_token


def test_body_option_wins_over_header_and_default_is_never():
    assert pairs_mode(None, None) == "never"
    assert pairs_mode(None, "Force") == "force"
    assert pairs_mode("never", "force") == "never"
    with pytest.raises(APIError) as e:
        pairs_mode(None, "sometimes")
    assert e.value.status == 400


def test_decide_pair_follows_the_rate():
    rng = random.Random(0)
    hits = sum(decide_pair("allow", 0.3, rng) for _ in range(10_000))
    assert 2_800 < hits < 3_200
    assert not any(decide_pair("never", 1.0, rng) for _ in range(100))
    assert all(decide_pair("force", 0.0, rng) for _ in range(100))


def test_vote_token_binds_comparison_key_and_expiry():
    t = vote_token("s", "cmp_1", "key_a", 100)
    assert len(t) == 64 and verify_vote_token("s", t, "cmp_1", "key_a", 100)
    for args in (("s", t, "cmp_2", "key_a", 100), ("s", t, "cmp_1", "key_b", 100),
                 ("s", t, "cmp_1", "key_a", 101), ("x", t, "cmp_1", "key_a", 100)):
        assert not verify_vote_token(*args)
