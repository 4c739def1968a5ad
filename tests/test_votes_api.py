"""Votes: real HTTP API, real Redis, real broker (tansu), real engine for the answers."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from feedback.consumer import FeedbackConsumer
from feedback.contract.events import SCHEMA_VERSION, FeedbackEvent
from feedback.outbox import OUTBOX
from feedback.contract.topics import DEAD_LETTERS, FEEDBACK
from feedback.unconfirmed import UNCONFIRMED
from tests.conftest import OUTBOX_MAX
from tests.kafka_helpers import read_topic
from tests.test_serving_api import HELLO, assert_openai_error
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def pair(client: httpx.Client, k: int = 2) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 3,
                                                  "duet": {"pairs": "force", "k": k}})
    assert r.status_code == 200, r.text
    return r.json()


def vote(client: httpx.Client, body: dict, **headers) -> httpx.Response:
    return client.post("/v1/feedback", json=body, headers=headers)


def ballot(resp: dict, **verdict) -> dict:
    d = resp["duet"]
    ident = {"comparison_id": d["comparison_id"]} if d["comparison_id"] else {"completion_id": d["completion_id"]}
    return {**ident, "vote_token": d["vote_token"], **verdict}


def events_by_id(bootstrap: str, ids: set[str], timeout_s: float = 60) -> list[dict]:
    def ids_in(records):
        return {json.loads(r.value)["event_id"] for r in records}
    records = read_topic(bootstrap, FEEDBACK, lambda recs: ids <= ids_in(recs), timeout_s)
    return [json.loads(r.value) for r in records if json.loads(r.value)["event_id"] in ids]


def test_vote_reaches_kafka_self_contained(client, broker):
    resp = pair(client)
    r = vote(client, ballot(resp, choice="b", reason="more polite", open_ended=True))
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    [raw] = events_by_id(broker.bootstrap, {event_id})
    ev = FeedbackEvent.model_validate(raw)
    assert ev.choice == "b" and ev.reason == "more polite" and ev.open_ended is True
    assert ev.schema_version == SCHEMA_VERSION and uuid.UUID(ev.event_id).version == 7
    assert [a.text for a in ev.comparison.answers] == [c["message"]["content"] for c in resp["choices"]]
    assert {a.model_version for a in ev.comparison.answers} == {"base"}
    assert ev.comparison.messages[0].content == HELLO[0]["content"]
    assert ev.comparison.sampling.max_tokens == 3


def test_consumer_helper_reads_votes_in_a_group(client, broker):
    ids = {vote(client, ballot(pair(client), choice=c)).json()["event_id"] for c in ("a", "tie", "both_bad")}
    consumer = FeedbackConsumer(broker.bootstrap, group_id="g-" + uuid.uuid4().hex)
    try:
        got: dict[str, FeedbackEvent] = {}
        def polled() -> bool:
            got.update({d.event.event_id: d.event for d in consumer.poll(timeout_ms=500)})
            return ids <= set(got)

        wait_until(polled, 60, "the three votes on the topic", 0)
        assert ids <= set(got)
        assert {got[i].choice for i in ids} == {"a", "tie", "both_bad"}
        consumer.commit(consumer.positions())
    finally:
        consumer.close()


def test_ranking_of_k_answers_and_thumbs(client, broker):
    three = pair(client, k=3)
    assert_openai_error(vote(client, ballot(three, choice="a")), 400, "choice")
    assert_openai_error(vote(client, ballot(three, ranking=[0, 0, 1])), 400, "ranking")
    r = vote(client, ballot(three, ranking=[2, [0, 1]]))
    assert r.status_code == 202, r.text
    single = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 3,
                                                       "duet": {"pairs": "never"}}).json()
    assert single["duet"]["completion_id"].startswith("cpl_") and len(single["choices"]) == 1
    t = vote(client, ballot(single, rating="down", reason="rude"))
    assert t.status_code == 202, t.text
    events = {e["event_id"]: e for e in events_by_id(broker.bootstrap, {r.json()["event_id"], t.json()["event_id"]})}
    assert events[r.json()["event_id"]]["ranking"] == [[2], [0, 1]]
    nine = pair(client, k=9)  # InstructGPT's largest K, from one engine call
    assert len(nine["choices"]) == 9 and len(set(c["index"] for c in nine["choices"])) == 9
    assert vote(client, ballot(nine, ranking=[8, [0, 1, 2], 3, 4, [5, 6], 7])).status_code == 202
    too_many = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 3,
                                                         "duet": {"pairs": "force", "k": 10}})
    assert_openai_error(too_many, 400, "duet.k")
    rating = events[t.json()["event_id"]]
    assert rating["kind"] == "rating" and rating["rating"] == "down"
    assert rating["comparison"]["answers"][0]["text"] == single["choices"][0]["message"]["content"]


def test_edits_of_a_pair_and_of_a_single_answer(client, broker, duet_server):
    two = pair(client)
    original = two["choices"][1]["message"]["content"]
    assert vote(client, ballot(two, choice="a")).status_code == 202  # a pick, then an edit: both are taken
    for body, param in ((ballot(two, edited_answer="Better."), "answer_index"),  # which of the two?
                        (ballot(two, edited_answer="Better.", answer_index=2), "answer_index"),
                        (ballot(two, edited_answer="   ", answer_index=0), "edited_answer"),
                        (ballot(two, edited_answer="x" * 4001, answer_index=0), "edited_answer"),  # DUET_MAX_EDIT_CHARS
                        (ballot(two, edited_answer=original, answer_index=1), "edited_answer"),  # unchanged
                        (ballot(two, edited_answer="Better.", answer_index=0, choice="a"), None)):
        assert_openai_error(vote(client, body), 400, param)
    other = duet_server.create_key("--name", "editor")  # a key that never received these answers
    with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {other}"}) as c2:
        assert_openai_error(vote(c2, ballot(two, edited_answer="Mine.", answer_index=0)), 403, "vote_token")
    edit = vote(client, ballot(two, edited_answer="  Better.  ", answer_index=1))
    assert edit.status_code == 202, edit.text
    assert_openai_error(vote(client, ballot(two, edited_answer="Again.", answer_index=0)), 409, "comparison_id")

    single = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 3,
                                                       "duet": {"pairs": "never"}}).json()
    fixed = vote(client, ballot(single, edited_answer="Fixed."))
    assert fixed.status_code == 202, fixed.text
    # thumbs on a pair, or a pick on a single answer: 400 that says which id to use
    assert_openai_error(vote(client, {"completion_id": two["duet"]["comparison_id"], "vote_token": "t",
                                      "rating": "up"}), 400, "completion_id")
    assert_openai_error(vote(client, {"comparison_id": single["duet"]["completion_id"], "vote_token": "t",
                                      "choice": "a"}), 400, "comparison_id")

    events = {e["event_id"]: FeedbackEvent.model_validate(e)
              for e in events_by_id(broker.bootstrap, {edit.json()["event_id"], fixed.json()["event_id"]})}
    on_pair, on_single = events[edit.json()["event_id"]], events[fixed.json()["event_id"]]
    assert on_pair.kind == "edit" and on_pair.edit.index == 1 and on_pair.edit.text == "Better."
    assert on_pair.comparison.answers[1].text == original  # what it replaces travels with it
    assert on_single.edit.index == 0 and on_single.edit.text == "Fixed." and len(on_single.comparison.answers) == 1


def test_concurrent_votes_on_one_comparison_let_exactly_one_through(client, duet_server, api_key):
    resp = pair(client)

    def go(choice):
        with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {api_key}"}) as c:
            return vote(c, ballot(resp, choice=choice)).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = Counter(pool.map(go, ["a", "b"] * 8))
    assert statuses == Counter({202: 1, 409: 15})


def test_votes_survive_a_broker_outage(client, broker, duet_server, api_key, redis_client):
    """Broker down: votes pile up in the outbox (bounded), then drain exactly once when it is back,
    although the restarted in-memory broker is empty (the relay re-creates the topics); the votes it
    had acknowledged before it went down, and no trainer confirmed, are sent again into the new log."""
    with ThreadPoolExecutor(4) as pool:
        pairs = list(pool.map(lambda _: pair(client), range(OUTBOX_MAX + 6)))
    relayed = {vote(client, ballot(p, choice="b")).json()["event_id"] for p in pairs[OUTBOX_MAX + 1:]}
    wait_until(lambda: redis_client.xlen(OUTBOX) == 0, 30, "the relay to empty the outbox", 0.1)
    assert redis_client.xlen(OUTBOX) == 0
    earlier = set(redis_client.hkeys(UNCONFIRMED))  # no trainer runs here: nothing is ever confirmed
    assert relayed <= earlier
    broker.stop()
    try:
        def go(p):
            with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {api_key}"}) as c:
                return vote(c, ballot(p, choice="a"))

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(go, pairs[:OUTBOX_MAX]))
        assert [r.status_code for r in responses] == [202] * OUTBOX_MAX
        assert redis_client.xlen(OUTBOX) == OUTBOX_MAX
        full = go(pairs[OUTBOX_MAX])
        assert_openai_error(full, 503)
        assert int(full.headers["Retry-After"]) > 0
        assert 'duet_outbox_depth 200.0' in client.get("/metrics").text or redis_client.xlen(OUTBOX) == 200
    finally:
        broker.start()
    ids = {r.json()["event_id"] for r in responses}
    records = read_topic(broker.bootstrap, FEEDBACK, lambda recs: len(recs) >= len(ids | earlier), timeout_s=90)
    counts = Counter(json.loads(r.value)["event_id"] for r in records)
    assert set(counts) == ids | earlier and set(counts.values()) == {1}
    wait_until(lambda: redis_client.xlen(OUTBOX) == 0, 10, "the relay to empty the outbox", 0.1)
    assert redis_client.xlen(OUTBOX) == 0
    assert go(pairs[OUTBOX_MAX]).status_code == 202  # room again


def test_consumer_drops_duplicates_and_dead_letters_poison(broker):
    from kafka import KafkaProducer

    from feedback.contract.topics import ensure_topics
    from tests.test_feedback_events import comparison

    ensure_topics(broker.bootstrap)
    topic = "test.feedback." + uuid.uuid4().hex[:8]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    ev1 = FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(), choice="a")
    ev2 = FeedbackEvent(kind="comparison", key_id="k", user_hash=None, comparison=comparison(), choice="tie")
    v2 = ev1.model_dump_json().replace(f'"schema_version":"{SCHEMA_VERSION}"', '"schema_version":"2.0"')
    for value in (ev1.model_dump_json(), b"not json", ev1.model_dump_json(), v2, ev2.model_dump_json()):
        producer.send(topic, value=value if isinstance(value, bytes) else value.encode(), partition=0).get(10)
    producer.close()
    consumer = FeedbackConsumer(broker.bootstrap, group_id="g-" + uuid.uuid4().hex, topic=topic)
    try:
        got = []
        def polled() -> bool:
            got.extend(consumer.poll(timeout_ms=500))
            return len(got) >= 2

        wait_until(polled, 60, "two deliveries", 0)
        assert [d.event.event_id for d in got] == [ev1.event_id, ev2.event_id]  # duplicate dropped, poison skipped
        assert [d.offset for d in got] == [0, 4]
    finally:
        consumer.close()
    dlq = read_topic(broker.bootstrap, DEAD_LETTERS,
                     lambda recs: sum(dict(r.headers).get("source_topic") == topic.encode() for r in recs) >= 2)
    mine = [r for r in dlq if dict(r.headers).get("source_topic") == topic.encode()]
    reasons = [dict(r.headers)["reason"].decode() for r in mine]
    assert reasons[0].startswith("not_json") and reasons[1].startswith("unknown_major")
    assert [dict(r.headers)["source_offset"] for r in mine] == [b"1", b"3"]
