"""Admin routes of canary tests (the admin key): the running test's live statistics and history, and a
hand on it — promote, reject, pause, resume. Each is a compare-and-set on the test in Redis, so a
hand decision and the votes' decision can never both happen."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from feedback.contract.registry import parse_version
from serving.deps import CanaryDep
from serving.errors import APIError
from serving.openapi import errors

router = APIRouter(prefix="/admin/canary")

# action → (statuses it applies to, the status it sets, the reason recorded)
ACTIONS = {"promote": (("running", "paused"), "promoted", "admin"),
           "reject": (("running", "paused"), "rejected", "admin"),
           "pause": (("running",), "paused", None),
           "resume": (("paused",), "running", None)}


@router.get("")
async def canary_status(canary: CanaryDep) -> dict:
    return await canary.status()


@router.post("/{candidate}/{action}", responses=errors("409"))
async def canary_action(candidate: str, action: Literal["promote", "reject", "pause", "resume"],
                        canary: CanaryDep) -> dict:
    candidate = parse_version(candidate)
    allowed, to, reason = ACTIONS[action]
    result = await canary.store.move(candidate, allowed, to, reason)
    if result in ("none", "other"):
        raise APIError(404, f"no canary test of '{candidate}'", param="candidate", code="unknown_candidate")
    if result != "ok":
        raise APIError(409, f"cannot {action} the test of '{candidate}': it is {result}", param="action",
                       code=f"canary_{result}")
    if to in ("promoted", "rejected"):
        await canary.record_battle(await canary.store.current())
    await canary.step()  # carry it out on this replica now; the others follow within a second
    return await canary.status()
