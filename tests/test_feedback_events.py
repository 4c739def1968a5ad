"""Event schema helpers (pure)."""

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from feedback.contract.comparisons import Answer, ChatMessage, PendingComparison, SamplingSpec
from feedback.consumer import PoisonMessage, SeenIds, decode_event
from feedback.contract.events import SCHEMA_VERSION, EditedAnswer, FeedbackEvent, normalize_ranking, uuid7


def comparison(k: int = 2) -> PendingComparison:
    now = datetime.now(UTC)
    return PendingComparison(
        comparison_id="cmp_x", key_id="k", user_hash=None, model="duet",
        messages=[ChatMessage(role="user", content="hi")],
        answers=[Answer(index=i, text=f"a{i}", finish_reason="stop", model_version="base", completion_tokens=1)
                 for i in range(k)],
        sampling=SamplingSpec(temperature=1, top_p=1, max_tokens=8), prompt_tokens=3,
        created_at=now, expires_at=now + timedelta(hours=1))


def test_uuid7_is_time_ordered_and_valid():
    ids = []
    for _ in range(5):
        ids.append(uuid7())
        time.sleep(0.002)
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_normalize_ranking():
    assert normalize_ranking([2, [0, 1]], 3) == [[2], [0, 1]]
    for bad in ([0, 0, 1], [0, 1], [0, 1, 3], [[], 0, 1, 2]):
        with pytest.raises(ValueError):
            normalize_ranking(bad, 3)


def test_event_round_trip_ignores_unknown_fields_and_rejects_unknown_major():
    ev = FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(), choice="a")
    raw = ev.model_dump_json().replace('"kind"', '"future_field":1,"kind"')
    assert decode_event(raw.encode()) == ev
    with pytest.raises(PoisonMessage) as e:
        decode_event(ev.model_dump_json().replace(f'"{SCHEMA_VERSION}"', '"2.0"').encode())
    # an event of an earlier minor (1.0, before edits) still decodes
    assert decode_event(ev.model_dump_json().replace(f'"{SCHEMA_VERSION}"', '"1.0"').encode()).choice == "a"
    assert e.value.code == "unknown_major"
    for junk, code in ((b"{nope", "not_json"), (b"[1]", "not_json"), (b'{"schema_version":"1.0"}', "invalid")):
        with pytest.raises(PoisonMessage) as e:
            decode_event(junk)
        assert e.value.code == code


def test_event_needs_one_verdict():
    with pytest.raises(ValueError):
        FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(), choice="a",
                      ranking=[[0], [1]])
    with pytest.raises(ValueError):
        FeedbackEvent(kind="rating", key_id="k", user_hash=None, comparison=comparison(2), rating="up")
    with pytest.raises(ValueError):  # an edit names an answer that was shown
        FeedbackEvent(kind="edit", key_id="k", user_hash=None, comparison=comparison(2),
                      edit=EditedAnswer(index=2, text="x"))


def test_seen_ids_are_bounded():
    seen = SeenIds(capacity=3)
    assert all(seen.add(i) for i in "abcd")
    assert not seen.add("d") and seen.add("a")  # "a" was forgotten
    assert SeenIds(3, seen.to_list()).to_list() == seen.to_list()
