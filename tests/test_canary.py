"""Users judge every new version, end to end on the tiny model: a real server with DUET_CANARY=users (two
real vLLM engines), real Redis, its own broker. Simulated users prefer answers that say " blue": a candidate
that says it far more often is promoted by their votes and swapped into the incumbent's real engine (it fails if
promotion ignored the votes: the budget would reject it); the candidate's engine runs niced; the dashboard, the
leaderboard and a restarted replica show what users decided; a candidate this replica cannot load is said so.
Rejection by votes, an admin's hand and the routing rules are tested in process (test_canary_fast.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import psutil
import pytest
import redis

from duet.processes import stop_process
from duet.broker import EmbeddedBroker
from feedback.contract.events import WeightsAnnouncement
from feedback.contract.registry import manifest_checksum
from feedback.contract.topics import WEIGHTS, ensure_topics
from tests.conftest import ADMIN_KEY, TEST_REDIS_DB, duet_env, free_port, make_blue_llama, make_tiny_llama, wait_for
from tests.test_serving_api import assert_openai_error
from tests.test_swap import publish
from tests.test_web_pages import ARTIFACTS, CHROMIUM
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB - 1}"  # not the session server's
PROMPTS = ["Say something.", "Tell me a colour.", "Describe the sky.", "What do you like?"]


class CanaryServer:
    """`duet serve` with DUET_CANARY=users; `restart()` stops and starts it on the same Redis and broker."""

    def __init__(self, env: dict, home, url: str, broker: EmbeddedBroker) -> None:
        self.env, self.home, self.url, self.broker = env, home, url, broker
        self.registry = home / "registry"
        self.proc = None
        self.key = ""

    def start(self) -> None:
        log = open(self.home / "server.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "duet.cli", "serve"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        wait_for(self.url + "/ready", self.proc, self.home / "server.log", 300)

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def canary_server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("canary-home")
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    broker = EmbeddedBroker(log_path=home / "tansu.log").start()
    ensure_topics(broker.bootstrap)
    port = free_port()
    env = duet_env(tiny_model, home, port, broker.bootstrap)
    env.update({"DUET_REDIS_URL": REDIS_URL, "DUET_CANARY": "users", "DUET_CANARY_PAIR_SHARE": "1.0",
                "DUET_CANARY_MAX_VOTES": "400", "DUET_CANARY_TUNED_FOR": "60", "DUET_DEFAULT_MAX_TOKENS": "12"})
    server = CanaryServer(env, home, f"http://127.0.0.1:{port}", broker)
    try:
        server.start()
        server.key = subprocess.run([sys.executable, "-m", "duet.cli", "keys", "create", "--name", "users"], env=env,
                                    capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        yield server
    finally:
        server.stop()
        broker.stop()
        r.flushdb()


def announce(broker: EmbeddedBroker, registry, name: str) -> None:
    from kafka import KafkaProducer

    folder = registry / name
    m = json.loads((folder / "manifest.json").read_text())
    ann = WeightsAnnouncement(version=m["version"], name=name, manifest_location=str(folder / "manifest.json"),
                              manifest_sha256=manifest_checksum(folder))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    producer.send(WEIGHTS, value=ann.model_dump_json().encode()).get(10)
    producer.close()


def wait_test(admin: httpx.Client, candidate: str, cond, timeout_s: float = 240) -> dict:
    def status() -> dict | None:
        st = admin.get("/admin/canary").json()
        t = st.get("test")
        return st if t and t["candidate"] == candidate and cond(st) else None

    return wait_until(status, timeout_s, f"the canary test of {candidate} to meet its condition", 0.5)


def blue_user(c: httpx.Client, i: int) -> tuple[dict, int | None]:
    """One pair and a vote by the users' taste: the answer with more " blue" wins, else a tie."""
    r = c.post("/v1/chat/completions", json={"model": "duet", "messages": [{"role": "user",
               "content": PROMPTS[i % len(PROMPTS)]}], "temperature": 1.0, "duet": {"pairs": "force"}})
    assert r.status_code == 200, r.text
    body = r.json()
    texts = [ch["message"]["content"].lower().count("blue") for ch in body["choices"]]
    choice = "a" if texts[0] > texts[1] else "b" if texts[1] > texts[0] else "tie"
    v = c.post("/v1/feedback", json={"comparison_id": body["duet"]["comparison_id"],
                                     "vote_token": body["duet"]["vote_token"], "choice": choice})
    assert v.status_code == 202, v.text
    return body, v.status_code


def vote_until(url: str, key: str, admin: httpx.Client, candidate: str, limit: int = 400) -> dict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        for i in range(limit):
            body, _ = blue_user(c, i)
            st = admin.get("/admin/canary").json()
            if st["test"]["status"] != "running":
                return st
    raise AssertionError(f"undecided after {limit} votes: {st}")


