"""``GET /openapi.json`` against a live server, with schemathesis: every route, ``/deploy`` with
a token included, answers within its documented statuses and schemas, never a 500, never a hang.

The schema is fastserve's own document, read here without a server (and checked against the
one the server serves), so that pytest can name one test per route.

Checks: no 5xx, every status documented, every answer of the documented content type, body and
headers. Not schemathesis's positive-data and negative-data checks: a body can fit the schema
and still be a 422 (the feature count is the version's, known only at run time), and one that
does not fit it can still be good (other keys are ignored).

CI runs ``EXAMPLES`` cases a route; FASTSERVE_LONG=1 (the long run) ten times as many.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fastserve.openapi import document

from conftest import RunningServer, free_port, running, serve_command, server_env, write_joblib_model
from fake_models import HoldsOn

pytestmark = pytest.mark.e2e

TOKEN = "openapi-test-token-0123"
EXAMPLES = 250 if os.environ.get("FASTSERVE_LONG") == "1" else 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

schema = schemathesis.openapi.from_dict(document())


@schemathesis.serializer("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
def _to_msgpack(_ctx: Any, value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:  # an integer MessagePack cannot hold: send bytes it never uses (a 400)
        return b"\xc1"


@schemathesis.deserializer("application/msgpack")
def _from_msgpack(_ctx: Any, response: Any) -> Any:
    return msgspec.msgpack.decode(response.content)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for every route's cases: an echo model named like the generated strings
    rarely are, with the deploy route on."""
    repo = tmp_path_factory.mktemp("openapi-repo")
    write_joblib_model(repo, "echo", "v1", HoldsOn(2))
    write_joblib_model(repo, "echo", "v2", HoldsOn(2))
    port = free_port()
    env = server_env(trusted_repository=1, admin_token=TOKEN, body_timeout_ms=2000)
    with running(serve_command(repo, port), env, port, tmp_path_factory.mktemp("openapi-run")) as server:
        yield server


def test_the_served_document_is_the_one_tested(live: RunningServer) -> None:
    served = httpx.get(live.url + "/openapi.json", timeout=5)
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == document()


def test_a_known_model_answers_its_documented_schema_too(live: RunningServer) -> None:
    # Generated path strings rarely name a real model: the happy paths, once each, before the
    # generated deployment actions move the aliases (stable is v2, the latest, at start).
    operation = schema["/predict/{model}"]["POST"]
    case = operation.Case(
        path_parameters={"model": "echo"}, body={"features": [3, 0]}, media_type="application/json"
    )
    response = case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=10)
    assert response.status_code == 200
    for path in ("/models/{model}", "/healthz", "/readyz", "/status"):
        operation = schema[path]["GET"]
        params = {"model": "echo"} if "{model}" in path else None
        response = operation.Case(path_parameters=params).call_and_validate(base_url=live.url, checks=CHECKS)
        assert response.status_code == 200
    deploy = schema["/deploy/{model}"]["POST"]
    for body in ({"action": "candidate", "version": "v1", "canary": 0.5}, {"action": "clear_candidate"}):
        case = deploy.Case(path_parameters={"model": "echo"}, body=body, media_type="application/json")
        response = case.call_and_validate(
            base_url=live.url, headers={"authorization": f"Bearer {TOKEN}"}, checks=CHECKS
        )
        assert response.status_code == 200


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_route_answers_as_documented(case: Any, live: RunningServer) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"} if case.path.startswith("/deploy") else {}
    # A hang fails here: no route may take longer than the body timeout and a predict.
    case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS, timeout=10)
