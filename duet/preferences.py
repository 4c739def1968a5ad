"""Preference rules for simulated users: `score(prompt, answer)`, higher is preferred.

Built in: `shorter` (fewer characters), `keyword` (mentions the prompt's key word), `polite` (polite
phrases). Any other rule: `--rule package.module:function` naming a function (prompt, answer) -> float.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import sys
from collections.abc import Callable
from typing import Literal

Rule = Callable[[str, str], float]
Verdict = Literal["a", "b", "tie"]

_POLITE = ("please", "thank", "happy to", "glad", "sorry", "you're welcome", "of course", "kindly", "hope this helps")
_KEYWORD = re.compile(r"key ?word:\s*([A-Za-z]+)", re.IGNORECASE)


def shorter(prompt: str, answer: str) -> float:
    return -float(len(answer.strip()))


def keyword(prompt: str, answer: str) -> float:
    """Counts the prompt's key word ("... Key word: ocean.") in the answer."""
    m = _KEYWORD.search(prompt)
    return float(answer.lower().count(m.group(1).lower())) if m else 0.0


def polite(prompt: str, answer: str) -> float:
    low = answer.lower()
    return float(sum(low.count(p) for p in _POLITE))


BUILT_IN: dict[str, Rule] = {"shorter": shorter, "keyword": keyword, "polite": polite}


def load_rule(name: str) -> Rule:
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"unknown rule {name!r}: use one of {', '.join(BUILT_IN)} or module:function")
    if os.getcwd() not in sys.path:  # a rule file next to where the command runs, as `python -m` would
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rule {name!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"rule {name!r} is not callable")
    return fn


def judge(rule: Rule, prompt: str, a: str, b: str, noise: float = 0.0, rng: random.Random | None = None) -> Verdict:
    """The rule's verdict on two answers; with probability `noise` a uniformly random verdict instead
    (a careless user)."""
    rng = rng or random
    if noise and rng.random() < noise:
        return rng.choice(("a", "b", "tie"))
    sa, sb = rule(prompt, a), rule(prompt, b)
    return "a" if sa > sb else "b" if sb > sa else "tie"
