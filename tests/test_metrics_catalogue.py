"""deploy/metrics.md lists exactly the duet_* metrics the code defines, with their type and labels."""

import importlib
import re
from pathlib import Path

MODULES = ["serving.metrics", "feedback.metrics", "feedback.relay_metrics", "trainer.metrics", "serving.swap",
           "duet.relay_child", "duet.supervisor"]


def code_metrics() -> dict[str, tuple[str, str]]:
    found = {}
    for name in MODULES:
        for obj in vars(importlib.import_module(name)).values():
            if hasattr(obj, "_name") and hasattr(obj, "_type") and obj._name.startswith("duet_"):
                full = obj._name + ("_total" if obj._type == "counter" else "")
                found[full] = (obj._type, ", ".join(obj._labelnames) or "—")
    return found


def catalogue() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in Path(__file__).parent.parent.joinpath("deploy/metrics.md").read_text().splitlines():
        m = re.match(r"\| `(duet_\w+)` \| (\w+) \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    return rows


def test_catalogue_matches_code():
    code, doc = code_metrics(), catalogue()
    assert len(code) > 30
    assert set(code) - set(doc) == set(), "metrics missing from deploy/metrics.md"
    assert set(doc) - set(code) == set(), "catalogued metrics the code no longer defines"
    assert {k: code[k] for k in doc} == doc


def test_names_follow_prometheus_conventions():
    for name, (kind, _) in code_metrics().items():
        assert name.startswith("duet_") and name == name.lower()
        assert (kind == "counter") == name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
