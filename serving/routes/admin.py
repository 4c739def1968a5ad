"""Admin routes (the admin key): model versions and swaps, update pause/resume, outside judges' verdicts,
and rollouts for the trainer."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from feedback import loop_status
from feedback.canary import USERS_JUDGE
from feedback.contract.registry import Registry, parse_version
from feedback.contract.rollouts import RolloutRequest, RolloutResponse
from serving.deps import AdminDep, EngineDep, RuntimeDep, SwapperDep
from serving.engine import BASE_VERSION
from serving.errors import APIError
from serving.openapi import errors
from serving.rollouts import rollouts

router = APIRouter(prefix="/admin")


@router.get("/models")
async def admin_models(swapper: SwapperDep, rt: RuntimeDep) -> dict:
    out = {**swapper.status(), "versions": [m.model_dump(mode="json", include={"version", "name", "parent_version",
                                                                                 "created_at", "eval"})
                                            for m in swapper.registry.versions()]}
    if rt.canary is not None:  # what this replica holds for the canary test (it serves the incumbent regardless)
        c = rt.canary
        out["canary"] = {"candidate": c.test.candidate if c.test else None, "status": c.test.status if c.test else None,
                         "candidate_loaded": c.loaded_version(),
                         "load_error": c.load_error}
    return out


@router.post("/models/{version}/activate", responses=errors("409", "422"))
async def admin_activate(version: str, swapper: SwapperDep) -> JSONResponse:
    version = parse_version(version)
    if version != BASE_VERSION and swapper.registry.show(version) is None:
        raise APIError(404, f"no version '{version}' in the registry", param="version", code="unknown_version")
    rec = await swapper.activate(version)
    status = 200 if rec.result == "ok" else (409 if rec.result == "rolled_back" else 422)
    if status != 200:
        raise APIError(status, f"{version} not activated ({rec.result}): {rec.reason}", param="version",
                       code=f"swap_{rec.result}")
    return JSONResponse({"current": swapper.engine.model_version, "swap": asdict(rec)})


@router.post("/updates/{action}")
async def admin_updates(action: str, swapper: SwapperDep) -> dict:
    if action not in ("pause", "resume"):
        raise APIError(404, f"unknown action '{action}': use pause or resume", param="action")
    swapper.paused = action == "pause"
    return {"updates_paused": swapper.paused}


@router.post("/evaluations", status_code=201)
async def admin_evaluation(_: AdminDep, battle: loop_status.Battle, rt: RuntimeDep) -> loop_status.Battle:
    """Verdicts between two versions from an outside judge (raters, `duet simulate`): on the leaderboard.
    The key is checked (a dependency) before the body is validated."""
    if battle.judge == USERS_JUDGE:
        raise APIError(400, f"the judge name '{USERS_JUDGE}' is reserved for users' votes in canary tests",
                       param="judge", code="reserved_judge")
    if battle.model_a == battle.model_b:
        raise APIError(400, "model_a and model_b are the same version: a battle needs two", param="model_b",
                       code="invalid_value")
    if battle.wins + battle.ties + battle.losses == 0:
        raise APIError(400, "wins, ties and losses are all 0: no verdict to record", param="wins",
                       code="invalid_value")
    registry = Registry(rt.cfg.registry_root)
    for field in ("model_a", "model_b"):  # names on the leaderboard must be versions that exist(ed)
        if not registry.issued(name := getattr(battle, field)):
            raise APIError(400, f"{field}: '{name}' is neither base nor a version the registry has published",
                           param=field, code="unknown_version")
    await loop_status.arecord(rt.redis, loop_status.BATTLES, battle)
    return battle


@router.post("/rollouts", responses=errors("409", "499"))
async def admin_rollouts(_: AdminDep, body: RolloutRequest, engine: EngineDep, rt: RuntimeDep,
                         request: Request) -> RolloutResponse:
    """The live engine samples for the trainer's policy rounds (token ids in, token ids out) — or the canary's
    candidate engine, when the trainer asks for the candidate users are judging (it goes on from that one).
    The key is checked (a dependency) before the body is validated."""
    if rt.canary is not None and (candidate := rt.canary.candidate_engine(body.model_version)) is not None:
        engine = candidate
    elif rt.canary is not None and rt.canary.loading(body.model_version):  # soon: worth waiting for
        raise APIError(503, f"{body.model_version} is under test and its engine is still loading; retry shortly",
                       param="model_version", code="candidate_loading", headers={"Retry-After": "5"})
    return await rollouts(engine, body, request.is_disconnected)
