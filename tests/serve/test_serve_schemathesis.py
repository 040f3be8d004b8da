"""Acceptance 5 (second half): schemathesis against ``/openapi.json`` of a live server on
loopback, bounded to about 200 generated requests; no response may be a 5xx, and every
error response carries the JSON error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from _serve_support import Server, make_tiny_model
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve-fuzz")
    model = make_tiny_model(work / "model")
    srv = Server({"MEDINFER_MODEL": str(model), "MEDINFER_JOB_STORE": str(work / "store"),
                  "MEDINFER_API_KEYS": KEY, "MEDINFER_MAX_UPLOAD_BYTES": "2000000"},
                 work / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


SEEN: list[int] = []


def test_no_server_errors(fuzz_server: Server) -> None:
    """Positive and negative generation for every operation, 10 + 10 examples each."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert len(operations) >= 10
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                headers = {"Authorization": f"Bearer {KEY}"} if len(SEEN) % 5 else {}
                response = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
                SEEN.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path,
                                                    response.status_code, response.text[:500])
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error"}
                    assert body["error"]["status"] == response.status_code

            try:
                run()
            except Unsatisfiable:
                # no negative input exists for an operation without parameters / body
                assert mode is GenerationMode.NEGATIVE, op.label


def test_fuzzing_was_bounded_and_server_is_healthy(fuzz_server: Server) -> None:
    assert 50 <= len(SEEN) <= 400, len(SEEN)
    assert httpx.get(fuzz_server.url + "/health/ready").status_code == 200
    assert fuzz_server.proc.poll() is None


def test_openapi_has_error_schema(fuzz_server: Server) -> None:
    spec = httpx.get(fuzz_server.url + "/openapi.json").json()
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
