"""The API's contract where the model's output does not matter — auth, validation, errors, pairs and votes —
in process with a fake engine (tests/inprocess.py) and real Redis: the same app `duet serve` builds, seconds
instead of an engine start. What needs real generation (streaming, seeds, swaps, aborts) stays in the slow tier
(test_serving_api.py, test_votes_api.py, test_swap.py)."""

from __future__ import annotations

import httpx
import pytest
import redis

from feedback.contract.comparisons import PendingComparison, comparison_key
from serving.auth import hash_key
from tests.conftest import ADMIN_KEY, MAX_BODY, MAX_MODEL_LEN, SECRET, TEST_REDIS_DB
from tests.inprocess import InProcessServing
from tests.test_serving_api import HELLO, _check_pair_record, assert_openai_error, chat
from tests.test_votes_api import ballot, pair, vote

FAST_REDIS = f"redis://127.0.0.1:6379/{TEST_REDIS_DB - 3}"  # its own database: no other test uses it


class Authed:
    """The in-process client with one API key on every request (an httpx.Client look-alike for the helpers)."""

    def __init__(self, client, key: str) -> None:
        self.client, self.key = client, key

    def request(self, method: str, url: str, headers: dict | None = None, **kw) -> httpx.Response:
        return self.client.request(method, url, headers={"Authorization": f"Bearer {self.key}", **(headers or {})},
                                   **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.request("POST", url, **kw)

    def get(self, url: str, **kw) -> httpx.Response:
        return self.request("GET", url, **kw)


@pytest.fixture(scope="module")
def api(tiny_model, tmp_path_factory):
    r = redis.Redis.from_url(FAST_REDIS)
    r.flushdb()
    with InProcessServing(tiny_model, FAST_REDIS, tmp_path_factory.mktemp("fast-home"), secret=SECRET,
                          admin_key=ADMIN_KEY, pair_rate=1.0, max_body_bytes=MAX_BODY, max_model_len=MAX_MODEL_LEN,
                          max_tokens_cap=200, default_max_tokens=16, rate_limit_rpm=100_000) as serving:
        yield serving
    r.flushdb()
    r.close()


@pytest.fixture(scope="module")
def api_key(api) -> str:
    return api.create_key("tests")


@pytest.fixture()
def client(api, api_key) -> Authed:
    return Authed(api.client, api_key)


@pytest.fixture()
def redis_client():
    r = redis.Redis.from_url(FAST_REDIS, decode_responses=True)
    yield r
    r.close()


def test_auth_errors(api):
    c = api.client
    body = {"model": "duet", "messages": HELLO}
    assert_openai_error(c.post("/v1/chat/completions", json=body), 401)
    assert_openai_error(c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(c.get("/v1/models", headers={"Authorization": "Basic x"}), 401)
    # non-ASCII bytes in the key (latin-1 in the header): a 401 like any wrong key, on every route
    for path in ("/v1/models", "/admin/models"):
        assert_openai_error(c.get(path, headers={"Authorization": b"Bearer \xe9t\xe9"}), 401)
    # the key before the body: no key and a bad body is a 401; with the admin key, the bound is named
    assert_openai_error(c.post("/admin/evaluations", json={"wins": "many"}), 401)
    huge = {"model_a": "v000001", "model_b": "base", "wins": 10**12, "ties": 0, "losses": 0, "judge": "x"}
    assert_openai_error(c.post("/admin/evaluations", json=huge, headers={"Authorization": f"Bearer {ADMIN_KEY}"}),
                        400, "wins")
    # an API key is not an admin key
    assert_openai_error(Authed(c, api.create_key("plain")).get("/admin/models"), 403)


@pytest.mark.parametrize("pair_,wins,param", [
    (("base", "base"), 3, "model_b"),  # a version against itself
    (("base", "v999999"), 0, "wins"),  # no verdict at all (refused before the names are looked up)
    (("v999999", "base"), 3, "model_a"),  # never published
    (("base", "0"), 3, "model_b"),  # not a version name (the fuzz left "0" with 3.6 M battles)
])
def test_evaluations_name_real_distinct_versions_and_carry_verdicts(api, pair_, wins, param):
    body = {"model_a": pair_[0], "model_b": pair_[1], "wins": wins, "ties": 0, "losses": 0, "judge": "human"}
    r = api.client.post("/admin/evaluations", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_openai_error(r, 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": HELLO, "temperature": 5}, "temperature"),
    ({"messages": HELLO, "n": 99}, "n"),
    ({"messages": HELLO, "duet": {"pairs": "sometimes"}}, "duet.pairs"),
    ({"messages": HELLO, "duet": {"pairs": "force", "k": 10}}, "duet.k"),
    ({"messages": HELLO, "n": 2, "duet": {"pairs": "force"}}, "n"),
    ({"messages": HELLO, "n": 2, "temperature": 0}, "n"),
    ({"messages": HELLO, "stop": [""]}, "stop"),
    ({"messages": HELLO, "stop": ["x" * 201]}, "stop"),
    ({"messages": HELLO, "seed": 2**64}, "seed"),
    ({"messages": HELLO, "seed": 2**64, "stream": True}, "seed"),  # refused before the stream starts
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
])
def test_bad_requests_are_400_with_the_field_named(api, client, body, param):
    before = api.engine.generations
    assert_openai_error(chat(client, **body), 400, param)
    assert api.engine.generations == before  # refused before anything was generated


def test_bad_json_and_bad_header(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    r = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO},
                    headers={"X-Duet-Pairs": "maybe"})
    assert_openai_error(r, 400, "X-Duet-Pairs")


def test_unknown_model_is_404(client):
    assert_openai_error(chat(client, model="gpt-9"), 404, "model")


def test_context_overflow_says_by_how_much(client):
    long = [{"role": "user", "content": "hello " * MAX_MODEL_LEN}]
    err = assert_openai_error(chat(client, messages=long, max_tokens=10), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN}" in err["message"]
    assert "reduce the length by" in err["message"]


def test_body_too_large_is_413(client):
    big = [{"role": "user", "content": "x" * (MAX_BODY + 10)}]
    assert_openai_error(chat(client, messages=big), 413)

    def chunked():  # no Content-Length: refused once the bytes pass the limit, on every route
        for _ in range(3 * MAX_BODY // 10_000 + 1):
            yield b" " * 10_000
    for path in ("/v1/chat/completions", "/v1/feedback"):
        assert_openai_error(client.post(path, content=chunked(), headers={"content-type": "application/json"}), 413)


def test_forced_pair_is_stored_with_ttl_and_a_valid_vote_token(client, redis_client, api_key):
    resp = chat(client, max_tokens=12, temperature=0, duet={"pairs": "force"}, user="alice")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    duet = body["duet"]
    assert duet["comparison_id"].startswith("cmp_") and duet["model_version"] == "base"
    cmp = _check_pair_record(redis_client, duet, [c["message"]["content"] for c in body["choices"]],
                             hash_key(api_key)[:12])
    # temperature 0 would make both answers identical: pairs sample at >= pair_min_temperature
    assert cmp.sampling.temperature >= 0.7
    assert cmp.user_hash and cmp.user_hash != "alice"


def test_pairs_header_and_k_answers(client, redis_client):
    resp = client.post("/v1/chat/completions", headers={"X-Duet-Pairs": "force"},
                       json={"model": "duet", "messages": HELLO, "max_tokens": 4, "duet": None})
    assert len(resp.json()["choices"]) == 2
    body = chat(client, max_tokens=4, duet={"pairs": "force", "k": 3}).json()
    assert len(body["choices"]) == 3
    cmp = PendingComparison.model_validate_json(redis_client.get(comparison_key(body["duet"]["comparison_id"])))
    assert len(cmp.answers) == 3


def test_allow_respects_a_keys_pair_rate(api):
    never = Authed(api.client, api.create_key("no-pairs", pair_rate=0.0))
    for _ in range(3):
        assert len(chat(never, max_tokens=2, duet={"pairs": "allow"}).json()["choices"]) == 1
    # ...while a key without an override uses DUET_PAIR_RATE (1.0 here)
    allow = Authed(api.client, api.create_key("pairs"))
    assert len(chat(allow, max_tokens=2, duet={"pairs": "allow"}).json()["choices"]) == 2


def test_plain_clients_leave_nothing_in_redis(client, redis_client):
    before = set(redis_client.keys("duet:cmp:*"))
    body = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 2}).json()
    assert body["duet"]["completion_id"] is None
    assert set(redis_client.keys("duet:cmp:*")) == before


