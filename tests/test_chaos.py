"""Chaos: what survives what. A real `duet serve` (tiny model, real vLLM engine) on a private Redis that
this test hangs (SIGSTOP), kills and restarts empty (no persistence), as an operator's Redis might."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import httpx
import pytest
import redis

from duet.processes import stop_process

from tests.conftest import duet_env, free_port, wait_for
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "hello"}]


class PrivateRedis:
    """redis-server on its own port, nothing on disk: a restart comes back empty."""

    def __init__(self, tmp_path) -> None:
        self.port, self.dir, self.proc = free_port(), tmp_path, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, "redis-server to start", 0.05)

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@contextmanager
def serve(tiny_model, tmp_path, redis_url: str):
    port = free_port()
    env = {**duet_env(tiny_model, tmp_path / "home", port, ""), "DUET_REDIS_URL": redis_url, "DUET_RELAY": "off",
           "DUET_DEV_KEY": "duet-dev-chaos"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "duet.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/ready", proc, tmp_path / "serve.log", 300)
        yield url, env
    finally:
        stop_process(proc, timeout=30)
        log.close()


def chat(url: str, key: str, pairs: str = "force", timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                      json={"model": "duet", "messages": HELLO, "max_tokens": 4, "duet": {"pairs": pairs}})


def vote(url: str, key: str, resp: dict) -> httpx.Response:
    return httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"comparison_id": resp["duet"]["comparison_id"], "vote_token": resp["duet"]["vote_token"],
                            "choice": "a"})


def test_redis_hung_down_and_restarted_empty(tiny_model, tmp_path):
    store = PrivateRedis(tmp_path)
    store.start()
    try:
        with serve(tiny_model, tmp_path, store.url) as (url, env):
            made = subprocess.run([sys.executable, "-m", "duet.cli", "keys", "create", "--name", "team"], env=env,
                                  capture_output=True, text=True, check=True, timeout=60)
            team = made.stdout.strip()  # a key that lives in Redis
            before = chat(url, team).json()
            assert len(before["choices"]) == 2 and before["duet"]["comparison_id"]
            unvoted = chat(url, team).json()

            for outage in ("hung", "down"):
                if outage == "hung":
                    os.kill(store.proc.pid, signal.SIGSTOP)
                else:
                    store.stop()
                # answered at all (a hung Redis call would hang it past the client's timeout, an error here):
                # served from the key cache, single answer, no pair; the breaker's trip is the signal below
                r = chat(url, team)
                assert r.status_code == 200, r.text
                assert len(r.json()["choices"]) == 1 and r.json()["duet"]["comparison_id"] is None
                assert chat(url, "duet-dev-chaos").status_code == 200  # the dev key needs no Redis
                refused = vote(url, team, unvoted)
                assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
                assert refused.json()["error"]["code"] == "redis_unavailable"
                stranger = chat(url, "duet-never-seen")  # a key that cannot be checked: 503, not 401 or 500
                assert stranger.status_code == 503 and "Retry-After" in stranger.headers
                ready = httpx.get(url + "/ready", timeout=10).json()
                assert ready["ready"] and ready["degraded"] and ready["redis"] == "unreachable"
                if outage == "hung":
                    os.kill(store.proc.pid, signal.SIGCONT)
                    wait_until(lambda: httpx.get(url + "/ready", timeout=10).json()["redis"] == "ok", 30,
                               "/ready to see Redis back", 0.2)
                    # as soon as /ready says Redis answers, requests that need it work (no cool-down left)
                    fresh = chat(url, team).json()
                    assert len(fresh["choices"]) == 2, fresh
                    assert vote(url, team, fresh).status_code == 202

            store.start()  # back, and empty: every key and comparison is gone
            def paired():
                r = chat(url, "duet-dev-chaos")
                return r if r.status_code == 200 and len(r.json()["choices"]) == 2 else None

            r = wait_until(paired, 30, "pairs to be offered again, without a restart", 1)
            assert vote(url, "duet-dev-chaos", r.json()).status_code == 202
            assert httpx.get(url + "/ready", timeout=10).json()["degraded"] is False
    finally:
        store.stop()
