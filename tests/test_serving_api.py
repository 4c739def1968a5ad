"""Acceptance tests: the real HTTP API, the real vLLM engine (tiny random Llama), real Redis."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from feedback.contract.comparisons import PendingComparison, comparison_key
from serving.pairing import verify_vote_token
from tests.conftest import SECRET
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello."}]


def chat(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("model", "duet")
    body.setdefault("messages", HELLO)
    return client.post("/v1/chat/completions", json=body)


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_chat_before_engine_ready_is_503(duet_server):
    resp = duet_server.first_chat
    assert_openai_error(resp, 503)
    assert resp.headers["Retry-After"]


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["duet"]


def test_non_streaming_chat_has_usage_and_version(client):
    resp = chat(client, max_tokens=8, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1 and usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["duet"]["model_version"] == "base" == resp.headers["X-Duet-Model-Version"]
    assert body["duet"]["comparison_id"] is None


def test_seeded_sampling_is_reproducible_and_n_returns_n(client):
    a = chat(client, max_tokens=8, seed=7, temperature=1.0).json()
    b = chat(client, max_tokens=8, seed=7, temperature=1.0).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    three = chat(client, max_tokens=4, n=3).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]


def test_max_tokens_is_capped_by_settings(client):
    body = chat(client, max_tokens=10_000, temperature=0, stop=None).json()
    assert body["usage"]["completion_tokens"] <= 200  # DUET_MAX_TOKENS_CAP


def test_openai_client_streaming_never_gets_a_pair(duet_server, api_key):
    # A plain OpenAI client that did not opt in gets exactly n, even with DUET_PAIR_RATE=1.0.
    oai = openai.OpenAI(base_url=duet_server.url + "/v1", api_key=api_key)
    text, finish = [], None
    for chunk in oai.chat.completions.create(model="duet", messages=HELLO, max_tokens=8, stream=True):
        for c in chunk.choices:
            assert c.index == 0
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish in ("stop", "length")
    for _ in range(3):
        r = oai.chat.completions.create(model="duet", messages=HELLO, max_tokens=4)
        assert len(r.choices) == 1
        assert r.model_extra["duet"]["comparison_id"] is None


def test_stream_format_and_usage(client):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "duet", "messages": HELLO, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 6
    finishing = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finishing) == 1 and finishing[0]["duet"]["model_version"] == "base"


def _check_pair_record(redis_client, duet: dict, answers: list[str], api_key_id: str) -> PendingComparison:
    raw = redis_client.get(comparison_key(duet["comparison_id"]))
    assert raw is not None
    cmp = PendingComparison.model_validate_json(raw)
    assert [a.text for a in cmp.answers] == answers
    assert {a.model_version for a in cmp.answers} == {"base"}
    assert cmp.messages[0].content == HELLO[0]["content"]
    ttl = redis_client.ttl(comparison_key(duet["comparison_id"]))
    assert 24 * 3600 - 30 < ttl <= 24 * 3600
    assert int(cmp.expires_at.timestamp()) == duet["expires_at"]
    assert cmp.key_id == api_key_id
    assert verify_vote_token(SECRET, duet["vote_token"], duet["comparison_id"], api_key_id, duet["expires_at"])
    assert not verify_vote_token(SECRET, duet["vote_token"], duet["comparison_id"], "another-key", duet["expires_at"])
    assert not verify_vote_token(SECRET, duet["vote_token"], duet["comparison_id"], api_key_id, duet["expires_at"] + 1)
    assert not verify_vote_token("other-secret", duet["vote_token"], duet["comparison_id"], api_key_id,
                                 duet["expires_at"])
    return cmp


def _key_id(api_key: str) -> str:
    from serving.auth import hash_key

    return hash_key(api_key)[:12]


def test_streaming_pair_carries_both_choices_and_duet_in_last_chunk(client, redis_client, api_key):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "duet", "messages": HELLO, "max_tokens": 10, "stream": True,
            "duet": {"pairs": "force"}}) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
    assert set(texts) == {0, 1}
    assert "duet" in chunks[-1] and all("duet" not in c for c in chunks[:-1])
    _check_pair_record(redis_client, chunks[-1]["duet"], [texts[0], texts[1]], _key_id(api_key))


def test_rate_limit_is_429_with_retry_after(duet_server):
    key = duet_server.create_key("--name", "slow", "--rate-limit", "2")
    with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {key}"}) as c:
        statuses = [c.get("/v1/models").status_code for _ in range(3)]
        assert statuses[:2] == [200, 200]
        last = c.get("/v1/models")
    assert_openai_error(last, 429)
    assert 1 <= int(last.headers["Retry-After"]) <= 61


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_aborts_generation(client, duet_server, api_key):
    before = _metric(client, "duet_engine_aborts_total")
    with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {api_key}"}) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "duet", "messages": HELLO, "max_tokens": 200, "stream": True,
                "temperature": 1.0, "stop": []}) as resp:
            for line in resp.iter_lines():
                if '"content"' in line:
                    break  # hang up mid-stream
    wait_until(lambda: _metric(client, "duet_engine_aborts_total") > before, 20, "the engine to count the abort", 0.2)
    assert _metric(client, "duet_engine_aborts_total") == before + 1
    assert _metric(client, "duet_inflight_requests") == 0


def test_metrics_exposed(client):
    chat(client, max_tokens=2)
    text = client.get("/metrics").text
    for name in ("duet_http_requests_total", "duet_http_request_duration_seconds_bucket",
                 "duet_time_to_first_token_seconds_bucket", "duet_generated_tokens_total",
                 "duet_paired_responses_total", "duet_inflight_requests", "duet_engine_unfinished_requests",
                 'duet_model_version_info{version="base"} 1.0'):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text


def test_openapi_documents_every_body(duet_server):
    doc = httpx.get(duet_server.url + "/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    assert all(r.rsplit("/", 1)[1] in schemas for r in refs(doc))  # every reference resolves
    for path in ("/v1/chat/completions", "/v1/feedback", "/admin/evaluations", "/admin/rollouts"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].rsplit("/", 1)[1] in schemas, path
    vote = schemas["VoteRequest"]["properties"]
    assert {"comparison_id", "completion_id", "vote_token", "choice", "ranking", "rating", "edited_answer",
            "answer_index"} <= set(vote)
    assert "duet" in schemas["ChatCompletionRequest"]["properties"]
