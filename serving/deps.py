"""The routes' dependencies, as `Annotated[..., Depends()]` aliases (the full-stack FastAPI template's way):
the runtime, the caller's API key (checked and rate-limited), the admin key, the chat service and the
weight swapper once the engine has loaded. A route declares what it needs; the key is checked before
any declared body is validated."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.auth import ApiKeyRecord
from serving.canary import CanaryRunner
from serving.chat import ChatService
from serving.engine import Engine
from serving.errors import APIError
from serving.runtime import Runtime
from serving.swap import WeightSwapper


def get_runtime(request: Request) -> Runtime:
    return request.app.state.rt


async def api_key(request: Request) -> ApiKeyRecord:
    """The caller's key, checked and counted against its rate limit."""
    rt = get_runtime(request)
    key = await rt.keys.authenticate(request.headers.get("authorization"))
    await rt.limiter.check(key.key_id, key.rate_limit_rpm)
    return key


async def admin_key(key: Annotated[ApiKeyRecord, Depends(api_key)]) -> ApiKeyRecord:
    if not key.admin:
        raise APIError(403, "This route needs the admin key.", code="admin_only")
    return key


def _not_ready(why: str) -> APIError:
    return APIError(503, f"Not ready: {why}. Retry shortly.", code="engine_not_ready", headers={"Retry-After": "5"})


def chat_service(rt: Annotated[Runtime, Depends(get_runtime)]) -> ChatService:
    if rt.chat is None:
        raise _not_ready(f"the engine failed to load: {rt.engine_error}" if rt.engine_error else "the engine is loading")
    return rt.chat


def engine(rt: Annotated[Runtime, Depends(get_runtime)]) -> Engine:
    if rt.engine is None:
        raise _not_ready("the engine is loading")
    return rt.engine


async def swapper(_: Annotated[ApiKeyRecord, Depends(admin_key)],
                  rt: Annotated[Runtime, Depends(get_runtime)]) -> WeightSwapper:
    """The weight swapper, for admin routes (the admin key is checked first)."""
    if rt.swapper is None:
        raise _not_ready("the engine is loading")
    return rt.swapper


async def canary(_: Annotated[ApiKeyRecord, Depends(admin_key)],
                 rt: Annotated[Runtime, Depends(get_runtime)]) -> CanaryRunner:
    """The canary runner, for admin routes (the admin key is checked first)."""
    if rt.cfg.canary is None:
        raise APIError(409, "canary tests are off (DUET_CANARY=off): published versions go live when the "
                            "trainer's gate passes them", code="canary_off")
    if rt.canary is None:
        raise _not_ready("the engine is loading")
    return rt.canary


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ApiKeyDep = Annotated[ApiKeyRecord, Depends(api_key)]
AdminDep = Annotated[ApiKeyRecord, Depends(admin_key)]
ChatDep = Annotated[ChatService, Depends(chat_service)]
EngineDep = Annotated[Engine, Depends(engine)]
SwapperDep = Annotated[WeightSwapper, Depends(swapper)]
CanaryDep = Annotated[CanaryRunner, Depends(canary)]
