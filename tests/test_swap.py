"""Hot-swap on the running server (real engine): verify, swap in place under load, refuse broken
candidates, roll back when the probe fails, follow announcements, admin pause/resume/activate.

Ends with the base weights active again (other tests expect "base")."""

from __future__ import annotations

import json
import shutil
import threading
import time

from pathlib import Path

import httpx
import pytest

from feedback.contract.events import WeightsAnnouncement
from feedback.contract.registry import Registry, manifest_checksum
from feedback.contract.topics import WEIGHTS
from tests.conftest import ADMIN_KEY, make_tiny_llama
from tests.test_serving_api import HELLO, _metric, assert_openai_error
from duet.wiring import policy_config
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def probe_of(weights: Path):
    """What the trainer records with every version: the log-probs its exported files give the probe
    conversations (serving refuses a version without them)."""
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    return probe_logprobs(PolicyTrainer(policy_config(), str(weights)), weights)


def publish(registry: Path, source: Path, probe=None) -> str:
    probe = probe or probe_of(source)

    def write(folder):
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)
    manifest, _ = Registry(registry).publish(write, base_model="tiny", algorithm="test", hyperparameters={},
                                             train_metrics={}, eval={}, kafka_offsets={}, probe=probe)
    return manifest.name


@pytest.fixture(scope="module")
def admin(duet_server):
    with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as c:
        yield c
        c.post("/admin/updates/resume")
        assert c.post("/admin/models/base/activate").status_code == 200


@pytest.fixture(autouse=True)
def base_live(admin):
    """Every test starts from the same state of the shared server: base live, updates followed (no test inherits
    what another left)."""
    assert admin.post("/admin/updates/resume").status_code == 200
    assert admin.post("/admin/models/base/activate").status_code == 200


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """The base with its MLP outputs ×25: another answer, still words (tiny random Llamas of other seeds
    answer only newlines, which the health probe rightly refuses)."""
    def edit(m):
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.mul_(25.0)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-b"), seed=0, edit=edit)


def make_mute_llama(out: Path) -> Path:
    """Final norm zeroed: every logit is 0, greedy picks token 0 (a special token): empty answers,
    so the health probe fails."""
    return make_tiny_llama(out, seed=3, edit=lambda m: m.model.norm.weight.zero_())


def greedy(client: httpx.Client) -> tuple[str, str]:
    body = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 8,
                                                     "temperature": 0}).json()
    return body["choices"][0]["message"]["content"], body["duet"]["model_version"]


def test_activate_swaps_weights_and_back(client, admin, duet_server, other_weights):
    base_text, v = greedy(client)
    assert v == "base"
    name = publish(duet_server.registry, other_weights)
    r = admin.post(f"/admin/models/{name}/activate")
    assert r.status_code == 200, r.text
    assert r.json()["swap"]["result"] == "ok" and r.json()["swap"]["pause_s"] < 5
    new_text, v = greedy(client)
    assert v == name and new_text != base_text
    assert admin.post("/admin/models/base/activate").status_code == 200
    assert greedy(client) == (base_text, "base")  # exactly the old weights' output again
    assert admin.post(f"/admin/models/{name}/activate").status_code == 200  # forward again
    assert greedy(client) == (new_text, name)
    status = admin.get("/admin/models").json()
    assert status["current"] == name and [h["result"] for h in status["history"]][-3:] == ["ok", "ok", "ok"]


