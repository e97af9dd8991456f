"""Schemathesis against the app, in process: generated requests to every operation in
/openapi.json (positive and negative data, a bounded number of examples each) find no 5xx
and no answer the schema does not describe (status, content type, headers, body), with and
without an API key."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from bundles import make_tiny_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from imgrec.serve.app import ServeConfig, create_app

KEY = "fuzz-key"
#: A request the schema allows may still be refused: the schema can say "a binary file", not
#: "the bytes of a decodable image", so schema-valid random bytes are rightly answered 415 or
#: 422. Every other check runs: no 5xx, and status, content type, headers and body as
#: documented; negative data refused with a 4xx.
EXCLUDED = [positive_data_acceptance]
#: ...and a batch answers a bad file in its own entry of a 200 (documented): "negative" files
#: (a JSON object where the schema says binary) are bytes on the wire like any other part, so
#: the batch rightly answers them 200 with a per-file 415
BATCH_EXCLUDED = [*EXCLUDED, negative_data_rejection]
#: examples per operation and generation mode (7 operations, 2 modes, 3 runs): ~10 s
EXAMPLES = 15


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("fuzz") / "tiny")


def _fuzz(schema, headers: dict[str, str] | None = None) -> list[str]:
    """Every operation, each generation mode: the labels of the operations exercised (a
    failure raises with schemathesis's report)."""
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        excluded = BATCH_EXCLUDED if operation.label == "POST /v1/predict/batch" else EXCLUDED
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _check(operation, mode, headers, excluded)
            except Unsatisfiable:  # nothing to get wrong (GET /healthz takes no input)
                assert mode is GenerationMode.NEGATIVE, operation.label
        seen.append(operation.label)
    return seen


def _check(operation, mode, headers, excluded) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    run()


def test_the_api_keeps_its_schema(tiny):
    app = create_app(ServeConfig(model=str(tiny), max_upload_mb=1))
    seen = _fuzz(schemathesis.openapi.from_asgi("/openapi.json", app))
    assert len(seen) == 7, seen


def test_the_keyed_api_keeps_its_schema(tiny):
    app = create_app(ServeConfig(model=str(tiny), max_upload_mb=1, api_keys=[KEY]))
    auth = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth)
    assert len(_fuzz(schema, auth)) == 7
    assert len(_fuzz(schema)) == 7  # no key: the documented 401s
