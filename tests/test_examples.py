"""Events -> prompt groups."""

from itertools import combinations

from feedback.contract.events import EditedAnswer, FeedbackEvent
from tests.test_feedback_events import comparison
from trainer.examples import is_held_out, open_ended_heuristic, to_prompt_group


def event(k=2, **verdict):
    return FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(k), **verdict)


def test_pairwise_choices():
    assert to_prompt_group(event(choice="a")).pairs == [(0, 1)]
    assert to_prompt_group(event(choice="b")).pairs == [(1, 0)]
    tie = to_prompt_group(event(choice="tie"))
    assert tie.pairs == [] and tie.ties == [(0, 1)] and tie.labelled == []  # a tie says nothing about quality


def test_both_bad_makes_both_answers_undesirable():
    g = to_prompt_group(event(choice="both_bad"))
    assert g.pairs == [] and g.ties == [] and g.undesirable == [0, 1] and g.desirable == []
    assert g.labelled == [(0, False), (1, False)]


def test_thumbs_label_the_one_answer():
    up = FeedbackEvent(kind="rating", key_id="k", user_hash=None, comparison=comparison(1), rating="up")
    down = up.model_copy(update={"rating": "down"})
    assert to_prompt_group(up).labelled == [(0, True)] and to_prompt_group(up).pairs == []
    assert to_prompt_group(down).labelled == [(0, False)]


def test_an_edit_is_a_demonstration_preferred_to_the_answer_it_replaced():
    ev = FeedbackEvent(kind="edit", key_id="k", user_hash=None, comparison=comparison(2),
                       edit=EditedAnswer(index=1, text="better"))
    g = to_prompt_group(ev)
    assert g.answers == ["a0", "a1", "better"]
    assert g.pairs == [(2, 1)] and g.demonstrations == [2] and g.labelled == []


def test_a_ranking_of_nine_is_one_group_of_all_36_pairs():
    g = to_prompt_group(event(k=9, ranking=[[8], [0, 1], [2, 3, 4, 5, 6], [7]]))
    assert len(g.pairs) + len(g.ties) == 36  # C(9, 2)
    assert {tuple(sorted(p)) for p in g.pairs + g.ties} == set(combinations(range(9), 2))
    assert (8, 7) in g.pairs and (0, 1) in g.ties


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
