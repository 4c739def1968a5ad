"""The model registry: one folder per published policy version, in the layout vLLM loads. It lives
in feedback/ because it is a contract: the trainer writes it, serving reads and verifies it.

    <root>/v000001/
        model.safetensors, config.json, generation_config.json, tokenizer files ...
        manifest.json      `Manifest`: version, parent, base model, sha256 of every other file,
                           training and eval metrics, algorithm and hyper-parameters, Kafka offsets
        adapter/           the same version as LoRA adapters on the base, in PEFT's format (adapter_config.json +
                           adapter_model.safetensors): what PEFT and vLLM's runtime LoRA load
    <root>/latest          text file holding the newest version's folder name

A version is written into a hidden temporary folder and renamed into place only when complete, so a
crash mid-publish leaves nothing visible; `latest` is replaced atomically after. Only the newest
`keep` versions are kept. The layout is flat files addressed by relative path, so it maps onto an
object store (a prefix per version, `latest` written last) without change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from feedback.contract.probes import ProbeLogprobs

MANIFEST = "manifest.json"
LATEST = "latest"
ADAPTER_DIR = "adapter"  # in each version: its adapters alone, PEFT's LoRA format


class Manifest(BaseModel):
    version: int
    name: str  # folder name, e.g. "v000003"; what serving reports as model_version
    parent_version: int | None
    base_model: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: dict[str, str]  # relative path -> sha256
    algorithm: str
    hyperparameters: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    train_metrics: dict[str, float | int | str | None] = Field(default_factory=dict)
    eval: dict[str, float | int | bool | str | None] = Field(default_factory=dict)
    kafka_offsets: dict[int, int] = Field(default_factory=dict)
    probe: ProbeLogprobs | None = None  # what serving checks after loading it (feedback/contract/probes.py)
    # the release checks it passed (trainer/release_checks.py): name, kind, passed, value, base, answer
    release_checks: list[dict[str, float | str | bool | None]] = Field(default_factory=list)


BASE_VERSION = "base"  # the name of the unmodified base model, in serving and on the dashboard


def version_name(version: int) -> str:
    return f"v{version:06d}"


def _digits(text: str) -> bool:
    """Plain ASCII digits of a plausible version number (str.isdigit() also takes "²" and 5,000 digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def version_number(name: str) -> int | None:
    """The inverse of `version_name`; None for anything else (e.g. "base")."""
    digits = name[1:] if name.startswith("v") else ""
    return int(digits) if _digits(digits) else None


def parse_version(text: str) -> str:
    """A version as people type it ("3", "v000003", "base") as its registry name; other text unchanged (it
    then names no version)."""
    return version_name(int(text)) if _digits(text) else text


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(folder: Path) -> str:
    return sha256_file(folder / MANIFEST)


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Registry:
    def __init__(self, root: Path, keep: int = 5) -> None:
        self.root = Path(root)
        self.keep = keep

    def versions(self) -> list[Manifest]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.glob("v[0-9]*")):
            if (d / MANIFEST).exists():
                out.append(Manifest.model_validate_json((d / MANIFEST).read_text()))
        return out

    def latest(self) -> Manifest | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        return self.show(pointer.read_text().strip())

    def _highest_issued(self) -> int:
        """Numbers are never reused, even when the newest folder was deleted by hand: serving replicas
        and votes name versions, so one name must always mean one set of weights. The `latest` pointer
        remembers the newest number issued."""
        pointer = self.root / LATEST
        pointed = version_number(pointer.read_text().strip()) if pointer.exists() else None
        return max([m.version for m in self.versions()] + [pointed or 0])

    def issued(self, name: str) -> bool:
        """`name` is base or a version this registry has issued (it may since have been pruned)."""
        number = version_number(name)
        return name == BASE_VERSION or (number is not None and 1 <= number <= self._highest_issued())

    def show(self, name_or_version: str | int) -> Manifest | None:
        name = version_name(name_or_version) if isinstance(name_or_version, int) else parse_version(name_or_version)
        if version_number(name) is None:  # not a version name: nothing to look for on disk
            return None
        path = self.root / name / MANIFEST
        return Manifest.model_validate_json(path.read_text()) if path.exists() else None

    def path(self, manifest: Manifest) -> Path:
        return self.root / manifest.name

    def publish(self, write_weights, *, base_model: str, algorithm: str, hyperparameters: dict,
                train_metrics: dict, eval: dict, kafka_offsets: dict[int, int],
                probe: ProbeLogprobs | None = None, parent: Manifest | None | str = "latest",
                release_checks: list[dict] = ()) -> tuple[Manifest, Path]:
        """`write_weights(folder)` saves the model and tokenizer into a folder; the registry does the rest.
        `parent`: the version this one was trained from (default the latest; None: the base model)."""
        self.root.mkdir(parents=True, exist_ok=True)
        current = self.latest() if parent == "latest" else parent
        version = self._highest_issued() + 1
        name = version_name(version)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_weights(tmp)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = Manifest(version=version, name=name, parent_version=current.version if current else None,
                                base_model=base_model, files=files, algorithm=algorithm,
                                hyperparameters=hyperparameters, train_metrics=train_metrics, eval=eval,
                                kafka_offsets=kafka_offsets, probe=probe, release_checks=list(release_checks))
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            _fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a SIGKILL leaves it instead: pruned on the next publish
            raise
        final = self.root / name
        os.replace(tmp, final)
        pointer_tmp = self.root / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.root / LATEST)
        self._prune(manifest.parent_version)
        return manifest, final

    def _prune(self, parent: int | None = None) -> None:
        """Keep the newest `keep` versions, and the new version's parent whatever its age: under canary
        tests it is users' incumbent, which may be older than several rejected candidates."""
        for m in self.versions()[:-self.keep]:
            if m.version != parent:
                shutil.rmtree(self.root / m.name, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left by a crash mid-publish
            if stale.is_dir() and not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def verify(folder: Path) -> list[str]:
    """Problems with a version folder (empty list = every file matches its manifest checksum)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return ["manifest.json missing"]
    m = Manifest.model_validate_json(path.read_text())
    problems = []
    for rel, digest in m.files.items():
        f = Path(folder) / rel
        if not f.exists():
            problems.append(f"{rel} missing")
        elif sha256_file(f) != digest:
            problems.append(f"{rel} checksum mismatch")
    return problems
