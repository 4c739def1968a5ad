"""Issue 24: the trainer's backlog stays current while its main loop is busy (a round of minutes used to
show lag 0 with hundreds of votes waiting). The watcher asks the broker itself; the dashboard shows both the
lag and the votes read but not yet trained."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from kafka import KafkaProducer

from feedback import loop_status
from serving.dashboard import build_dashboard
from tests.conftest import TEST_REDIS_DB, empty_redis
from trainer import metrics
from trainer.backlog import BacklogWatcher, backlog_of

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"
TOPIC = "duet.test.backlog"


@pytest.fixture()
def r():
    yield from empty_redis(REDIS_URL)


def test_lag_is_the_ends_less_what_was_consumed():
    assert backlog_of({0: 10, 1: 5, 2: 0}, {0: 4, 1: 5}, untrained=3).model_dump(exclude={"ts"}) == \
        {"consumer_lag": 6 + 0 + 0, "votes_untrained": 3}
    assert backlog_of({0: 10}, {0: 12}, 0).consumer_lag == 0  # a position past a (new, shorter) log's end


def test_the_watcher_sees_votes_arrive_while_the_loop_consumes_nothing(r, broker):
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(TOPIC, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for i in range(7):
        producer.send(TOPIC, key=b"k", value=b"{}", partition=0).get(10)
    producer.close()
    consumed = {0: 2}  # what the busy main loop had read before its round began
    untrained = [2]
    watcher = BacklogWatcher(broker.bootstrap, TOPIC, lambda: consumed, lambda: untrained[0], r)
    try:
        first = watcher.measure()
        assert (first.consumer_lag, first.votes_untrained) == (5, 2)
        assert metrics.LAG._value.get() == 5 and metrics.UNTRAINED._value.get() == 2
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        for i in range(3):
            producer.send(TOPIC, key=b"k", value=b"{}", partition=0).get(10)
        producer.close()
        assert watcher.measure().consumer_lag == 8  # still nothing consumed: the lag grows, it does not read 0
    finally:
        watcher.stop()

    async def dashboard():
        ar = aioredis.from_url(REDIS_URL, decode_responses=True)
        try:
            return await build_dashboard(ar, "base")
        finally:
            await ar.aclose()
    d = asyncio.run(dashboard())
    assert (d.consumer_lag, d.votes_untrained) == (8, 2)
    assert r.ttl(loop_status.BACKLOG) > 0  # gone when the trainer stops refreshing it