def engine_nice_values(server_pid: int) -> list[int]:
    """Nice values of the server's vLLM processes (engine core and worker of each engine)."""
    server = psutil.Process(server_pid)
    return [c.nice() for c in server.children(recursive=True) if " ".join(c.cmdline()).startswith("VLLM::")]


def screenshot_panel(url: str, key: str) -> None:
    """The dashboard's canary card in headless Chromium, for people (README) — where Chromium is installed."""
    if CHROMIUM is None:
        return
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/dashboard#key={key}")
        card = page.locator("#canary-card")
        card.locator("svg").wait_for()
        assert "promoted" in page.locator("#canary-title").inner_text()
        card.screenshot(path=ARTIFACTS / "dashboard-canary.png")
        browser.close()


def test_users_promote_a_better_candidate_on_real_engines(canary_server, tmp_path):
    url, key, registry, broker = canary_server.url, canary_server.key, canary_server.registry, canary_server.broker
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as admin:
        # (a) a better candidate
        blue = publish(registry, make_blue_llama(tmp_path / "blue", strength=4.0))
        announce(broker, registry, blue)
        wait_test(admin, blue, lambda st: st["candidate_loaded"] == blue)
        assert admin.get("/admin/models").json()["current"] == "base"  # not live before users decide
        # the candidate's engine only takes CPU time the incumbent's leaves (DUET_CANARY_ENGINE_NICE 19)
        nice = sorted(engine_nice_values(canary_server.proc.pid))
        assert nice and nice == [0] * (len(nice) // 2) + [19] * (len(nice) // 2), nice
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            body, _ = blue_user(c, 0)
        assert sorted(body["duet"]["model_versions"]) == sorted(["base", blue])  # both, never which is which
        st = vote_until(url, key, admin, blue)
        t = st["test"]
        assert (t["status"], t["reason"]) == ("promoted", "votes"), t
        assert t["lower"] > 0.5 and t["votes"] < 400
        assert 0.0 <= t["length_controlled_win_rate"] <= 1.0
        wait_until(lambda: admin.get("/admin/models").json()["current"] == blue, 60, "the candidate to go live", 0.5)
        assert admin.get("/admin/models").json()["current"] == blue
        metrics = httpx.get(url + "/metrics").text
        assert 'duet_canary_decisions_total{decision="promoted",reason="votes"} 1.0' in metrics

        # what people see: the dashboard's canary panel, and users' scores kept apart from other judges'
        user = {"Authorization": f"Bearer {key}"}
        panel = httpx.get(url + "/v1/dashboard", headers=user, timeout=30).json()["canary"]
        assert panel["test"]["candidate"] == blue and panel["test"]["status"] == "promoted"
        assert panel["trajectory"][-1]["votes"] == panel["test"]["votes"]
        assert panel["trajectory"][-1]["lower"] > 0.5 > panel["trajectory"][0]["lower"]
        screenshot_panel(url, key)

        # decisions live in Redis: a restarted replica serves what users promoted, and knows they did
        canary_server.restart()
        fresh = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert httpx.get(url + "/admin/models", headers=fresh, timeout=60).json()["current"] == blue
        after = httpx.get(url + "/admin/canary", headers=fresh, timeout=60).json()
        assert (after["test"]["candidate"], after["test"]["status"]) == (blue, "promoted")
        board = httpx.get(url + "/v1/leaderboard", headers=user, timeout=30).json()["data"]
        users = {e["model_version"]: e for e in board if e["judge"] == "users"}
        assert set(users) == {"base", blue}
        assert users[blue]["score"] > users["base"]["score"]
        assert users[blue]["length_controlled_score"] is not None
        spoof = admin.post("/admin/evaluations", json={"model_a": "base", "model_b": blue, "wins": 100, "ties": 0,
                                                       "losses": 0, "judge": "users"})
        assert_openai_error(spoof, 400)  # nobody else speaks for users

        # (d) a candidate this replica cannot load (other tensor shapes): it says so and keeps serving alone
        wide = publish(registry, make_tiny_llama(tmp_path / "wide", hidden_size=192))
        announce(broker, registry, wide)
        wait_test(admin, wide, lambda st: st["load_error"] is not None)
        models = admin.get("/admin/models").json()
        assert models["current"] == blue and models["canary"]["candidate"] == wide
        assert models["canary"]["candidate_loaded"] != wide and "differ" in models["canary"]["load_error"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            body, _ = blue_user(c, 2)
        assert set(body["duet"].get("model_versions") or [body["duet"]["model_version"]]) == {blue}
        assert "duet_canary_candidate_loaded 0.0" in httpx.get(url + "/metrics").text
        assert "duet_canary_load_failures_total 1.0" in httpx.get(url + "/metrics").text
