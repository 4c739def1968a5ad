"""The serving app in this process, with a fake `Engine` (the Protocol serving talks to) and real Redis: the fast
tier for everything that does not depend on what a real model computes — auth, validation, votes, errors. The
app is built exactly as `duet serve` builds it (duet/wiring.py `serving_config`), only the engine differs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi.testclient import TestClient

from duet.settings import Settings
from duet.wiring import serving_config
from serving.app import create_app
from serving.engine import ChoiceDelta, GenerationStep, WeightsUnavailable
from tests.waiting import wait_until


class FakeEngine:
    """Answers every prompt at once: choice i says "answer i from <its version>" (with an adapter: "from <the
    adapter's name>"), one token per word, stopping (finish "stop") unless max_tokens cuts it ("length"); every
    prompt token's log-prob is −1 (what `probe()` records in a manifest), `adapter_logprob` with an adapter.
    Deterministic; counts what it was asked. A LoRAHost (serving/engine.py)."""

    def __init__(self, version: str = "base", max_model_len: int = 512) -> None:
        self.model_version, self.max_model_len = version, max_model_len
        self.generations, self.aborted, self.loaded = 0, [], []
        self.adapters: dict[int, object] = {}  # loaded now, by id
        self.adapter_names: list[str] = []  # every adapter ever loaded, in order
        self.adapter_logprob = -1.0

    async def add_adapter(self, adapter) -> None:
        self.adapters[adapter.id] = adapter
        self.adapter_names.append(adapter.name)

    async def remove_adapter(self, adapter) -> None:
        self.adapters.pop(adapter.id, None)

    async def generate(self, prompt_token_ids, sampling, n, request_id, adapter=None):
        self.generations += 1
        for i in range(n):
            words = [f"answer {i}", f" from {adapter.name if adapter else self.model_version}", "."]
            words = words[:sampling.max_tokens]
            finish = "stop" if len(words) == 3 else "length"
            for j, w in enumerate(words):
                yield GenerationStep([ChoiceDelta(i, w, 1, finish if j == len(words) - 1 else None, (100 + j,))],
                                     self.model_version)
                await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def prompt_logprobs(self, token_ids, request_id, adapter=None):
        return [self.adapter_logprob if adapter else -1.0] * (len(token_ids) - 1)

    async def load_weights(self, path: str, version: str) -> float:
        if not Path(path).exists():
            raise WeightsUnavailable(path)
        self.model_version = version
        self.loaded.append(version)
        return 0.0

    def num_unfinished(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass


class InProcessServing:
    """`with InProcessServing(model, redis_url, home, **settings) as api:` — api.client (a TestClient, an
    httpx.Client), api.engine (the FakeEngine), api.create_key(name, **kw)."""

    def __init__(self, model: Path, redis_url: str, home: Path, **settings) -> None:
        given = {"model": str(model), "home": home, "redis_url": redis_url, "registry_dir": home / "registry",
                 "kafka_bootstrap": "", "canary": "off", "secret": "in-process-secret",
                 "admin_key": "in-process-admin", **settings}
        self.settings = Settings(_env_file=None, **given)
        self.engines: list[FakeEngine] = []  # the incumbent's first; a canary test's candidate engine second

        def start_engine(cfg, path) -> FakeEngine:
            self.engines.append(FakeEngine(max_model_len=cfg.max_model_len))
            return self.engines[-1]

        self.app = create_app(serving_config(self.settings), model=lambda: str(model), engine_factory=start_engine)
        self.client: TestClient | None = None

    def __enter__(self) -> InProcessServing:
        self.client = TestClient(self.app, base_url="http://duet.test").__enter__()
        # the engine "loads" in the background, as in `duet serve` (here: the tokenizer, then the fake at once)
        wait_until(lambda: self.client.get("/ready").status_code == 200, 60, "the in-process app to be ready")
        return self

    def __exit__(self, *exc) -> None:
        assert self.client is not None
        self.client.__exit__(*exc)

    @property
    def engine(self) -> FakeEngine:
        return self.engines[0]

    @property
    def admin_key(self) -> str:
        return self.settings.admin_key

    def create_key(self, name: str, **kw) -> str:
        """A new API key, as `duet keys create` makes it."""
        import redis.asyncio as aioredis

        from serving.auth import KeyStore

        async def make() -> str:
            r = aioredis.from_url(self.settings.redis_url, decode_responses=True)
            try:
                return (await KeyStore(r).create(name, **kw))[0]
            finally:
                await r.aclose()

        return asyncio.run(make())


def probe(sequences: int = 2, length: int = 6):
    """Probe log-probs a FakeEngine reproduces (every token −1), for a manifest its swap checks accept."""
    from feedback.contract.probes import ProbeLogprobs

    ids = [[100 + i + j for j in range(length)] for i in range(sequences)]
    return ProbeLogprobs(token_ids=ids, logprobs=[[-1.0] * (length - 1) for _ in ids])


def publish_copy(registry: Path, source: Path) -> str:
    """`source`'s files published as the registry's next version (with `probe()`); its name."""
    import shutil

    from feedback.contract.registry import Registry

    def write(folder: Path) -> None:
        for f in source.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)

    manifest, _ = Registry(registry).publish(write, base_model="tiny", algorithm="test", hyperparameters={},
                                             train_metrics={}, eval={}, kafka_offsets={}, probe=probe())
    return manifest.name

