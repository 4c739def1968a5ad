"""The trainer's side of rollouts (contract: feedback/contract/rollouts.py): ask serving's live vLLM engine for RLOO
samples when it serves exactly the version the trainer's state was exported as; None means "sample
locally" (serving unreachable, a different version live, a swap mid-way)."""

from __future__ import annotations

import logging
import time

import httpx
from pydantic import ValidationError

from feedback.contract.rollouts import RolloutRequest, RolloutResponse

log = logging.getLogger(__name__)

LOADING_WAIT_S = 180.0  # a candidate engine starts, loads and is probed in ~70 s on a shared core


class ServingRollouts:
    def __init__(self, url: str, admin_key: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.timeout_s = timeout_s

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
               model_version: str) -> list[list[list[int]]] | None:
        """Completion token ids, [prompt][n], drawn by `model_version`; None if serving cannot give them. A
        candidate whose engine is still loading (503 + Retry-After) is waited for up to `LOADING_WAIT_S`:
        serving samples it in seconds where the trainer's one core would take minutes."""
        req = RolloutRequest(prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                             model_version=model_version)
        deadline = time.monotonic() + LOADING_WAIT_S
        while True:
            try:
                r = httpx.post(f"{self.url}/admin/rollouts", content=req.model_dump_json(), timeout=self.timeout_s,
                               headers={**self.headers, "Content-Type": "application/json"})
            except httpx.HTTPError as e:
                log.warning("rollouts from serving failed (%s: %s): sampling locally", type(e).__name__, e)
                return None
            if r.status_code != 503 or "candidate_loading" not in r.text or time.monotonic() > deadline:
                break
            time.sleep(float(r.headers.get("Retry-After", "5")))
        if r.status_code != 200:
            log.warning("rollouts from serving refused (HTTP %d: %s): sampling locally", r.status_code, r.text[:200])
            return None
        try:
            out = RolloutResponse.model_validate_json(r.content)
        except ValidationError as e:
            log.warning("rollouts from serving unreadable (%s): sampling locally", e)
            return None
        return [[s.token_ids for s in group] for group in out.samples]
