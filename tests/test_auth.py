"""API keys against a real Redis (its own database): keys from the settings survive Redis losing
everything; any bytes in a header are a 401, never a crash."""

import asyncio

import pytest
import redis.asyncio as aioredis

from serving.auth import KeyStore
from serving.errors import APIError

AUTH_REDIS = "redis://127.0.0.1:6379/14"  # not the session server's database


def test_settings_keys_survive_an_empty_redis_and_odd_bytes_are_401():
    async def go():
        r = aioredis.from_url(AUTH_REDIS)
        try:
            store = KeyStore(r, admin_key="adm", dev_key="duet-dev-abc")
            key, record = await store.create("team")
            assert (await store.authenticate(f"Bearer {key}")).key_id == record.key_id
            await r.flushdb()  # Redis restarted with nothing on disk
            store._cache.clear()
            dev = await store.authenticate("Bearer duet-dev-abc")
            assert dev.name == "dev" and not dev.admin
            assert (await store.authenticate("Bearer adm")).admin
            for bad in (f"Bearer {key}", "Bearer \xe9t\xe9", "Bearer duet-dev-ab"):
                with pytest.raises(APIError) as e:
                    await store.authenticate(bad)
                assert e.value.status == 401
        finally:
            await r.flushdb()
            await r.aclose()

    asyncio.run(go())
