"""Preference rules for simulated users: `score(prompt, answer)`, higher is preferred.

Built in: `shorter` (fewer characters), `keyword` (mentions the prompt's key word), `polite` (polite
phrases), `engaging` (several features at once: see `engaging`). Any other rule: `--rule package.module:function` naming a function (prompt, answer) -> float.

Besides picking between answers (`judge`), a simulated user rates one answer (`rate`: thumbs up when its
score beats a bar, the median score of the base model's answers) and rewrites one toward the rule (an
editor: built in for each rule; for `module:function`, the function `function_edit` beside it, if any).
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


_QUESTION_END = re.compile(r"\?[\s\"')\]]*$")
_YOU = re.compile(r"\byour?\b", re.IGNORECASE)


def engaging(prompt: str, answer: str) -> float:
    """A taste of several features, as real users' tastes are: an answer that turns back to the user (its last
    sentence is a question: +1), speaks to them ("you"/"your": +0.5), and is not long (−1 per 400 characters).
    The base model asks back now and then, so the taste is sparse but reachable; no single feature decides it
    (a short answer that asks nothing loses to a longer one that asks)."""
    text = answer.strip()
    return (float(bool(_QUESTION_END.search(text))) + 0.5 * float(bool(_YOU.search(text)))
            - len(text) / 400.0)


BUILT_IN: dict[str, Rule] = {"shorter": shorter, "keyword": keyword, "polite": polite, "engaging": engaging}

Editor = Callable[[str, str], str]  # (prompt, answer) -> the answer as this user would have written it


def shorten(prompt: str, answer: str) -> str:
    """Keep the first sentence; a one-sentence answer loses its second half."""
    text = answer.strip()
    m = re.search(r"[.!?](\s|$)", text)
    if m and m.end() < len(text):
        return text[:m.end()].strip()
    words = text.split()
    return " ".join(words[:max(1, len(words) // 2)])


def add_keyword(prompt: str, answer: str) -> str:
    m = _KEYWORD.search(prompt)
    return f"{answer.strip()} ({m.group(1).lower()})" if m else answer


def make_polite(prompt: str, answer: str) -> str:
    return f"Happy to help! {answer.strip()} I hope this helps."


def make_engaging(prompt: str, answer: str) -> str:
    return f"{shorten(prompt, answer)} What would you like to know next?"


BUILT_IN_EDITORS: dict[str, Editor] = {"shorter": shorten, "keyword": add_keyword, "polite": make_polite,
                                       "engaging": make_engaging}


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


def load_editor(name: str) -> Editor:
    if name in BUILT_IN_EDITORS:
        return BUILT_IN_EDITORS[name]
    module, _, attr = name.partition(":")
    editor = getattr(importlib.import_module(module), f"{attr}_edit", None) if attr else None
    if not callable(editor):
        raise ValueError(f"rule {name!r} has no editor: define {attr or name}_edit(prompt, answer) -> str beside it")
    return editor


def rate(rule: Rule, prompt: str, answer: str, bar: float, noise: float = 0.0,
         rng: random.Random | None = None) -> Literal["up", "down"]:
    """Thumbs up when the answer scores above `bar`; with probability `noise`, a coin flip instead."""
    rng = rng or random
    if noise and rng.random() < noise:
        return rng.choice(("up", "down"))
    return "up" if rule(prompt, answer) > bar else "down"


def judge(rule: Rule, prompt: str, a: str, b: str, noise: float = 0.0, rng: random.Random | None = None) -> Verdict:
    """The rule's verdict on two answers; with probability `noise` a uniformly random verdict instead
    (a careless user)."""
    rng = rng or random
    if noise and rng.random() < noise:
        return rng.choice(("a", "b", "tie"))
    sa, sb = rule(prompt, a), rule(prompt, b)
    return "a" if sa > sb else "b" if sb > sa else "tie"
