"""Rollouts at both ends of their life. Serving (issue 24): a trainer that times out on `POST /admin/rollouts` no
longer leaves its generations running — the route watches the connection and cancels every generation when the
client is gone (in process, with a fake `Engine` that would generate until told to stop). The trainer: a
candidate whose engine is still loading (503 candidate_loading) is waited for, not sampled on the trainer's own
core (a real HTTP server that answers 503 twice)."""

from __future__ import annotations

import asyncio

import pytest

from feedback.contract.rollouts import RolloutRequest
from serving.engine import ChoiceDelta, GenerationStep
from serving.errors import APIError
from serving.rollouts import rollouts


class EndlessEngine:
    """Generates one token per step forever (or `steps` steps, then stops); counts generations started and
    closed (a closed generator is what makes vLLM abort the request)."""
    model_version = "base"
    max_model_len = 4096

    def __init__(self, steps: int | None = None) -> None:
        self.steps, self.started, self.closed = steps, 0, 0

    async def generate(self, prompt, sampling, n, request_id):
        self.started += 1
        try:
            i = 0
            while self.steps is None or i < self.steps:
                i += 1
                await asyncio.sleep(0.005)
                last = self.steps is not None and i == self.steps
                yield GenerationStep([ChoiceDelta(k, "x", 1, "length" if last else None, (7,)) for k in range(n)],
                                     self.model_version)
        finally:
            self.closed += 1


REQUEST = RolloutRequest(prompts=[[1, 2, 3]] * 4, n=2, max_tokens=8)


def test_a_client_that_went_away_cancels_every_generation():
    engine, asked = EndlessEngine(), []

    async def disconnected() -> bool:
        asked.append(1)
        return len(asked) >= 2  # connected at the first look, gone at the second

    with pytest.raises(APIError) as e:
        asyncio.run(rollouts(engine, REQUEST, disconnected))
    assert e.value.status == 499
    assert engine.started == 4 and engine.closed == 4  # all four generations ended, none left running


def test_a_connected_client_gets_its_samples():
    async def connected() -> bool:
        return False

    engine = EndlessEngine(steps=8)
    out = asyncio.run(rollouts(engine, REQUEST, connected))
    assert [len(g) for g in out.samples] == [2] * 4  # [prompt][n]
    assert all(s.token_ids == [7] * 8 and s.finish_reason == "length" for g in out.samples for s in g)


def test_the_trainer_waits_for_a_candidate_engine_that_is_loading(monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from feedback.contract.rollouts import RolloutResponse, RolloutSample
    from trainer import rollouts as client

    answers = ['{"error": {"message": "loading", "code": "candidate_loading"}}'] * 2 + [
        RolloutResponse(model_version="v000001", samples=[[RolloutSample(token_ids=[5, 6], finish_reason="stop")]])
        .model_dump_json()]
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["model_version"])
            body = answers[min(len(seen), len(answers)) - 1].encode()
            self.send_response(200 if len(seen) >= len(answers) else 503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = client.ServingRollouts(f"http://127.0.0.1:{server.server_port}", "k").sample([[1, 2]], 1, 4, 1.0,
                                                                                          "v000001")
        assert got == [[[5, 6]]] and seen == ["v000001"] * 3
        monkeypatch.setattr(client, "LOADING_WAIT_S", 0.0)  # past the wait: the trainer samples itself
        seen.clear()
        assert client.ServingRollouts(f"http://127.0.0.1:{server.server_port}", "k").sample(
            [[1, 2]], 1, 4, 1.0, "v000001") is None and len(seen) == 1
    finally:
        server.shutdown()
