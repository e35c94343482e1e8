"""End to end: real ``fastserve serve`` processes on Granian, driven over loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_digits

from fastserve.repository import TRUSTED_TYPES

from conftest import RunningServer, assert_error, status_of, write_joblib_model
from fake_models import BreaksOnNegative, FailOnNegative, SleepyModel
from http_load import post_many

pytestmark = pytest.mark.e2e

JSON = {"content-type": "application/json"}
MSGPACK = {"content-type": "application/msgpack"}


async def _post_all(
    url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str], timeout_s: float = 30.0
) -> list[httpx.Response]:
    """POST every body with at most ``concurrency`` in flight; every call must get an answer."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: bytes) -> httpx.Response:
            async with gate:
                return await client.post(url, content=body, headers=headers)

        return await asyncio.gather(*(one(body) for body in bodies))


def post_all(
    url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str] = JSON
) -> list[httpx.Response]:
    return asyncio.run(_post_all(url, bodies, concurrency, headers))


def status_of_when_up(server: RunningServer) -> dict[str, Any]:
    """/status once the process answers at all (it may still be loading)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return status_of(server)
        except httpx.HTTPError:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    return load_digits(return_X_y=True)  # type: ignore[no-any-return]


# -- the demo models under concurrent load ---------------------------------------------------


def test_concurrent_requests_each_get_their_own_rows_predicted(
    serve: Any, demo_repo: Path, digits: tuple[np.ndarray[Any, Any], Any]
) -> None:
    x, _ = digits
    rng = np.random.default_rng(7)
    # 2,000 distinct requests: digits rows with noise, some of them several rows long.
    requests = []
    for i in range(2000):
        n_rows = 1 if i % 5 else int(rng.integers(2, 6))
        rows = x[rng.integers(0, len(x), n_rows)] + rng.normal(0, 2.0, (n_rows, x.shape[1]))
        requests.append(rows)
    bodies = [
        msgspec.json.encode({"features": r[0].tolist()} if len(r) == 1 else {"instances": r.tolist()})
        for r in requests
    ]
    server = serve(demo_repo)
    responses = asyncio.run(post_many("127.0.0.1", server.port, "/predict/digits", bodies, concurrency=64))

    offline = sio.load(demo_repo / "digits" / "v1" / "model.skops", trusted=list(TRUSTED_TYPES))
    expected = offline.predict(np.concatenate(requests)).tolist()
    answered = []
    for response in responses:
        assert response.status == 200, response.body
        assert response.headers["x-model-version"] == "v1"
        body = msgspec.json.decode(response.body)
        assert body["model"] == "digits" and body["version"] == "v1"
        answered.extend(body["predictions"])
    assert answered == expected  # each request got the predictions of its own rows, in order

    status = status_of(server)
    # The server ran the queue this suite is testing: compiled, unless the run asked otherwise;
    # and RF-300 was answered by the compiled trees (equal to sklearn's predict, as checked above).
    no_extensions = os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1"
    assert status["queue_implementation"] == ("python" if no_extensions else "compiled")
    v1 = status["models"]["digits"]["versions"]["v1"]
    assert v1["predict"] == ("scikit-learn" if no_extensions else "compiled")
    # v2, the gradient boosting, is compiled too (tests/test_trees.py checks its answers).
    assert status["models"]["digits"]["versions"]["v2"]["predict"] == v1["predict"]
    # The libraries and models loaded at start-up are out of the collector's walks (p99).
    assert status["gc_frozen_objects"] > 10_000, status["gc_frozen_objects"]
    assert v1["requests"] == len(requests)
    assert v1["mean_batch_rows"] > 8, v1


def test_msgpack_forms_and_content_negotiation(serve: Any, demo_repo: Path, digits: Any) -> None:
    x, _ = digits
    server = serve(demo_repo)
    url = server.url + "/predict/digits/versions/v2"
    rows = x[:5]
    expected = httpx.post(url, json={"instances": rows.tolist()}).json()["predictions"]

    binary = msgspec.msgpack.encode({"instances": rows.astype("<f8").tobytes(), "shape": list(rows.shape)})
    response = httpx.post(url, content=binary, headers=MSGPACK)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/msgpack"
    assert response.headers["x-model-version"] == "v2"
    assert msgspec.msgpack.decode(response.content) == {
        "model": "digits",
        "version": "v2",
        "predictions": expected,
    }

    listed = msgspec.msgpack.encode({"instances": rows.tolist()})
    response = httpx.post(url, content=listed, headers={**MSGPACK, "accept": "application/json"})
    assert response.headers["content-type"] == "application/json"
    assert response.json()["predictions"] == expected

    response = httpx.post(
        url,
        content=msgspec.json.encode({"features": rows[0].tolist()}),
        headers={**JSON, "accept": "application/msgpack"},
    )
    assert msgspec.msgpack.decode(response.content)["predictions"] == expected[:1]

    response = httpx.post(url, json={"features": rows[0].tolist()}, headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    for unsafe in ("a b", "x" * 129, "tab\there"):
        response = httpx.post(url, json={"features": rows[0].tolist()}, headers={"x-request-id": unsafe})
        assert response.status_code == 200 and response.headers["x-request-id"] != unsafe
    generated = {
        httpx.post(url, json={"features": rows[0].tolist()}).headers["x-request-id"] for _ in range(3)
    }
    assert len(generated) == 3

    # Paths that are not a predict route, and methods predict does not take.
    assert_error(httpx.get(server.url + "/predict/digits"), 405, "method_not_allowed")
    for path in ("/predict/", "/predict/digits/v2", "/predict/digits/versions/v2/x", "/nowhere"):
        assert_error(httpx.post(server.url + path, json={"features": rows[0].tolist()}), 404, "not_found")


def test_bad_input_is_refused_while_good_requests_succeed(serve: Any, demo_repo: Path, digits: Any) -> None:
    x, _ = digits
    server = serve(demo_repo, max_body_bytes=64 * 1024, max_rows_per_request=100)
    url = server.url + "/predict/digits"
    row = x[0].tolist()
    bad: list[tuple[bytes, dict[str, str], int, str]] = [
        (b'{"features": [1, 2', JSON, 400, "malformed_body"),
        (b"\xc1\xff", MSGPACK, 400, "malformed_body"),
        (b'{"features": ["a"]}', JSON, 400, "malformed_body"),
        (b'{"rows": []}', JSON, 400, "malformed_body"),
        (b'{"instances": []}', JSON, 400, "malformed_body"),
        (msgspec.json.encode({"features": row[:10]}), JSON, 422, "bad_features"),
        (msgspec.json.encode({"instances": [row, row[:-1]]}), JSON, 422, "bad_features"),
        (msgspec.msgpack.encode({"features": [float("nan"), *row[1:]]}), MSGPACK, 422, "bad_features"),
        (
            msgspec.msgpack.encode({"instances": [row, [float("inf"), *row[1:]]]}),
            MSGPACK,
            422,
            "bad_features",
        ),
        (b'{"features": [1e999]}', JSON, 422, "bad_features"),
        (msgspec.json.encode({"instances": [row] * 101}), JSON, 413, "too_many_rows"),
        (b"[" + b"1," * 40_000 + b"1]", JSON, 413, "body_too_large"),
        (b'{"features": []}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (b"\x80\x04K\x01.", {"content-type": "application/python-pickle"}, 415, "unsupported_media_type"),
    ]

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        good_bodies = [msgspec.json.encode({"features": r.tolist()}) for r in x[:600]]
        good = asyncio.create_task(_post_all(url, good_bodies, 16, JSON))
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=30) as client:
            refused = [await client.post(url, content=body, headers=headers) for body, headers, *_ in bad]
            refused.append(await client.post(server.url + "/predict/nope", json={"features": row}))
            refused.append(
                await client.post(server.url + "/predict/digits/versions/v9", json={"features": row})
            )
        return await good, refused

    good, refused = asyncio.run(scenario())
    for (_, _, status, code), response in zip(bad, refused, strict=False):
        assert_error(response, status, code)
    assert_error(refused[-2], 404, "unknown_model")
    assert_error(refused[-1], 404, "unknown_version")
    assert [r.status_code for r in good] == [200] * len(good)
    offline = sio.load(demo_repo / "digits" / "v1" / "model.skops", trusted=list(TRUSTED_TYPES))
    assert [r.json()["predictions"][0] for r in good] == offline.predict(x[:600]).tolist()
    # The refused requests never reached a batch.
    assert status_of(server)["models"]["digits"]["versions"]["v1"]["requests"] == len(good)


def _raw_exchange(port: int, data: bytes, timeout_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_body_limits_are_enforced_while_streaming(serve: Any, demo_repo: Path) -> None:
    server = serve(demo_repo, max_body_bytes=1000, body_timeout_ms=300)
    port = int(server.url.rsplit(":", 1)[1])
    head = b"POST /predict/digits HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    # Declared too large: refused on the header, before any body is read.
    answer = _raw_exchange(port, head + b"content-length: 5000\r\n\r\n", 5)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # Chunked with no length: refused once the chunks pass the limit.
    chunk = b"a" * 600
    chunked = head + b"transfer-encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
    answer = _raw_exchange(port, chunked, 5)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # A body that stops arriving: 408 after the body timeout, not a hang.
    for partial in (b'content-length: 100\r\n\r\n{"features": [1,', b"content-length: 100\r\n\r\n"):
        started = time.monotonic()
        answer = _raw_exchange(port, head + partial, 5)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        assert time.monotonic() - started < 2


# -- fake models: overload, deadlines, failures, readiness ------------------------------------


def test_burst_past_queue_depth_gets_200_or_429_and_none_is_lost(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "slow", "v1", SleepyModel(4, delay_s=0.02))
    server = serve(
        tmp_path, trusted_repository=1, max_queue_depth=32, max_batch_rows=8, queue_timeout_ms=30_000
    )
    bodies = [msgspec.json.encode({"features": [i, 0, 0, 0]}) for i in range(2000)]
    started = time.monotonic()
    responses = asyncio.run(post_many("127.0.0.1", server.port, "/predict/slow", bodies, concurrency=256))
    assert time.monotonic() - started < 30
    codes = Counter(r.status for r in responses)
    assert set(codes) == {200, 429}, codes
    assert codes[429] > 0 and codes[200] >= 32
    for body, response in zip(bodies, responses, strict=True):
        answer = msgspec.json.decode(response.body)
        if response.status == 200:
            assert answer["predictions"] == [msgspec.json.decode(body)["features"][0]]
        else:
            assert answer["error"]["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
    slow = status_of(server)["models"]["slow"]["versions"]["v1"]
    assert slow["requests"] == codes[200] and slow["shed"] == codes[429]


def test_a_full_queue_refuses_at_once_in_the_format_asked_with_the_request_id(
    serve: Any, tmp_path: Path
) -> None:
    write_joblib_model(tmp_path, "slow", "v1", SleepyModel(4, delay_s=1.0))
    server = serve(
        tmp_path, trusted_repository=1, max_queue_depth=1, max_batch_rows=1, queue_timeout_ms=30_000
    )
    url = server.url + "/predict/slow"
    row = msgspec.json.encode({"features": [7, 0, 0, 0]})

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=30) as client:
            # One row in predict for a second, one waiting: the queue of one row is full.
            admitted = [asyncio.create_task(client.post(url, content=row, headers=JSON)) for _ in range(2)]
            await asyncio.sleep(0.3)
            refused = [
                await client.post(url, content=row, headers={**JSON, "x-request-id": "trace-429"}),
                await client.post(
                    url, content=row, headers={**JSON, "accept": "application/msgpack", "x-request-id": "t2"}
                ),
            ]
            return await asyncio.gather(*admitted), refused

    admitted, (as_json, as_msgpack) = asyncio.run(scenario())
    assert [r.status_code for r in admitted] == [200, 200]
    for response, request_id in ((as_json, "trace-429"), (as_msgpack, "t2")):
        assert_error(response, 429, "queue_full")
        assert response.headers["x-request-id"] == request_id
        assert int(response.headers["retry-after"]) >= 1
        assert response.elapsed.total_seconds() < 0.5  # refused at once, not after the predict
    assert as_json.headers["content-type"] == "application/json"
    assert as_msgpack.headers["content-type"] == "application/msgpack"
    slow = status_of(server)["models"]["slow"]["versions"]["v1"]
    assert slow["shed"] == 2 and slow["requests"] == 2


def test_requests_past_the_queue_deadline_get_504(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "slow", "v1", SleepyModel(4, delay_s=0.3))
    server = serve(tmp_path, trusted_repository=1, max_batch_rows=1, queue_timeout_ms=100)
    bodies = [msgspec.json.encode({"features": [i, 0, 0, 0]}) for i in range(6)]
    responses = post_all(server.url + "/predict/slow", bodies, concurrency=6)
    codes = Counter(r.status_code for r in responses)
    assert codes[200] >= 1 and codes[504] >= 1 and codes[200] + codes[504] == 6, codes
    for response in responses:
        if response.status_code == 504:
            assert_error(response, 504, "queue_timeout")
    assert status_of(server)["models"]["slow"]["versions"]["v1"]["expired"] == codes[504]


def test_a_request_the_model_raises_on_gets_422_and_the_server_goes_on(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "fragile", "v1", FailOnNegative(2))
    server = serve(tmp_path, trusted_repository=1)
    url = server.url + "/predict/fragile"
    response = httpx.post(url, json={"features": [-1, 0]})
    # Alone in its batch, but the model still predicts its warm-up rows: the input is at fault.
    assert_error(response, 422, "model_rejected_input")
    assert "RuntimeError: negative input" in response.json()["error"]["message"]
    response = httpx.post(url, json={"instances": [[3, 0], [4, 0]]})
    assert response.status_code == 200 and response.json()["predictions"] == [3, 4]


def test_a_model_that_breaks_answers_500_and_the_other_models_go_on(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "fragile", "v1", BreaksOnNegative(2))
    write_joblib_model(tmp_path, "steady", "v1", FailOnNegative(2))
    server = serve(tmp_path, trusted_repository=1, predict_process="off")
    for body in ({"features": [-1, 0]}, {"features": [3, 0]}):  # broken by the first, for good
        response = httpx.post(server.url + "/predict/fragile", json=body)
        assert_error(response, 500, "model_error")
        assert "broken" not in response.text  # the model's own message stays in the log
    response = httpx.post(server.url + "/predict/steady", json={"features": [5, 0]})
    assert response.status_code == 200 and response.json()["predictions"] == [5]


def test_readiness_waits_for_warm_up_and_liveness_does_not(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "late", "v1", SleepyModel(2, delay_s=0.0, warmup_delay_s=2.0))
    server = serve(tmp_path, trusted_repository=1, wait_ready=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    ready = httpx.get(server.url + "/readyz")
    assert_error(ready, 503, "not_ready")
    assert_error(httpx.post(server.url + "/predict/late", json={"features": [1, 2]}), 503, "not_ready")
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.post(server.url + "/predict/late", json={"features": [1, 2]}).json()["predictions"] == [1]


def test_versions_that_fail_to_load_are_reported_and_not_served(
    serve: Any, tmp_path: Path, demo_repo: Path
) -> None:
    write_joblib_model(tmp_path, "m", "v1", FailOnNegative(2), toml='stable = "v1"\n')
    (tmp_path / "m" / "v2").mkdir()
    (tmp_path / "m" / "v2" / "model.skops").write_bytes(b"not a zip file")
    (tmp_path / "m" / "v3").mkdir()
    (tmp_path / "m" / "v3" / "model.skops").symlink_to(demo_repo / "digits" / "v2" / "model.skops")
    server = serve(tmp_path, trusted_repository=1)
    versions = status_of(server)["models"]["m"]["versions"]
    assert versions["v1"]["state"] == "serving"
    assert versions["v2"]["state"] == "failed" and versions["v3"]["state"] == "failed"
    assert "outside the repository" in versions["v3"]["reason"]
    assert str(tmp_path) not in str(versions)
    assert_error(
        httpx.post(server.url + "/predict/m/versions/v2", json={"features": [1, 2]}), 404, "unknown_version"
    )
    assert httpx.post(server.url + "/predict/m", json={"features": [1, 2]}).status_code == 200


def test_a_model_without_a_servable_stable_keeps_the_server_unready_but_not_the_others(
    serve: Any, tmp_path: Path
) -> None:
    write_joblib_model(tmp_path, "good", "v1", FailOnNegative(2))
    write_joblib_model(tmp_path, "broken", "v1", FailOnNegative(2), toml='stable = "v2"\n')
    (tmp_path / "broken" / "v2").mkdir()
    (tmp_path / "broken" / "v2" / "model.skops").write_bytes(b"not a zip file")
    server = serve(tmp_path, trusted_repository=1, wait_ready=False)
    deadline = time.monotonic() + 60
    while status_of_when_up(server)["phase"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ready = httpx.get(server.url + "/readyz")
    assert_error(ready, 503, "not_ready")
    assert "broken" in ready.json()["error"]["message"]
    row = {"features": [1, 2]}
    assert_error(httpx.post(server.url + "/predict/broken", json=row), 503, "not_ready")
    assert httpx.post(server.url + "/predict/broken/versions/v1", json=row).status_code == 200
    assert httpx.post(server.url + "/predict/good", json=row).json()["predictions"] == [1]


def test_shutdown_answers_every_admitted_request(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "slow", "v1", SleepyModel(4, delay_s=0.2))
    server = serve(tmp_path, trusted_repository=1, max_batch_rows=4)
    bodies = [msgspec.json.encode({"features": [i, 0, 0, 0]}) for i in range(16)]

    async def scenario() -> list[httpx.Response | BaseException]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = server.url + "/predict/slow"
            pending = [asyncio.create_task(client.post(url, content=b, headers=JSON)) for b in bodies]
            await asyncio.sleep(0.3)  # all 16 admitted; the first batch is in predict
            os.killpg(server.process.pid, signal.SIGTERM)
            return await asyncio.gather(*pending, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    # Four batches of 0.2 s were queued when the stop came: each admitted request still
    # gets its own answer, none an error. (Granian lets in-flight requests finish before
    # the lifespan's shutdown, which then finds the queues empty.)
    assert all(isinstance(o, httpx.Response) for o in outcomes), outcomes
    answered = [o for o in outcomes if isinstance(o, httpx.Response)]
    assert [r.status_code for r in answered] == [200] * len(bodies)
    assert [r.json()["predictions"][0] for r in answered] == list(range(16))
    assert server.process.wait(timeout=20) == 0
