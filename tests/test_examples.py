"""Events -> prompt groups."""

from feedback.events import FeedbackEvent
from tests.test_feedback_events import comparison
from trainer.examples import is_held_out, open_ended_heuristic, to_prompt_group


def event(k=2, **verdict):
    return FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(k), **verdict)


def test_pairwise_choices():
    assert to_prompt_group(event(choice="a")).pairs == [(0, 1)]
    assert to_prompt_group(event(choice="b")).pairs == [(1, 0)]
    tie = to_prompt_group(event(choice="tie"))
    assert tie.pairs == [] and tie.ties == [(0, 1)]
    assert to_prompt_group(event(choice="both_bad")) is None


def test_ranking_becomes_all_pairs_of_one_group():
    g = to_prompt_group(event(k=4, ranking=[[2], [0, 3], [1]]))
    assert sorted(g.pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])
    assert g.ties == [(0, 3)]
    assert len(g.pairs) + len(g.ties) == 6  # C(4, 2)
    assert g.answers == ["a0", "a1", "a2", "a3"]


def test_open_ended_comes_from_the_event_else_the_heuristic():
    assert to_prompt_group(event(choice="a", open_ended=True)).open_ended is True
    assert to_prompt_group(event(choice="a")).open_ended is False  # "hi": short, no cue
    assert open_ended_heuristic("Write a poem about the sea")
    assert not open_ended_heuristic("What is the capital of France?")
    assert not open_ended_heuristic("2 + 2 = ?")


def test_held_out_split_is_stable_and_near_the_percentage():
    ids = [f"cmp_{i}" for i in range(5000)]
    held = [i for i in ids if is_held_out(i, 10.0)]
    assert 400 < len(held) < 600
    assert held == [i for i in ids if is_held_out(i, 10.0)]
