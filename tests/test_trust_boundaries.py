"""Issue 24: what Duet trusts it now checks. A weights announcement cannot make serving load a folder outside
the registry, nor a version without probe log-probs; a vote the broker could never take is refused at the API
with the limit named; an outbox entry the broker refuses for good is dead-lettered and the relay goes on.
Real Redis (a database of its own), the session's embedded broker; no engine."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from feedback.contract.events import WeightsAnnouncement
from feedback.outbox import DEAD_VOTES, OUTBOX, VOTE_LIMIT, Outbox
from feedback.contract.registry import Registry, manifest_checksum
from feedback.relay import OutboxRelay
from serving.auth import ApiKeyRecord
from serving.errors import APIError
from serving.pairing import ComparisonStore, vote_token
from serving.swap import WeightSwapper
from serving.votes import VoteRequest, VoteService
from tests.conftest import TEST_REDIS_DB, empty_redis
from tests.kafka_helpers import read_topic
from trainer.synthetic import marker_event

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"  # its own database: the session server uses 13
TOPIC = "duet.test.dead-letters"


@pytest.fixture()
def r():
    yield from empty_redis(REDIS_URL)


def announcement(name: str, version: int = 777) -> dict:
    return {"version": version, "name": name, "manifest_location": f"{name}/manifest.json", "manifest_sha256": "0"}


@pytest.mark.parametrize("name", ["/abs/path/v000777", "../../evil/v000777", "v777", "v000778", "v000777/..",
                                  "v０００７７７"])
def test_an_announcement_must_name_its_version_in_the_registry(name):
    with pytest.raises(ValidationError, match="registry name"):
        WeightsAnnouncement.model_validate(announcement(name))
    assert WeightsAnnouncement.model_validate(announcement("v000777")).name == "v000777"


def publish_copy(registry: Path, source: Path, probe=None):
    manifest, folder = Registry(registry).publish(
        lambda d: [shutil.copy(f, d / f.name) for f in source.iterdir() if f.is_file()], base_model="tiny",
        algorithm="test", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={}, probe=probe)
    return manifest, folder


def test_the_swapper_loads_only_checked_registry_versions(tiny_model, tmp_path):
    """A copy of a version outside the registry, with a manifest that matches its announcement, is refused
    by name; a registry version without probe log-probs is refused (the post-swap check would be skipped);
    the same version with them passes every check (the control)."""
    from tests.test_swap import probe_of

    probe = probe_of(tiny_model)
    swapper = WeightSwapper(engine=None, prompts=None, base_path=str(tiny_model), registry_root=tmp_path / "registry")
    _, outside = publish_copy(tmp_path / "elsewhere" / "registry", tiny_model, probe)
    for name in (str(outside), f"../elsewhere/registry/{outside.name}"):
        problems = swapper.check_once(name, manifest_checksum(outside))
        assert problems and "not a version name" in problems[0], problems

    unprobed, _ = publish_copy(tmp_path / "registry", tiny_model)
    assert "no probe log-probs" in " ".join(swapper.check_once(unprobed.name))
    probed, _ = publish_copy(tmp_path / "registry", tiny_model, probe)
    assert swapper.check_once(probed.name) == []


_rng = random.Random(0)


def _comparison_with(chars: int):
    cmp = marker_event(_rng).comparison  # a new comparison id each time
    cmp.messages[0].content = "x" * chars
    return cmp


def test_a_vote_larger_than_the_log_takes_is_refused_with_the_limit(r):
    """The vote script refuses an event over DUET_VOTE_MAX_BYTES, or over the relay's reading of the broker
    when that is lower; the API answers 413 naming the limit; nothing enters the outbox; a smaller one passes."""
    async def go():
        ar = aioredis.from_url(REDIS_URL, decode_responses=True)
        try:
            store, secret, key = ComparisonStore(ar), "s", ApiKeyRecord(key_id="k1", name="test")
            votes = VoteService(store, Outbox(ar, max_entries=100, max_bytes=50_000), secret)

            async def vote(chars: int):
                cmp = _comparison_with(chars).model_copy(update={"key_id": key.key_id})
                await store.save(cmp)
                token = vote_token(secret, cmp.comparison_id, key.key_id, int(cmp.expires_at.timestamp()))
                return await votes.vote(VoteRequest(comparison_id=cmp.comparison_id, vote_token=token, choice="a"),
                                        key, None)

            with pytest.raises(APIError) as e:
                await vote(60_000)
            assert e.value.status == 413 and "at most 50000" in e.value.message
            assert (await vote(20_000))[0] == 202
            await ar.set(VOTE_LIMIT, 10_000)  # a broker that takes less than the setting
            with pytest.raises(APIError) as e:
                await vote(20_000)
            assert e.value.status == 413 and "at most 10000" in e.value.message
            assert await ar.xlen(OUTBOX) == 1
        finally:
            await ar.aclose()
    asyncio.run(go())


def test_an_entry_the_broker_refuses_is_dead_lettered_and_the_rest_relayed(r, broker):
    """An outbox entry over the broker's/producer's message limit used to fail on every retry and hold back
    every vote behind it. Now it moves to duet:outbox:dead with its reason and the next vote reaches Kafka."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(TOPIC, 1, 1)])  # its own: the session's feedback log is read by other tests
    admin.close()
    r.xadd(OUTBOX, {"event_id": "huge", "key": "cmp_huge", "payload": "x" * 1_200_000})
    r.xadd(OUTBOX, {"event_id": "after-huge", "key": "cmp_after", "payload": "{}"})
    relay = OutboxRelay(REDIS_URL, broker.bootstrap, topic=TOPIC, keep_s=0)
    try:
        assert relay.drain_once() == 2
    finally:
        relay.stop()
    assert r.xlen(OUTBOX) == 0
    (_, dead), = r.xrange(DEAD_VOTES)
    assert dead["event_id"] == "huge" and "MessageSizeTooLarge" in dead["reason"] and len(dead["payload"]) == 1_200_000
    records = read_topic(broker.bootstrap, TOPIC,
                         lambda recs: any(dict(x.headers)["event_id"] == b"after-huge" for x in recs), timeout_s=30)
    ids = {dict(x.headers)["event_id"] for x in records}
    assert b"after-huge" in ids and b"huge" not in ids
