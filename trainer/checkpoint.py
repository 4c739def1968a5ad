"""Trainer checkpoints: everything needed to resume exactly where a crash left off.

    <dir>/ckpt-<seq:08d>/          seq: checkpoints written so far (monotonic)
        reward_model.safetensors   backbone + head weights
        optimizer.pt               AdamW state
        state.json                 `TrainerState`: counts, Kafka offsets, event ids already seen
        replay.jsonl, heldout.jsonl  the replay buffer and the held-out set (PromptGroup per line)
        pending.jsonl              consumed votes not yet trained (so a checkpoint may be written at any time)
        policy.pt                  the policy's state: fp32 adapters, AdamW moments (absent without rounds)
        checksums.json             sha256 of every other file, written last: a checkpoint that does not match
                                   it is not loaded (the trainer falls back to the previous one)

Written into a temporary folder, fsynced, then renamed into place: a crash leaves either the old
checkpoint or the new one, never half of one. The newest `keep` are kept. What did not change since the last
checkpoint (the policy between rounds; the reward model between its steps) is hard-linked from it, not
written again: most checkpoints are a few small files.

A checkpoint damaged after it was written (a disk error, a file cut short, a hand edit) would crash every
start; `load_newest_good` verifies each against its checksums, newest first, moves one that fails aside as
`.corrupt-ckpt-…` (kept for a person to look at), counts it, and resumes from the newest good one. Pruning
never removes a checkpoint before a newer one is complete on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from dataclasses import dataclass, field

from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from feedback.contract.registry import sha256_file
from trainer.examples import PromptGroup
from trainer.metrics import CHECKPOINT_FALLBACKS
from trainer.voters import VoterScreen

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
SUMS = "checksums.json"


class TrainerState(BaseModel):
    seq: int = 0  # checkpoints written
    step: int = 0  # optimizer steps
    events_trained: int = 0  # comparison events whose pairs went into a training step
    events_held_out: int = 0
    rounds: int = 0  # policy rounds run (published or refused)
    counts: dict[str, int] = Field(default_factory=dict)  # by choice / rating
    offsets: dict[int, int] = Field(default_factory=dict)  # partition -> next offset to read
    log_epoch: int = 0  # the feedback log these offsets belong to (feedback/unconfirmed.py)
    seen_ids: list[str] = Field(default_factory=list)
    votes_since_round: int = 0  # trained votes since the last policy round
    oldest_unrounded_vote: float | None = None  # unix time of the oldest of those votes
    last_round_at: float = 0.0
    last_loss: float | None = None
    held_out_accuracy: float | None = None
    screen: VoterScreen = Field(default_factory=VoterScreen)  # per-voter agreement; quarantined voters
    events_quarantined: int = 0  # votes from quarantined voters: counted, not trained on
    idle_rm_steps: int = 0  # replay-only reward-model steps taken while idle


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Snapshot:
    """What a checkpoint holds besides the reward model's weights and optimizer."""
    state: TrainerState
    replay: list[PromptGroup] = field(default_factory=list)
    held_out: list[PromptGroup] = field(default_factory=list)
    pending: list[PromptGroup] = field(default_factory=list)
    policy: dict | None = None


def _jsonl(groups: list[PromptGroup]) -> str:
    return "".join(g.model_dump_json() + "\n" for g in groups)


REWARD_MODEL_FILES = ("reward_model.safetensors", "optimizer.pt")
POLICY_FILES = ("policy.pt",)


def _link_from(previous: Path | None, tmp: Path, names: tuple[str, ...]) -> bool:
    """Hard-link `names` from the previous checkpoint into the new one; False if any is missing."""
    if previous is None or not all((previous / n).exists() for n in names):
        return False
    for n in names:
        os.link(previous / n, tmp / n)
    return True


