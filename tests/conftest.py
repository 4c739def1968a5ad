"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, a Redis database of the tests'
own, and ONE real Duet server (real vLLM engine, real HTTP) per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from duet.processes import stop_process
from tests.waiting import wait_until

TEST_REDIS_DB = int(os.environ.get("DUET_TEST_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
# What any `duet` a test starts without naming its own database reaches: never database 0, a user's `duet up`'s
os.environ["DUET_REDIS_URL"] = REDIS_URL
ADMIN_KEY = "test-admin-key"
SECRET = "test-secret"
MAX_MODEL_LEN = 256
MAX_BODY = 200_000
OUTBOX_MAX = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_redis(url: str):
    """A client of a Redis database emptied before and after (a generator for fixtures)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture(scope="session")
def redis_client():
    yield from empty_redis(REDIS_URL)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """The embedded Kafka-protocol broker (tansu, in memory), one per test session."""
    from duet.broker import EmbeddedBroker
    from feedback.contract.topics import ensure_topics

    b = EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    ensure_topics(b.bootstrap, partitions=3)
    yield b
    b.stop()


def make_tiny_llama(out: Path, seed: int = 0, hidden_size: int = 128, edit=None) -> Path:
    """2-layer random Llama (head_dim 64) saved with SmolLM2's tokenizer and chat template.
    `edit(model)` may change the weights before saving (tests of broken candidates)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from duet.model_assets import gguf_path

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_blue_llama(out: Path, strength: float = 1.5) -> Path:
    """A tiny random Llama that says " blue" in about one answer in seven under full-distribution
    sampling (its embedding has a larger component along a dimension every token shares): a
    preference for "blue" shows up in samples, so a policy has something to learn from it."""
    from transformers import AutoTokenizer

    from duet.model_assets import gguf_path

    src = gguf_path()
    blue = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).encode(" blue", add_special_tokens=False)[0]

    def edit(model):
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.5
        emb[blue, 0] = strength  # 1.5: about one answer in seven; 4: most answers

    return make_tiny_llama(out, edit=edit)


@pytest.fixture(scope="session")
def blue_model(tmp_path_factory) -> Path:
    return make_blue_llama(tmp_path_factory.mktemp("blue-llama"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def duet_env(tiny_model: Path, home: Path, port: int, bootstrap: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DUET_MODEL": str(tiny_model), "DUET_HOME": str(home), "DUET_PORT": str(port),
        "DUET_REDIS_URL": REDIS_URL, "DUET_ADMIN_KEY": ADMIN_KEY, "DUET_SECRET": SECRET,
        "DUET_MAX_MODEL_LEN": str(MAX_MODEL_LEN), "DUET_MAX_BODY_BYTES": str(MAX_BODY),
        "DUET_PAIR_RATE": "1.0",  # opted-in clients always pair: plain clients must still never get one
        "DUET_MAX_TOKENS_CAP": "200", "DUET_DEFAULT_MAX_TOKENS": "16", "DUET_RATE_LIMIT_RPM": "100000",
        "DUET_KAFKA_BOOTSTRAP": bootstrap, "DUET_REGISTRY_DIR": str(home / "registry"), "DUET_OUTBOX_MAX": str(OUTBOX_MAX),
        "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
        # announced versions go live at once (swaps are what these servers test); tests of users judging set "users"
        "DUET_CANARY": "off",
    })
    return env


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until GET `url` answers 200; fails with the end of `log` if `proc` exits or time runs out."""
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(lambda: proc.poll() is not None or answers(), timeout_s, f"{url} to answer 200", 0.5)
        up = proc.poll() is None
    except AssertionError:
        up = False
    if not up:
        raise RuntimeError(f"{url} did not answer 200: " + log.read_text()[-3000:])


class DuetServer:
    def __init__(self, url: str, env: dict[str, str], first_chat: httpx.Response) -> None:
        self.url = url
        self.env = env
        self.registry = Path(env["DUET_REGISTRY_DIR"])
        self.first_chat = first_chat  # a chat request sent while the engine was still loading

    def create_key(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "duet.cli", "keys", "create", *args], env=self.env,
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip()


@pytest.fixture(scope="session")
def duet_server(tiny_model, tmp_path_factory, redis_client, broker):
    home = tmp_path_factory.mktemp("duet-home")
    port = free_port()
    env = duet_env(tiny_model, home, port, broker.bootstrap)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "duet.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc, home / "server.log", 60)
        first = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           json={"model": "duet", "messages": [{"role": "user", "content": "hi"}]})
        wait_for(url + "/ready", proc, home / "server.log", 240)
        yield DuetServer(url, env, first)
    finally:
        stop_process(proc, timeout=30)
        log.close()


@pytest.fixture(scope="session")
def api_key(duet_server) -> str:
    return duet_server.create_key("--name", "tests")


@pytest.fixture()
def client(duet_server, api_key):
    with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=120) as c:
        yield c


class Db0Watch:
    """Redis clients of this test session (pytest and its descendants) that sit in database 0, the default a
    user's `duet up` uses. Sampled once a second from CLIENT LIST; a client counts when the same connection is
    seen there twice in a row (a new connection is in 0 for the instant before its SELECT)."""

    def __init__(self) -> None:
        import threading

        self.offenders: list[str] = []
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db0-watch", daemon=True)

    def start(self) -> Db0Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self, r: redis.Redis) -> None:
        import psutil

        in_db0 = {int(c["id"]): c for c in r.client_list() if c.get("db") == "0"}
        again = [c for i, c in in_db0.items() if i in self._seen]
        self._seen = set(in_db0)
        if not again:
            return
        ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        by_port = {c.laddr.port: c.pid for c in psutil.net_connections("tcp")
                   if c.raddr and c.raddr.port == 6379 and c.pid}
        for c in again:
            pid = by_port.get(int(c["addr"].rsplit(":", 1)[1]))
            if pid in ours:
                try:
                    what = " ".join(psutil.Process(pid).cmdline()[:4])
                except psutil.Error:
                    what = "?"
                self.offenders.append(f"pid {pid} ({what}) last ran {c.get('cmd')} in database 0")
                self._seen.discard(int(c["id"]))  # reported once

    def _run(self) -> None:
        r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        while not self._stop.wait(1.0):
            try:
                self.sample(r)
            except Exception:  # Redis briefly away (a chaos test): the next sample will tell
                pass
        r.close()


@pytest.fixture(scope="session")
def db0_watch():
    watch = Db0Watch().start()
    yield watch
    watch.stop()


@pytest.fixture(autouse=True)
def never_database_0(db0_watch):
    """Fails a test whose processes used Redis database 0 (a user's data), found while it ran."""
    before = len(db0_watch.offenders)
    yield
    found = db0_watch.offenders[before:]
    assert not found, "a test touched Redis database 0 (use the tests' own databases): " + "; ".join(found)
