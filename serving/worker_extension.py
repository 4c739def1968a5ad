"""Code that runs inside vLLM's worker processes (engine arg `worker_extension_cls`), reached through
`collective_rpc`. It stages a new version's weights in the kernel format the live model uses — read,
renamed, repacked into a shadow copy of the model while the engine keeps serving — so the pause
only has to copy tensors into the live parameters (`reload_weights(..., is_checkpoint_format=False)`).
"""

from __future__ import annotations

import copy
import gc
import threading

SHADOW_PREFIX = "duet_shadow"


class DuetWorkerExtension:
    _duet_staged: dict | None = None
    _duet_staging: threading.Thread | None = None
    _duet_staging_error: str | None = None

    def duet_start_staging(self, path: str) -> None:
        """Stage in a thread: utility calls run in the engine's busy loop, and staging there would stall
        generation for as long as it takes. Poll `duet_staging_status`."""
        if self._duet_staging is not None and self._duet_staging.is_alive():
            raise RuntimeError("already staging")
        self._duet_staged, self._duet_staging_error = None, None

        def work() -> None:
            try:
                self.duet_stage_weights(path)
            except Exception as e:  # reported to serving, which falls back to a reload from disk
                self._duet_staging_error = f"{type(e).__name__}: {e}"

        self._duet_staging = threading.Thread(target=work, name="duet-stage", daemon=True)
        self._duet_staging.start()

    def duet_staging_status(self) -> str:
        """"running", "ready", or the error."""
        if self._duet_staging is not None and self._duet_staging.is_alive():
            return "running"
        if self._duet_staging_error:
            return self._duet_staging_error
        return "ready" if self._duet_staged else "idle"

    def duet_stage_weights(self, path: str) -> int:
        """Build the new version's kernel-format tensors off to the side; returns how many."""
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model_loader

        live = self.model_runner.vllm_config
        cfg = copy.copy(live)
        cfg.model_config = copy.copy(live.model_config)
        cfg.model_config.model = path
        cfg.model_config.model_weights = ""
        cfg.model_config.revision = None
        forward_context = live.compilation_config.static_forward_context
        before = set(forward_context)
        try:
            with set_current_vllm_config(cfg), torch.no_grad():
                # a distinct prefix: the shadow's attention layers must not collide with the live ones
                shadow = get_model_loader(cfg.load_config).load_model(cfg, cfg.model_config, prefix=SHADOW_PREFIX)
            self._duet_staged = {name: p.detach() for name, p in shadow.named_parameters()}
        finally:
            for name in set(forward_context) - before:  # the shadow registered itself: forget it
                del forward_context[name]
            gc.collect()
        return len(self._duet_staged)

    def duet_load_staged(self) -> int:
        """Copy the staged tensors into the live parameters (call while generation is paused)."""
        staged, self._duet_staged = self._duet_staged, None
        if not staged:
            raise RuntimeError("no weights staged")
        import torch

        with torch.no_grad():  # the copy into live parameters must not be recorded by autograd
            self.model_runner.reload_weights(weights_iterator=iter(staged.items()), is_checkpoint_format=False)
        return len(staged)

    def duet_drop_staged(self) -> None:
        self._duet_staged = None
