"""The trainer on several ranks under PyTorch's launcher (`torchrun --nproc-per-node N -m duet.cli train`):
data parallelism, with rank 0 the only one that talks to the world.

Rank 0 runs the trainer's loop as one process does (consumes Kafka, checkpoints, gates, publishes, announces:
one committer, so exactly-once is unchanged). The others follow it in lock step (`Lockstep`): before each unit
of training rank 0 sends an order — a reward-model step on this batch, a policy update from this state on
these prompts — and every rank computes the gradients of its share (`World.mine`), summed across ranks
(`World.all_reduce_grads`) before the same optimizer step everywhere, so the weights stay identical without
being sent. After a round rank 0 sends the policy state it kept (published, refused or held). The samples of a
round come from serving through rank 0, or each rank draws its share of the prompts.

A rank that dies makes torchrun stop the group and (with --max-restarts) start it again: every rank loads the
newest checkpoint, which covers exactly what was trained, and rank 0 seeks Kafka to its offsets.

gloo on CPUs, NCCL on GPUs; the single-process trainer is `SINGLE` (every collective a no-op).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import timedelta
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
# how long a rank waits in a collective: rank 0 sends an order at least every 10 minutes (trainer/service.py
# TICK_S), but one policy round (its gate) can take longer than the default 30 minutes on a slow CPU
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """This rank's share of n work items (round-robin: rank r takes r, r + size, ...)."""
        return list(range(self.rank, n, self.size))

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled, its tensors moved to the CPU first: a CUDA tensor would be
        unpickled onto rank 0's device; other ranks pass anything)."""
        if self.size == 1:
            return obj
        box = [to_cpu(obj)]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, to_cpu(obj))
        return out

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient across ranks (a rank whose share was empty contributes zeros): each
        rank's loss is its share of the global mean, so the sum is the one-process gradient. A parameter no rank
        has a gradient for keeps None, as in one process (AdamW then leaves it alone)."""
        if self.size == 1:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])  # one collective, not one per tensor
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g, present in zip(params, grads, flat[-len(params):].tolist()):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype) if present else None
            offset += n

    def sum(self, value: float) -> float:
        return value if self.size == 1 else float(sum(self.gather(value)))


SINGLE = World()


class LockstepBroken(RuntimeError):
    """The ranks can no longer agree on their next collective (one failed or died mid-step): rank 0 must exit, and
    torchrun restarts the group from the newest checkpoint."""


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (nested in dicts, lists, tuples) on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    return obj


def launched_rank() -> int:
    """This process's rank as torchrun launched it (0 when it was not: one process), read as `init_world` reads
    it, before the process group starts."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def interleave(shares: Sequence[Sequence[T]], n: int, size: int) -> list[T]:
    """Undo `World.mine`: the per-rank lists (rank order) back into the order of the n items."""
    out: list[Any] = [None] * n
    for rank, share in enumerate(shares):
        for i, item in zip(range(rank, n, size), share):
            out[i] = item
    return out


def init_world(device: torch.device) -> World:
    """The world torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK in the environment), its process group started
    (NCCL on CUDA, gloo otherwise); `SINGLE` when not launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():  # the others wait in a collective while rank 0 gates a round
        # torchrun keeps one store across the restarts of a group: keys of a dead group's ranks (their gloo
        # addresses) would be read as the new ones' (connection refused, and every restart spent in seconds), so
        # each attempt has its own prefix
        store, _, _ = next(torch.distributed.rendezvous("env://", rank, size, timeout=COLLECTIVE_TIMEOUT))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                                             store=torch.distributed.PrefixStore(f"duet/attempt-{attempt}", store),
                                             timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d (%s)", rank, size, torch.distributed.get_backend())
    return World(rank, size)


class Lockstep:
    """Rank 0's orders to the other ranks: `send(kind, payload)` on rank 0; `serve(handlers)` on the others runs
    `handlers[kind](payload)` for each order until rank 0 sends "stop"."""

    STOP = "stop"

    def __init__(self, world: World) -> None:
        self.world = world
        self.last_sent = time.monotonic()  # the others wait in a collective, which times out: see `idle_for`

    def send(self, kind: str, payload: Callable[[], Any] = lambda: None) -> None:
        """Rank 0: the order `kind` with `payload()` (called only when there are other ranks to tell)."""
        if self.world.size > 1 and self.world.main:
            self.world.broadcast((kind, payload()))
        self.last_sent = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last order."""
        return time.monotonic() - self.last_sent

    def serve(self, handlers: dict[str, Callable[[Any], None]]) -> None:
        assert not self.world.main, "rank 0 gives the orders"
        while True:
            kind, payload = self.world.broadcast(None)
            if kind == self.STOP:
                return
            handlers[kind](payload)
