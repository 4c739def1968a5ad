"""Users judge a candidate, in process (fake engines, real Redis): cross-version pairs are routed to both engines,
votes on them are counted for the test, and a candidate users prefer is promoted and swapped into the incumbent's
engine. The real engines' side (nice values, a candidate that cannot load, a restart) is test_canary.py's."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from feedback.canary import CanaryStore
from tests.conftest import ADMIN_KEY, TEST_REDIS_DB
from tests.inprocess import InProcessServing, publish_copy
from tests.test_api_fast import Authed
from tests.test_serving_api import HELLO
from tests.waiting import wait_until

CANARY_REDIS = f"redis://127.0.0.1:6379/{TEST_REDIS_DB - 4}"  # its own database: no other test uses it


@pytest.fixture()
def clean_db():
    r = redis.Redis.from_url(CANARY_REDIS)
    r.flushdb()
    yield
    r.flushdb()
    r.close()


def start_test(candidate: str, incumbent: str) -> bool:
    async def go() -> bool:
        r = aioredis.from_url(CANARY_REDIS, decode_responses=True)
        try:
            return await CanaryStore(r).start(candidate, incumbent)
        finally:
            await r.aclose()
    return asyncio.run(go())


def test_users_route_count_and_promote_a_candidate(tiny_model, tmp_path, clean_db):
    home = tmp_path / "home"
    candidate = publish_copy(home / "registry", tiny_model)
    with InProcessServing(tiny_model, CANARY_REDIS, home, canary="users", canary_engine_nice=0, pair_rate=1.0,
                          admin_key=ADMIN_KEY) as api:
        admin = Authed(api.client, ADMIN_KEY)
        user = Authed(api.client, api.create_key("judge"))
        assert start_test(candidate, "base")
        wait_until(lambda: admin.get("/admin/canary").json().get("candidate_loaded") == candidate, 30,
                   "the candidate's engine to hold it")
        assert [e.model_version for e in api.engines] == ["base", candidate]  # a second engine, the incumbent kept
        assert admin.get("/admin/models").json()["current"] == "base"  # not live before users decide
        status = None
        for _ in range(200):  # this user always prefers the candidate's answer (blind: the position varies)
            body = user.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO,
                                                            "duet": {"pairs": "force"}}).json()
            texts = [c["message"]["content"] for c in body["choices"]]
            assert sorted(body["duet"]["model_versions"]) == sorted(["base", candidate])  # one answer from each
            choice = "a" if candidate in texts[0] else "b"
            assert user.post("/v1/feedback", json={"comparison_id": body["duet"]["comparison_id"],
                                                   "vote_token": body["duet"]["vote_token"],
                                                   "choice": choice}).status_code == 202
            status = admin.get("/admin/canary").json()["test"]
            if status["status"] != "running":
                break
        assert (status["status"], status["reason"]) == ("promoted", "votes"), status
        assert status["wins"] == status["votes"] and status["lower"] > 0.5
        wait_until(lambda: admin.get("/admin/models").json()["current"] == candidate, 30,
                   "the promoted candidate to be swapped into the incumbent's engine")
        assert api.engines[0].loaded == [candidate]
        metrics = api.client.get("/metrics").text
        assert 'duet_canary_decisions_total{decision="promoted",reason="votes"}' in metrics
