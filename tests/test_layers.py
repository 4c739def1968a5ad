"""Duet's layers, enforced: a module may import only the layers its package is allowed (README "Layout").

    duet.settings         the configuration leaf: imports nothing of Duet
    feedback.contract     schemas, topics, Redis layout, registry manifest: imports only itself
    feedback              the vote pipeline and shared statistics: feedback only
    serving, trainer      the two sides: feedback and themselves, never each other, never duet/ (configs are
                          handed to them by duet/wiring.py)
    duet                  the CLI, the wiring and the supervisor: anything
    bench                 anything public: no private (_name) imports from Duet's packages

Every import counts, also those inside functions (they are dependencies all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("duet", "serving", "feedback", "trainer")
ALLOWED = {  # the most specific prefix of a module's name decides
    "duet.settings": (),
    "feedback.contract": ("feedback.contract",),
    "feedback": ("feedback",),
    "serving": ("serving", "feedback"),
    "trainer": ("trainer", "feedback"),
    "duet": PROJECT,
}


def imported(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in `source` (relative imports are not used in Duet)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str) -> list[str]:
    """The imports of `module` (its dotted name) that break the layers."""
    found = []
    if module.split(".")[0] == "bench":
        for line, target, names in imported(source):
            private = [n for n in names if n.startswith("_")]
            if target.split(".")[0] in PROJECT and private:
                found.append(f"{module}:{line} imports private {private} from {target}")
        return found
    layer = max((p for p in ALLOWED if _within(module, p)), key=len, default=None)
    if layer is None:
        return found
    for line, target, _ in imported(source):
        if target.split(".")[0] not in PROJECT:
            continue
        if not any(_within(target, ok) for ok in ALLOWED[layer]):
            found.append(f"{module}:{line} imports {target} (layer {layer} may import {ALLOWED[layer] or 'nothing'})")
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in (*PROJECT, "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            out.append((".".join(p for p in rel.parts if p != "__init__"), path))
    return out


def test_every_module_keeps_to_its_layer():
    broken = [v for name, path in modules() for v in violations(name, path.read_text())]
    assert not broken, "\n".join(broken)


def test_a_wrong_import_is_caught():
    """The check itself: each of these is a deliberate break of the layers."""
    assert violations("serving.chat", "from trainer.policy import PolicyTrainer")
    assert violations("trainer.rounds", "import serving.swap")
    assert violations("serving.runtime", "def f():\n    from duet.settings import Settings\n")  # inside a function too
    assert violations("feedback.contract.events", "from feedback.outbox import OUTBOX")
    assert violations("feedback.relay", "from duet.processes import stop_process")
    assert violations("duet.settings", "from duet.cpus import parse_cpus")
    assert violations("bench.trainer_round", "from duet.cli import _trainer_service")
    # and what the layers allow passes
    assert not violations("serving.chat", "from feedback.contract.comparisons import ChatMessage")
    assert not violations("duet.wiring", "from trainer.service import TrainerService\nimport serving.app")
    assert not violations("feedback.contract.events", "from feedback.contract.registry import version_name")
