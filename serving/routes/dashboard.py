"""The chat and dashboard pages, and the data behind the dashboard and the leaderboard."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from feedback.canary import CanaryConfig
from serving.dashboard import Dashboard, Leaderboard, build_dashboard, build_leaderboard
from serving.deps import ApiKeyDep, RuntimeDep

STATIC = Path(__file__).parent.parent / "static"  # the chat and dashboard pages; no CDN: they work offline

router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "chat.html")


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/v1/dashboard")
async def dashboard(_: ApiKeyDep, rt: RuntimeDep, hours: float = Query(24.0, gt=0, le=24 * 30)) -> Dashboard:
    return await build_dashboard(rt.redis, rt.engine.model_version if rt.engine else None, hours, _canary(rt))


@router.get("/v1/leaderboard")
async def leaderboard(_: ApiKeyDep, rt: RuntimeDep, judge: str | None = Query(None, max_length=64)) -> Leaderboard:
    """Bradley–Terry scores per judge — users' cross-version votes (with a length-controlled score), the
    trainer's gate, outside judges — never mixed; `judge` keeps one."""
    return await build_leaderboard(rt.redis, judge, _canary(rt))


def _canary(rt) -> CanaryConfig | None:
    return rt.cfg.canary