def test_vote_rejections(api, client, redis_client):
    resp = pair(client)
    good = ballot(resp, choice="a")
    # malformed: the field is named
    assert_openai_error(vote(client, {**good, "choice": "c"}), 400, "choice")
    assert_openai_error(vote(client, {**good, "reason": "x" * 2001}), 400, "reason")
    assert_openai_error(vote(client, {**good, "surprise": 1}), 400, "surprise")
    assert_openai_error(vote(client, {k: v for k, v in good.items() if k != "vote_token"}), 400, "vote_token")
    assert_openai_error(vote(client, {**good, "completion_id": "cpl_x"}), 400)
    # unknown -> 410; bad token or another key -> 403
    assert_openai_error(vote(client, {**good, "comparison_id": "cmp_" + "0" * 32}), 410, "comparison_id")
    assert_openai_error(vote(client, {**good, "vote_token": "f" * 64}), 403, "vote_token")
    assert_openai_error(vote(client, {**good, "vote_token": "é"}), 403, "vote_token")  # non-ASCII: no crash
    assert_openai_error(vote(Authed(api.client, api.create_key("other")), good), 403, "vote_token")
    assert_openai_error(api.client.post("/v1/feedback", json=good), 401)
    # first vote wins; a retry with the same Idempotency-Key gets the same event; anything else 409
    first = vote(client, good, **{"Idempotency-Key": "k1"})
    assert first.status_code == 202
    assert redis_client.xlen("duet:outbox") >= 1  # durable before it was acknowledged (no relay runs here)
    retry = vote(client, good, **{"Idempotency-Key": "k1"})
    assert retry.status_code == 202 and retry.json() == first.json()  # the original answer
    assert_openai_error(vote(client, {**good, "choice": "b"}), 409, "comparison_id")
    assert_openai_error(vote(client, good, **{"Idempotency-Key": "k2"}), 409)
    # expired -> 410; but a retry of a vote made before it expired gets the original answer
    late = pair(client)
    redis_client.delete("duet:cmp:" + late["duet"]["comparison_id"])
    assert_openai_error(vote(client, ballot(late, choice="a")), 410, "comparison_id")
    redis_client.delete("duet:cmp:" + good["comparison_id"])
    after = vote(client, good, **{"Idempotency-Key": "k1"})
    assert after.status_code == 202 and after.json() == first.json()
    assert_openai_error(vote(client, good, **{"Idempotency-Key": "k3"}), 410, "comparison_id")
    metrics = api.client.get("/metrics").text
    for reason in ("malformed", "unknown_or_expired", "bad_token", "already_voted"):
        assert f'duet_vote_rejections_total{{reason="{reason}"}}' in metrics


def test_canary_routes_say_tests_are_off(api):
    r = api.client.get("/admin/canary", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_openai_error(r, 409)
    assert r.json()["error"]["code"] == "canary_off"