def save(root: Path, snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 3,
         unchanged: frozenset[str] = frozenset()) -> Path:
    """`unchanged`: "reward_model" and/or "policy" when they are as in the newest checkpoint (linked, not written)."""
    root.mkdir(parents=True, exist_ok=True)
    previous = latest(root)
    snap.state.seq += 1
    final = root / f"{PREFIX}{snap.state.seq:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if not ("reward_model" in unchanged and _link_from(previous, tmp, REWARD_MODEL_FILES)):
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  tmp / "reward_model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if snap.policy is not None and not ("policy" in unchanged and _link_from(previous, tmp, POLICY_FILES)):
        torch.save(snap.policy, tmp / "policy.pt")
    (tmp / "replay.jsonl").write_text(_jsonl(snap.replay))
    (tmp / "heldout.jsonl").write_text(_jsonl(snap.held_out))
    (tmp / "pending.jsonl").write_text(_jsonl(snap.pending))
    (tmp / "state.json").write_text(snap.state.model_dump_json())
    (tmp / SUMS).write_text(json.dumps(_checksums(tmp, previous)))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(root)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checksums(folder: Path, previous: Path | None) -> dict[str, str]:
    """sha256 of every file; a file hard-linked from `previous` keeps the sum recorded there (same inode)."""
    before = _read_sums(previous) if previous is not None else {}
    sums = {}
    for f in sorted(folder.iterdir()):
        linked = previous is not None and f.name in before and (previous / f.name).exists() and \
            os.path.samestat(f.stat(), (previous / f.name).stat())
        sums[f.name] = before[f.name] if linked else sha256_file(f)
    return sums


def _read_sums(path: Path) -> dict[str, str]:
    try:
        return json.loads((path / SUMS).read_text())
    except (OSError, ValueError):
        return {}


def verify(path: Path) -> list[str]:
    """What is wrong with a checkpoint on disk: files missing or not matching its checksums. Empty when it is
    sound (or predates checksums: then only loading it tells)."""
    if not (path / SUMS).exists():
        return []
    sums = _read_sums(path)
    if not sums:
        return [f"{SUMS} unreadable"]
    return [f"{name}: {'missing' if not (path / name).exists() else 'checksum mismatch'}"
            for name, digest in sums.items() if not (path / name).exists() or sha256_file(path / name) != digest]


def load_newest_good(root: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> tuple[Path, Snapshot] | None:
    """The newest checkpoint that verifies and loads (None: there is none). One that does not is moved aside
    and counted (`duet_trainer_checkpoint_fallbacks_total`), and the one before it is tried: a damaged newest
    checkpoint costs the votes since the previous one, which Kafka still holds, not a crash loop."""
    for path in reversed(checkpoints(root)):
        problems = verify(path)
        if not problems:
            try:
                return path, load(path, model, optimizer)
            except MemoryError:  # the machine's trouble, not the checkpoint's
                raise
            except Exception as e:
                problems = [f"{type(e).__name__}: {e}"]
        aside = root / f".corrupt-{path.name}-{int(time.time())}"
        os.replace(path, aside)
        CHECKPOINT_FALLBACKS.inc()
        log.error("checkpoint %s is damaged (%s); moved to %s, trying the one before", path.name,
                  "; ".join(problems)[:500], aside.name)
    return None


def checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.exists() else []


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def _groups(path: Path) -> list[PromptGroup]:
    return [PromptGroup.model_validate_json(line) for line in path.read_text().splitlines() if line]


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    model.load_state_dict(load_file(path / "reward_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    policy = path / "policy.pt"
    pending = path / "pending.jsonl"
    return Snapshot(state=TrainerState.model_validate_json((path / "state.json").read_text()),
                    replay=_groups(path / "replay.jsonl"), held_out=_groups(path / "heldout.jsonl"),
                    pending=_groups(pending) if pending.exists() else [],
                    policy=torch.load(policy, weights_only=True) if policy.exists() else None)


def read_state(path: Path) -> TrainerState:
    return TrainerState.model_validate_json((path / "state.json").read_text())
