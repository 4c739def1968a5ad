"""Code that runs inside vLLM's worker processes (engine arg `worker_extension_cls`), reached through
`collective_rpc`. It stages a new version's weights — reads every tensor into memory in a thread —
while the engine keeps serving, so the pause covers only vLLM's in-place load from that memory
(`reload_weights(weights_iterator=...)`), not the disk read.

Why not kernel format (`is_checkpoint_format=False`, a plain copy into the live parameters)? On CPU
vLLM repacks linear weights after loading and the kernels use the packed copies, not the parameters:
copying into the parameters left the served model unchanged (seen here: sampled outputs identical to
the old weights). The checkpoint-format path re-runs that processing, which is what makes it correct.

Tied weights (SmolLM2's lm_head is its input embedding): vLLM's in-place reload processes a shared
parameter once, in the layer that loads it, and leaves the other layer's processed state alone. On
CPU that state is a packed copy, so the logits kept coming from the OLD embedding after every swap
(measured: max |logit difference| 16 after doubling the embedding). `_reprocess_tied` re-runs vLLM's
own processing for those layers, on CPU only: on GPU an unquantized layer's processing is a no-op,
and a quantized one must not be processed twice.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


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
            except Exception as e:  # reported to serving, which refuses the swap before pausing anything
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
        """Read the new version's tensors into memory; returns how many."""
        from safetensors.torch import load_file

        tensors = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(str(f), device="cpu"))
        if not tensors:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        self._duet_staged = tensors
        return len(tensors)

    def duet_load_staged(self) -> float:
        """Load the staged tensors into the live model in place, with vLLM's own processing (call while
        generation is paused). Returns the seconds it took."""
        staged, self._duet_staged = self._duet_staged, None
        if not staged:
            raise RuntimeError("no weights staged")
        import torch
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        with torch.no_grad():  # in-place writes into live parameters must not be recorded by autograd
            self.model_runner.reload_weights(weights_iterator=iter(staged.items()), is_checkpoint_format=True)
            if current_platform.is_cpu():  # elsewhere processing a layer twice may not be idempotent
                _reprocess_tied(self.model_runner.get_model())
        return time.perf_counter() - t0


def _reprocess_tied(model) -> list[str]:
    """Re-run weight processing for layers whose parameter is shared with a layer that came earlier
    (the reload loads and processes a shared parameter under its first name only). Returns their names."""
    seen: set[int] = set()
    redone = []
    for name, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                continue
            method = getattr(module, "quant_method", None)
            if method is not None and name not in redone:
                method.process_weights_after_loading(module)
                redone.append(name)
    return redone
