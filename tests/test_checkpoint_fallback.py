"""Issue 24: a damaged newest checkpoint no longer crash-loops the trainer. Checkpoints carry checksums; the
newest one that verifies and loads is used, a damaged one is moved aside (kept) and counted, and the next
checkpoint is written after the good one without touching it."""

from __future__ import annotations

import torch

from trainer import checkpoint
from trainer.checkpoint import Snapshot, TrainerState
from trainer.metrics import CHECKPOINT_FALLBACKS


def model_and_optimizer(value: float):
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    return model, opt


def write(root, state: TrainerState, value: float, **kw):
    model, opt = model_and_optimizer(value)
    state.step = int(value)
    return checkpoint.save(root, Snapshot(state=state), model, opt, keep=5, **kw)


def fallbacks() -> float:
    return CHECKPOINT_FALLBACKS._value.get()


def test_a_cut_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    state = TrainerState()
    for v in (1.0, 2.0, 3.0):
        write(tmp_path, state, v)
    newest = checkpoint.latest(tmp_path)
    blob = newest / "reward_model.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # as the probe did: cut in half
    assert "reward_model.safetensors: checksum mismatch" in checkpoint.verify(newest)

    before = fallbacks()
    model, opt = model_and_optimizer(0.0)
    path, snap = checkpoint.load_newest_good(tmp_path, model, opt)
    assert path.name == "ckpt-00000002" and snap.state.step == 2 and snap.state.seq == 2
    assert fallbacks() == before + 1
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000001", "ckpt-00000002"]
    (aside,) = tmp_path.glob(".corrupt-ckpt-00000003-*")  # kept for a person to look at
    assert (aside / "state.json").exists()

    # the trainer goes on from the good one: the next checkpoint is seq 3 again, the good one untouched
    nxt = write(tmp_path, snap.state, 4.0, unchanged=frozenset())
    assert nxt.name == "ckpt-00000003" and checkpoint.verify(nxt) == [] and checkpoint.verify(path) == []


def test_linked_files_keep_their_checksums_and_damage_is_found_in_any_file(tmp_path):
    state = TrainerState()
    write(tmp_path, state, 1.0)
    second = write(tmp_path, state, 1.0, unchanged=frozenset({"reward_model"}))  # linked, not rewritten
    assert (second / "reward_model.safetensors").stat().st_nlink == 2 and checkpoint.verify(second) == []
    (second / "state.json").write_text((second / "state.json").read_text().replace('"step":1', '"step":9'))
    assert checkpoint.verify(second) == ["state.json: checksum mismatch"]
    model, opt = model_and_optimizer(0.0)
    path, snap = checkpoint.load_newest_good(tmp_path, model, opt)
    assert path.name == "ckpt-00000001" and snap.state.step == 1


def test_a_checkpoint_from_before_checksums_that_fails_to_load_is_passed_over(tmp_path):
    state = TrainerState()
    write(tmp_path, state, 1.0)
    old = write(tmp_path, state, 2.0)
    (old / checkpoint.SUMS).unlink()  # as written by an earlier Duet
    (old / "optimizer.pt").write_bytes(b"not a torch file")
    model, opt = model_and_optimizer(0.0)
    path, snap = checkpoint.load_newest_good(tmp_path, model, opt)
    assert path.name == "ckpt-00000001" and torch.allclose(model.weight, torch.full_like(model.weight, 1.0),
                                                           atol=0.01)


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
    only = write(tmp_path, TrainerState(), 1.0)
    (only / "policy.pt").write_bytes(b"x")  # a file the checksums do not list
    (only / "reward_model.safetensors").unlink()
    model, opt = model_and_optimizer(0.0)
    assert checkpoint.load_newest_good(tmp_path, model, opt) is None
    assert checkpoint.checkpoints(tmp_path) == []
