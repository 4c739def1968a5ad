"""Release checks: fixed checks every candidate must pass before users see it, whatever the votes taught it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from feedback.contract.registry import Registry
from tests.test_policy import PROMPTS, _synthetic_votes, blue_reward
from trainer.policy import PolicyTrainer
from trainer.release_checks import (ReleaseCheck, ReleaseChecker, ReleaseChecksError, load_release_checks, passes,
                                    repetition)
from trainer.rounds import PolicyRounds
from duet.wiring import gate_config, policy_config, round_config


def write(tmp_path, *lines: str):
    path = tmp_path / "checks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_default_set_loads_and_off_means_none():
    checks = load_release_checks("")
    assert len(checks) >= 5 and len({c.name for c in checks}) == len(checks)
    assert {c.kind for c in checks} >= {"likelihood", "contains", "repetition"}
    assert load_release_checks("off") == []


@pytest.mark.parametrize("line, says", [
    ("{not json", "not JSON"),
    ('{"name": "x", "kind": "poem", "prompt": "p", "at_least": 1}', "kind"),
    ('{"name": "x", "kind": "likelihood", "prompt": "p", "no_worse_than_base": 0.5}', "reference `answer`"),
    ('{"name": "x", "kind": "likelihood", "prompt": "p", "answer": "a"}', "needs `no_worse_than_base`"),
    ('{"name": "x", "kind": "contains", "prompt": "p", "pattern": "(", "at_least": 1}', "not a regular expression"),
    ('{"name": "x", "kind": "contains", "prompt": "p", "pattern": "a"}', "needs a bound"),
    ('{"name": "x", "kind": "length", "prompt": "p", "no_worse_than_base": 1}', "no worse direction"),
    ('{"name": "x y", "kind": "length", "prompt": "p", "at_least": 1}', "name"),
    ('{"name": "x", "kind": "length", "prompt": "p", "at_least": 1, "typo": 3}', "typo"),
    ('{"name": "x", "kind": "repetition", "prompt": "p", "samples": 4, "no_worse_than_base": 0.1}', "temperature"),
    ('{"name": "x", "kind": "repetition", "prompt": "p", "temperature": 0.8, "no_worse_than_base": 0.1}', "samples"),
])
def test_a_bad_check_names_its_line(tmp_path, line, says):
    path = write(tmp_path, "", line)  # a blank first line: the error is on line 2
    with pytest.raises(ReleaseChecksError) as e:
        load_release_checks(path)
    assert f"{path}:2" in str(e.value) and says in str(e.value), str(e.value)


def test_duplicate_names_an_empty_file_and_a_missing_one_are_refused(tmp_path):
    one = '{"name": "x", "kind": "length", "prompt": "p", "at_least": 1}'
    with pytest.raises(ReleaseChecksError, match=r":2: the name 'x' is used twice"):
        load_release_checks(write(tmp_path, one, one))
    with pytest.raises(ReleaseChecksError, match="no checks"):
        load_release_checks(write(tmp_path, ""))
    with pytest.raises(ReleaseChecksError, match="cannot read"):
        load_release_checks(str(tmp_path / "absent.jsonl"))


def test_bounds_and_the_worse_direction_against_base():
    like = ReleaseCheck(name="l", kind="likelihood", prompt="p", answer="a", no_worse_than_base=0.5)
    assert passes(like, -1.4, base=-1.0) and not passes(like, -1.6, base=-1.0)
    assert passes(like, 5.0, base=-1.0)  # better than base is never a failure
    loop = ReleaseCheck(name="r", kind="repetition", prompt="p", no_worse_than_base=0.25)
    assert passes(loop, 0.3, base=0.1) and not passes(loop, 0.4, base=0.1)
    refuse = ReleaseCheck(name="c", kind="contains", prompt="p", pattern="sorry", no_worse_than_base=0)
    assert passes(refuse, 0.0, base=0.0) and not passes(refuse, 0.0, base=1.0)  # lost what base had
    never = ReleaseCheck(name="n", kind="not_contains", prompt="p", pattern="x", at_most=0)
    assert passes(never, 0.0, None) and not passes(never, 1.0, None)
    length = ReleaseCheck(name="len", kind="length", prompt="p", at_least=8, at_most=20)
    assert passes(length, 8, None) and not passes(length, 7, None) and not passes(length, 21, None)


def test_repetition_counts_repeated_four_grams():
    assert repetition("the sea is blue and wide") == 0.0
    looped = "I am here. " * 6  # 18 words, 15 four-grams, of which only 3 are new
    assert repetition(looped) == pytest.approx(12 / 15)
    assert repetition("too short") == 0.0


def test_checks_measure_the_candidate_against_the_base_model(tiny_model):
    """On the base model itself every relative check passes (same value), and a check that asks for what
    the model never says fails; base values are measured once."""
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(tiny_model))
    checks = [ReleaseCheck(name="like", kind="likelihood", prompt="hello", answer="a b c", no_worse_than_base=0.0),
              ReleaseCheck(name="loops", kind="repetition", prompt="hello", max_tokens=12, no_worse_than_base=0.0),
              ReleaseCheck(name="never", kind="contains", prompt="hello", pattern="^duet-never-says-this$",
                           at_least=1)]
    checker = ReleaseChecker(checks)
    with pt.reference():
        results = checker.run(pt, pt.model)
    by_name = {r.name: r for r in results}
    assert by_name["like"].passed and by_name["like"].value == by_name["like"].base < 0
    assert by_name["loops"].passed and by_name["loops"].value == by_name["loops"].base
    assert not by_name["never"].passed and by_name["never"].value == 0.0
    assert set(checker._base) == {"like", "loops"}


def test_a_sampled_check_averages_its_answers_and_repeats_itself(tiny_model):
    """With samples > 1 the value is the mean over answers drawn at the check's temperature with a fixed seed:
    the same model measured twice gives the same value (a check passes or fails the same way every time)."""
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(tiny_model))
    sampled = ReleaseCheck(name="some", kind="contains", prompt="hello", pattern="e", samples=8, temperature=1.0,
                           max_tokens=6, at_least=0)
    checker = ReleaseChecker([sampled])
    first, again = (checker._measure(pt, pt.model, sampled)[0] for _ in range(2))
    assert first == again and first * 8 == round(first * 8)  # a share of the 8 answers


def test_a_candidate_that_fails_a_release_check_is_never_published(blue_model, tmp_path):
    """A round whose candidate passes every other gate condition (bars off) but fails one release check: it
    is refused with the check named, nothing reaches the registry (so no announcement, no user sees it), and
    the failure is counted per check."""
    from trainer import metrics

    failing = ReleaseCheck(name="must-say-zebra", kind="contains", prompt="Say something.", pattern="zebra-xyzzy",
                           max_tokens=4, at_least=1)
    cfg = round_config(base_model=str(blue_model), registry_root=tmp_path / "registry",
                      policy=policy_config(max_new_tokens=8),
                      gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0),
                      release_checks=[failing])
    before = metrics.RELEASE_CHECK_FAILURES.labels(check="must-say-zebra")._value.get()
    votes = _synthetic_votes(10)
    result = PolicyRounds(cfg).run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert result.published is None and result.gate.reasons == ["release_check:must-say-zebra"]
    assert [c.name for c in result.gate.checks if not c.passed] == ["must-say-zebra"]
    assert Registry(tmp_path / "registry").latest() is None
    assert metrics.RELEASE_CHECK_FAILURES.labels(check="must-say-zebra")._value.get() == before + 1

    # the same round with the check passing publishes, and the manifest records the checks it passed
    cfg.release_checks = [failing.model_copy(update={"pattern": ".*"})]
    result = PolicyRounds(cfg).run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert result.published is not None, result.gate.reasons
    assert [(c["name"], c["passed"]) for c in result.published.release_checks] == [("must-say-zebra", True)]


@pytest.mark.parametrize("command", ["up", "train"])
def test_a_bad_check_file_is_a_one_line_error_at_start(tmp_path, command):
    bad = write(tmp_path, json.dumps({"name": "x", "kind": "contains", "prompt": "p", "pattern": "("}))
    env = {**os.environ, "DUET_HOME": str(tmp_path / "home"), "DUET_RELEASE_CHECKS": bad,
           "DUET_KAFKA_BOOTSTRAP": "127.0.0.1:9", "DUET_REDIS_URL": "redis://127.0.0.1:9/0"}
    out = subprocess.run([sys.executable, "-m", "duet.cli", command], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:1" in lines[0] and "DUET_RELEASE_CHECKS" in lines[0], out.stderr


def test_the_base_side_of_the_gate_is_computed_ahead_and_reused(blue_model, tmp_path, monkeypatch):
    """`PolicyRounds.warm` (what the trainer does while idle before its first round) computes the base model's
    gate answers and release-check values; the round then samples only the candidate: the base is never asked
    again, and warming twice computes nothing."""
    import trainer.rounds as rounds_module

    like = ReleaseCheck(name="like", kind="likelihood", prompt="hello", answer="a b c", no_worse_than_base=10.0)
    cfg = round_config(base_model=str(blue_model), registry_root=tmp_path / "registry",
                       policy=policy_config(max_new_tokens=8),
                       gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0),
                       release_checks=[like])
    rounds = PolicyRounds(cfg)
    assert rounds.warm(PROMPTS[4:6], stop=lambda: True) is True  # a stop asked: the checks are left for later
    assert set(rounds.gate_cache) == {"base"} and rounds.checker._base == {}
    assert rounds.warm(PROMPTS[4:6]) is True
    assert set(rounds.gate_cache) == {"base"} and set(rounds.checker._base) == {"like"}
    assert rounds.warm(PROMPTS[4:6]) is False

    base_sampled, base_measured = [], []
    monkeypatch.setattr(rounds_module, "gate_answers", lambda *a, **kw: base_sampled.append(a) or [])
    measure = rounds.checker._measure
    monkeypatch.setattr(rounds.checker, "_measure",
                        lambda pt, model, check: base_measured.append(model) or measure(pt, model, check))
    votes = _synthetic_votes(10)
    result = rounds.run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert result.published is not None, result.gate.reasons
    assert base_sampled == [] and len(base_measured) == 1  # the candidate's own check value only
    assert rounds.warm(PROMPTS[5:6]) is True  # other gate prompts: their base answers are new work


def test_after_a_restart_the_live_versions_gate_answers_are_warmed_too(blue_model, tmp_path, monkeypatch):
    """A trainer restarted with a version live (a fresh `PolicyRounds` on the same registry) warms that version's
    gate answers beside base's: its first round samples only the candidate."""
    import trainer.rounds as rounds_module

    cfg = round_config(base_model=str(blue_model), registry_root=tmp_path / "registry",
                       policy=policy_config(max_new_tokens=8),
                       gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0))
    votes = _synthetic_votes(10)
    before_restart = PolicyRounds(cfg)
    first = before_restart.run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert first.published is not None, first.gate.reasons

    restarted = PolicyRounds(cfg)
    restarted.load_state_dict(before_restart.state_dict())  # what the trainer's checkpoint restores
    assert restarted.warm(PROMPTS[4:6]) is True
    assert set(restarted.gate_cache) == {"base", first.published.name}
    assert restarted.warm(PROMPTS[4:6]) is False

    sampled = []
    monkeypatch.setattr(rounds_module, "gate_answers", lambda *a, **kw: sampled.append(a) or [])
    second = restarted.run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert second.published is not None and second.published.parent_version == first.published.version
    assert sampled == []  # neither base nor the live version was sampled again