def test_swaps_under_load_fail_no_request(client, admin, duet_server, api_key, other_weights):
    name = publish(duet_server.registry, other_weights)
    expected = {}
    for version in ("base", name):
        admin.post(f"/admin/models/{version}/activate")
        expected[version] = greedy(client)[0]
    results, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=duet_server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", "/v1/chat/completions", json={
                        "model": "duet", "messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
                    lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                results.append((r.status_code, lines))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for version in (name, "base", name, "base", name):  # five swaps
        time.sleep(0.5)
        assert admin.post(f"/admin/models/{version}/activate").status_code == 200
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert results and all(status == 200 and lines[-1] == "data: [DONE]" for status, lines in results)
    checked = 0
    for _, lines in results:
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        duet = chunks[-1]["duet"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        if duet.get("model_versions"):  # spanned a swap: says so
            assert len(duet["model_versions"]) == 2
        else:
            assert text == expected[duet["model_version"]]  # greedy output matches the live weights
            checked += 1
    assert checked > 0


def _refused(admin, name: str) -> str:
    before = admin.get("/admin/models").json()["current"]
    r = admin.post(f"/admin/models/{name}/activate")
    assert_openai_error(r, 422, "version")
    assert admin.get("/admin/models").json()["current"] == before  # the old version keeps serving
    return r.json()["error"]["message"]


def test_refusals_keep_the_old_version(admin, duet_server, other_weights, tmp_path):
    tampered = publish(duet_server.registry, other_weights)
    with open(duet_server.registry / tampered / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    assert "checksum mismatch" in _refused(admin, tampered)
    wide = publish(duet_server.registry, make_tiny_llama(tmp_path / "wide", hidden_size=192))
    assert "architecture differs" in _refused(admin, wide)
    nan = publish(duet_server.registry, make_tiny_llama(
        tmp_path / "nan", seed=2, edit=lambda m: m.model.norm.weight.fill_(float("nan"))),
        probe=probe_of(other_weights))  # (its own would be NaN)
    assert "non-finite" in _refused(admin, nan)
    assert_openai_error(admin.post("/admin/models/v999999/activate"), 404, "version")
    for odd in ("²", "9" * 5000, "v1.5"):  # not digits for int(), too long, not a version
        assert_openai_error(admin.post(f"/admin/models/{odd}/activate"), 404, "version")
    metrics = admin.get("/metrics").text
    assert 'duet_swaps_total{result="refused"}' in metrics


def test_failed_probe_rolls_back(client, admin, duet_server, tmp_path):
    admin.post("/admin/models/base/activate")
    mute = publish(duet_server.registry, make_mute_llama(tmp_path / "mute"))
    r = admin.post(f"/admin/models/{mute}/activate")
    assert_openai_error(r, 409, "version")
    assert greedy(client)[1] == "base"
    assert admin.get("/admin/models").json()["history"][-1]["result"] == "rolled_back"


def test_served_log_probs_must_match_the_manifest(client, admin, duet_server, other_weights, tiny_model):
    """The trainer's probe log-probs of what it exported travel in the manifest; after the load the engine
    computes the same or the swap rolls back; a manifest whose log-probs the engine does not reproduce is
    rolled back and the incumbent keeps serving."""
    from trainer.policy import PolicyTrainer
    from trainer.probe import probe_logprobs

    pt = PolicyTrainer(policy_config(), str(tiny_model))
    probe = probe_logprobs(pt, other_weights)
    right = publish(duet_server.registry, other_weights, probe=probe)
    # what a silent load bug looks like from outside: the files say one thing, the engine computes another
    # (a tiny random model's outputs are near-uniform, so other weights would hardly differ: shift instead)
    off = probe.model_copy(update={"logprobs": [[x - 1.0 for x in seq] for seq in probe.logprobs]})
    wrong = publish(duet_server.registry, other_weights, probe=off)
    admin.post("/admin/models/base/activate")

    assert admin.post(f"/admin/models/{right}/activate").status_code == 200
    ok = admin.get("/admin/models").json()["history"][-1]
    assert ok["result"] == "ok" and ok["logprob_diff"] < duet_server_tolerance(duet_server), ok
    admin.post("/admin/models/base/activate")

    r = admin.post(f"/admin/models/{wrong}/activate")
    assert_openai_error(r, 409, "version")
    bad = admin.get("/admin/models").json()["history"][-1]
    assert bad["result"] == "rolled_back" and "log-probs differ" in bad["reason"], bad
    assert bad["logprob_diff"] > duet_server_tolerance(duet_server)
    assert greedy(client)[1] == "base"  # the incumbent keeps serving
    assert "duet_swap_logprob_diff_nats" in admin.get("/metrics").text


def duet_server_tolerance(server) -> float:
    from duet.settings import Settings

    return float(server.env.get("DUET_SWAP_LOGPROB_TOLERANCE", Settings().swap_logprob_tolerance))


def test_announcements_are_followed_unless_paused(client, admin, duet_server, broker, other_weights):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")

    def announce(name):
        folder = duet_server.registry / name
        m = json.loads((folder / "manifest.json").read_text())
        ann = WeightsAnnouncement(version=m["version"], name=name, manifest_location=str(folder / "manifest.json"),
                                  manifest_sha256=manifest_checksum(folder))
        producer.send(WEIGHTS, value=ann.model_dump_json().encode()).get(10)

    def current():
        return admin.get("/admin/models").json()["current"]

    admin.post("/admin/models/base/activate")
    assert admin.post("/admin/updates/pause").json() == {"updates_paused": True}
    paused_name = publish(duet_server.registry, other_weights)
    held = _metric(client, "duet_weights_announcements_held_total")
    announce(paused_name)
    # the positive signal that serving saw the announcement and held it (not a wait for a swap that never came)
    wait_until(lambda: _metric(client, "duet_weights_announcements_held_total") > held, 30,
               "serving to hold the announcement while paused", 0.2)
    assert current() == "base"
    admin.post("/admin/updates/resume")
    name = publish(duet_server.registry, other_weights)
    announce(name)
    wait_until(lambda: current() == name, 30, f"{name} to go live", 0.3)
    assert current() == name and greedy(client)[1] == name
    producer.close()


def test_a_version_changing_only_linear_layers_is_served(client, admin, duet_server, tmp_path):
    """Same embeddings as the base, different linear layers: on CPU vLLM serves repacked copies of
    linear weights, so a swap that only copied parameters would leave the output unchanged."""
    base_text, version = greedy(client)
    assert version == "base"

    def edit(m):
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.mul_(-25.0)
            layer.self_attn.o_proj.weight.mul_(-25.0)

    name = publish(duet_server.registry, make_tiny_llama(tmp_path / "linear-only", seed=0, edit=edit))
    try:
        assert admin.post(f"/admin/models/{name}/activate").status_code == 200
        assert greedy(client)[0] != base_text
    finally:
        assert admin.post("/admin/models/base/activate").status_code == 200
        assert admin.post("/admin/updates/resume").status_code == 200
    assert greedy(client) == (base_text, "base")  # and back, exactly


def test_a_tied_output_layer_follows_the_embedding(client, admin, duet_server, tmp_path):
    """The tiny model ties lm_head to the input embedding. The final norm is zeroed but for dimension 0
    and two tokens get embedding ±8 there (every other token 0), so the next token is one of them — if and only if the
    logits come from the new embedding (on CPU vLLM keeps a packed copy per layer; a reload that only
    refreshed the embedding layer left the logits on the old one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(duet_server.env["DUET_MODEL"])
    loud = [tok.encode(w, add_special_tokens=False)[0] for w in (" blue", " red")]

    def edit(m):
        m.model.norm.weight.zero_()
        m.model.norm.weight[0] = 1.0
        emb = m.model.embed_tokens.weight
        emb[:, 0] = 0.0  # every other logit exactly 0: one of the two wins, by a margin the probe can still measure
        emb[loud[0], 0], emb[loud[1], 0] = 8.0, -8.0

    name = publish(duet_server.registry, make_tiny_llama(tmp_path / "loud", seed=0, edit=edit))
    try:
        assert admin.post(f"/admin/models/{name}/activate").status_code == 200
        body = client.post("/v1/chat/completions", json={"model": "duet", "messages": HELLO, "max_tokens": 1,
                                                         "temperature": 0}).json()
        assert body["duet"]["model_version"] == name
        assert body["choices"][0]["message"]["content"] in (" blue", " red", "blue", "red")
    finally:
        assert admin.post("/admin/models/base/activate").status_code == 200
        assert admin.post("/admin/updates/resume").status_code == 200


def test_vanished_weights_are_refused_and_rollback_falls_back_to_base(client, admin, duet_server, other_weights,
                                                                     tmp_path):
    """The registry prunes old versions while replicas run. A version whose files vanished after it
    was verified is refused before anything is paused (a failed in-place reload would stop vLLM for
    good), and a rollback whose target vanished goes to base."""
    assert admin.post("/admin/models/base/activate").status_code == 200
    gone = publish(duet_server.registry, other_weights)
    assert admin.post(f"/admin/models/{gone}/activate").status_code == 200
    assert admin.post("/admin/models/base/activate").status_code == 200
    for f in (duet_server.registry / gone).glob("*.safetensors"):
        f.unlink()  # the manifest stays, so the remembered verification still matches
    r = admin.post(f"/admin/models/{gone}/activate")
    assert r.status_code == 422 and "could not read the weights" in r.json()["error"]["message"], r.text
    assert greedy(client)[1] == "base"

    live = publish(duet_server.registry, other_weights)
    assert admin.post(f"/admin/models/{live}/activate").status_code == 200
    shutil.rmtree(duet_server.registry / live)  # pruned while live
    mute = publish(duet_server.registry, make_mute_llama(tmp_path / "mute"))
    assert admin.post(f"/admin/models/{mute}/activate").status_code == 409
    last = admin.get("/admin/models").json()["history"][-1]
    assert last["result"] == "rolled_back" and last["reason"].endswith("serving base"), last
    text, version = greedy(client)
    assert version == "base" and text.strip()
