"""Users judge a candidate, in process (fake engines, real Redis): cross-version pairs are routed to both engines,
votes on them are counted for the test, a candidate users prefer is promoted and swapped into the incumbent's
engine, one they do not is rejected, and an admin's hand works and says clearly what it cannot do. The real
engines' side (their nice values, a real promotion, a candidate that cannot load, a restart) is test_canary.py's.
A test decided by votes fails if the votes were ignored: nothing else decides before the budget (2,000 votes)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from feedback.canary import CanaryStore
from tests.conftest import ADMIN_KEY, TEST_REDIS_DB
from tests.inprocess import InProcessServing, publish_copy
from tests.test_adapters import adapted, exported, publish
from tests.test_api_fast import Authed
from tests.test_serving_api import HELLO, assert_openai_error
from tests.waiting import wait_until

CANARY_REDIS = f"redis://127.0.0.1:6379/{TEST_REDIS_DB - 4}"  # its own database: no other test uses it


@pytest.fixture()
def clean_db():
    r = redis.Redis.from_url(CANARY_REDIS)
    r.flushdb()
    yield
    r.flushdb()
    r.close()


def pair(user: Authed) -> dict:
    r = user.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "duet": {"pairs": "force"}})
    assert r.status_code == 200, r.text
    return r.json()


def vote(user: Authed, body: dict, choice: str) -> None:
    r = user.post("/v1/feedback", json={"comparison_id": body["duet"]["comparison_id"],
                                        "vote_token": body["duet"]["vote_token"], "choice": choice})
    assert r.status_code == 202, r.text


def vote_until_decided(api, admin: Authed, user: Authed, prefer: str, limit: int = 300) -> dict:
    """This user always picks the answer of version `prefer` (blind to them; the fake's text names it)."""
    for _ in range(limit):
        body = pair(user)
        versions = body["duet"].get("model_versions")
        if versions is None:  # serving's canary loop decided (once a second) after our last look: Redis says so
            status = admin.get("/admin/canary").json()["test"]
            assert status["status"] != "running", ("a single-version pair while the test runs", body["duet"])
            return status
        assert len(set(versions)) == 2  # one answer from each version
        vote(user, body, "a" if prefer in body["choices"][0]["message"]["content"] else "b")
        status = admin.get("/admin/canary").json()["test"]
        if status["status"] != "running":
            return status
    raise AssertionError(f"undecided after {limit} votes")


def judged(api, candidate: str) -> tuple[Authed, Authed]:
    admin, user = Authed(api.client, ADMIN_KEY), Authed(api.client, api.create_key("judge"))
    assert start_test(candidate, "base")
    wait_until(lambda: admin.get("/admin/canary").json().get("candidate_loaded") == candidate, 30,
               "the candidate's engine to hold it")
    return admin, user


def store_call(method: str, *args):
    """`CanaryStore.<method>(*args)` on the tests' database, from synchronous test code."""
    async def go():
        r = aioredis.from_url(CANARY_REDIS, decode_responses=True)
        try:
            return await getattr(CanaryStore(r), method)(*args)
        finally:
            await r.aclose()
    return asyncio.run(go())


def start_test(candidate: str, incumbent: str) -> bool:
    return store_call("start", candidate, incumbent)


def serving(tiny_model, home, **settings):
    return InProcessServing(tiny_model, CANARY_REDIS, home, canary="users", canary_engine_nice=0, pair_rate=1.0,
                            admin_key=ADMIN_KEY, **settings)


def test_users_route_count_and_promote_a_candidate(tiny_model, tmp_path, clean_db):
    home = tmp_path / "home"
    candidate = publish_copy(home / "registry", tiny_model)
    with serving(tiny_model, home) as api:
        admin, user = judged(api, candidate)
        assert [e.model_version for e in api.engines] == ["base", candidate]  # a second engine, the incumbent kept
        assert admin.get("/admin/models").json()["current"] == "base"  # not live before users decide
        body = pair(user)
        assert sorted(body["duet"]["model_versions"]) == sorted(["base", candidate])
        vote(user, body, "a" if candidate in body["choices"][0]["message"]["content"] else "b")
        status = vote_until_decided(api, admin, user, prefer=candidate)
        assert (status["status"], status["reason"]) == ("promoted", "votes"), status
        assert status["wins"] == status["votes"] and status["lower"] > 0.5
        wait_until(lambda: admin.get("/admin/models").json()["current"] == candidate, 30,
                   "the promoted candidate to be swapped into the incumbent's engine")
        assert api.engines[0].loaded == [candidate]
        metrics = api.client.get("/metrics").text
        assert 'duet_canary_decisions_total{decision="promoted",reason="votes"}' in metrics


def test_users_reject_a_candidate_they_like_less(tiny_model, tmp_path, clean_db):
    home = tmp_path / "home"
    candidate = publish_copy(home / "registry", tiny_model)
    with serving(tiny_model, home) as api:
        admin, user = judged(api, candidate)
        status = vote_until_decided(api, admin, user, prefer="base")
        assert (status["status"], status["reason"]) == ("rejected", "votes"), status
        assert status["upper"] < 0.5 and status["wins"] == 0
        assert admin.get("/admin/models").json()["current"] == "base"  # the incumbent keeps serving
        assert api.engines[0].loaded == []
        body = pair(user)  # the test is decided: pairs come from the incumbent alone again
        assert set(body["duet"].get("model_versions") or [body["duet"]["model_version"]]) == {"base"}


def test_an_admins_hand_on_a_test(tiny_model, tmp_path, clean_db):
    home = tmp_path / "home"
    candidate = publish_copy(home / "registry", tiny_model)
    with serving(tiny_model, home) as api:
        admin, user = judged(api, candidate)
        assert admin.post(f"/admin/canary/{candidate}/pause").json()["test"]["status"] == "paused"
        body = pair(user)  # while paused: single-version pairs, nothing counted
        assert set(body["duet"].get("model_versions") or [body["duet"]["model_version"]]) == {"base"}
        vote(user, body, "a")
        assert admin.get("/admin/canary").json()["test"]["votes"] == 0
        assert_openai_error(admin.post(f"/admin/canary/{candidate}/pause"), 409)  # paused already
        assert_openai_error(admin.post("/admin/canary/v000099/promote"), 404)  # not the test under way
        assert_openai_error(admin.post(f"/admin/canary/{candidate}/explode"), 400)
        assert admin.post(f"/admin/canary/{candidate}/reject").json()["test"]["status"] == "rejected"
        assert_openai_error(admin.post(f"/admin/canary/{candidate}/promote"), 409)  # decided already
        assert admin.get("/admin/models").json()["current"] == "base"
        assert_openai_error(user.get("/admin/canary"), 403)  # an API key is not the admin key



def test_users_judge_a_candidate_served_as_an_adapter(tiny_model, tmp_path, clean_db):
    """DUET_CANARY_CANDIDATE=adapter (the default on a GPU): no second engine; the candidate answers through an
    adapter on the incumbent's engine, and a promotion swaps its merged weights in as usual."""
    home = tmp_path / "home"
    candidate = publish(home / "registry", exported(adapted(tiny_model, 1), tmp_path / "v1"))
    with serving(tiny_model, home, canary_candidate="adapter") as api:
        admin, user = judged(api, candidate)
        assert len(api.engines) == 1 and api.engine.adapter_names == [f"{candidate}-on-base-1"]
        body = pair(user)
        assert sorted(body["duet"]["model_versions"]) == sorted(["base", candidate])
        texts = [c["message"]["content"] for c in body["choices"]]
        assert sorted(" from base" in t for t in texts) == [False, True]  # one answer is the adapter's
        assert any(f" from {candidate}-on-base-1" in t for t in texts)
        status = vote_until_decided(api, admin, user, prefer=candidate)
        assert (status["status"], status["reason"]) == ("promoted", "votes"), status
        wait_until(lambda: admin.get("/admin/models").json()["current"] == candidate, 30,
                   "the promoted candidate's merged weights to be swapped into the engine")
        assert api.engine.loaded == [candidate]
        # the adapter was the difference to base: with the candidate's weights in the engine it serves nothing
        assert admin.get("/admin/canary").json()["candidate_loaded"] is None


def test_a_replica_that_missed_a_promotion_serves_users_incumbent(tiny_model, tmp_path, clean_db):
    """The trainer's next candidate can be announced seconds after users promote one, before every replica's
    once-a-second look has swapped the promoted one in: the new test is against users' incumbent, not the
    announcing replica's engine, and a replica still on the old weights swaps them in (else no cross pair is
    ever served and the test, and the trainer holding its rounds for it, stall — seen in learning.py)."""
    home = tmp_path / "home"
    v1 = publish_copy(home / "registry", tiny_model)
    v2 = publish_copy(home / "registry", tiny_model)
    with serving(tiny_model, home) as api:
        admin = Authed(api.client, ADMIN_KEY)
        assert admin.post("/admin/updates/pause").json() == {"updates_paused": True}  # this replica swaps nothing
        assert start_test(v1, "base")
        assert store_call("move", v1, ("running",), "promoted", "votes") == "ok"
        assert start_test(v2, "base")  # announced while this engine still holds base
        assert store_call("current").incumbent == v1
        assert admin.get("/admin/models").json()["current"] == "base"
        assert admin.post("/admin/updates/resume").json() == {"updates_paused": False}
        wait_until(lambda: admin.get("/admin/models").json()["current"] == v1, 30,
                   "the replica to swap users' incumbent in")
        wait_until(lambda: admin.get("/admin/canary").json().get("candidate_loaded") == v2, 30,
                   "the candidate's engine to hold v2")
        user = Authed(api.client, api.create_key("judge"))
        # cross pairs again, v2 against v1 (every pair is one while the incumbent answers nobody else)
        assert sorted(pair(user)["duet"]["model_versions"]) == sorted([v1, v2])
