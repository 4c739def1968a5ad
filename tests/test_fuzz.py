"""Property-based fuzzing of every documented route (schemathesis strategies over the served OpenAPI
document, driven by hypothesis), with bodies that fit the schema and bodies that don't, under an API key
and the admin key: never a server error, and never a status the document does not list. Bounded for CI: a few dozen cases per operation and mode
against the session's tiny-model server."""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.slow

# not fuzzed: admin actions that change what every later test sees (pausing updates, swapping weights)
SKIP = re.compile(r"^/admin/(updates|models/\{version\}/activate)")


def operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if not SKIP.match(op.path)]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_a_server_error(duet_server, api_key, mode):
    ops = operations(duet_server.url)
    assert {"/v1/chat/completions", "/v1/feedback", "/admin/evaluations"} <= {op.path for op in ops}
    failures, undocumented = [], set()
    for op in ops:
        keys = (api_key, ADMIN_KEY) if op.path.startswith("/admin") else (api_key,)
        documented = set(op.definition.raw.get("responses", {}))

        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case):
            for key in keys:  # the API key meets admin routes' 403; the admin key reaches their bodies
                response = case.call(base_url=duet_server.url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=120)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))
                if str(response.status_code) not in documented:  # the document says what the API answers
                    undocumented.add((case.method, op.path, response.status_code))

        try:
            fuzz()
        except Unsatisfiable:  # no request of this mode exists for the operation (e.g. no body, no params)
            continue
    assert not failures, failures[:5]
    assert not undocumented, sorted(undocumented)
