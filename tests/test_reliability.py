"""End to end, as a hostile or unlucky client would: redirects, keep-alive after early answers,
overload, clients that leave, a predict that hangs. Each test runs a real Granian process.

The tests hold behaviour, never speed: where one compares times, it compares two events of the
same run (a 504 against the hung predict's own answer), not a clock against a figure.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import re
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from conftest import RunningServer, status_of, status_of_every_worker, write_joblib_model
from fake_models import HoldsOn

pytestmark = pytest.mark.e2e

JSON = {"content-type": "application/json"}
TOKEN = "reliability-token"
LONG = os.environ.get("FASTSERVE_LONG") == "1"
long_run = [pytest.mark.long, pytest.mark.skipif(not LONG, reason="a long run: FASTSERVE_LONG=1")]


def _hold_repo(tmp_path: Path, *models: str) -> Path:
    for model in models:
        write_joblib_model(tmp_path, model, "v1", HoldsOn(2))
    return tmp_path


def _row(first: float, hold_s: float = 0.0) -> bytes:
    return msgspec.json.encode({"features": [first, hold_s]})


def _version(server: RunningServer, model: str) -> dict[str, Any]:
    return status_of(server)["models"][model]["versions"]["v1"]  # type: ignore[no-any-return]


def _wait_for(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- no redirects ------------------------------------------------------------------------------

# Paths that Starlette's slash redirect used to answer with a 307 whose Location came from Host.
REDIRECT_BAIT = [
    ("POST", "/predict/echo/"),
    ("POST", "/predict/echo/versions/..%2f"),
    ("POST", "/predict/echo/versions/v1/"),
    ("POST", "/predict/"),
    ("POST", "/predict"),
    ("POST", "/deploy/echo/"),
    ("GET", "/status/"),
    ("GET", "/healthz/"),
    ("GET", "/readyz/"),
    ("GET", "/metrics/"),
    ("GET", "/models/echo/"),
    ("GET", "/models/echo/versions/v1/"),
    ("GET", "//status"),
    ("GET", "/predict/echo/"),
    ("GET", "/"),
    ("GET", "/%2e%2e/status"),
]


def test_no_path_is_ever_redirected_nor_answered_from_the_host_header(serve: Any, tmp_path: Path) -> None:
    server = serve(_hold_repo(tmp_path, "echo"), trusted_repository=1, admin_token=TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for method, path in REDIRECT_BAIT:
        headers = {"host": "evil.example", **JSON, "authorization": f"Bearer {TOKEN}"}
        conn.request(method, path, body=_row(1) if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        body = response.read()
        assert response.status in (404, 405), (method, path, response.status)
        assert response.getheader("location") is None, (method, path)
        raw_headers = " ".join(f"{k}: {v}" for k, v in response.getheaders())
        assert "evil.example" not in raw_headers and b"evil.example" not in body, (method, path)
        code = msgspec.json.decode(body)["error"]["code"]
        assert code in ("not_found", "method_not_allowed", "unknown_model", "unknown_version")
    conn.close()


# -- keep-alive after early answers --------------------------------------------------------------


def _early_requests(n: int, seed: int) -> list[tuple[str, str, dict[str, str], int, int]]:
    """(method, path, headers, body size, expected status) of ``n`` answers given before the
    body is read, bodies from 1 KB to 1 MB (log-uniform), and some 413s a little past 1 MiB."""
    rng = random.Random(seed)
    kinds = [
        ("POST", "/predict/nope", JSON, 404),  # unknown model
        ("POST", "/nowhere", JSON, 404),  # unknown route (Starlette)
        ("PUT", "/predict/echo", JSON, 405),  # known route, wrong method (Starlette)
        ("POST", "/predict/echo", {"content-type": "text/plain"}, 415),
        ("POST", "/predict/echo/versions/v9", JSON, 404),  # unknown version
        ("POST", "/deploy/echo", JSON, 401),  # no token (Starlette)
    ]
    requests = []
    for i in range(n):
        if i % 10 == 9:  # past max_body_bytes (1 MiB), within what is drained (4 MiB)
            size = rng.randint(1024 * 1024 + 1, 3 * 1024 * 1024)
            requests.append(("POST", "/predict/echo", JSON, size, 413))
            continue
        method, path, headers, status = rng.choice(kinds)
        size = int(round(1024 * (1024 ** rng.random())))  # 1 KB .. 1 MB, log-uniform
        requests.append((method, path, headers, size, status))
    return requests


# CI runs the 1,000 early answers (about 7 s on the 2-core dev VM); the long run 10,000.
@pytest.mark.parametrize("n", [1000, pytest.param(10_000, marks=long_run)])
def test_every_early_answer_leaves_the_keep_alive_connection_usable(
    serve: Any, tmp_path: Path, n: int
) -> None:
    server = serve(_hold_repo(tmp_path, "echo"), trusted_repository=1, admin_token=TOKEN)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    good = _row(7)
    broken: list[str] = []
    closed = 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for method, path, headers, size, status in _early_requests(n, seed):
        try:
            conn.request(method, path, body=b"x" * size, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == status, (method, path, size, response.status)
            if response.getheader("connection", "").lower() == "close":
                closed += 1  # said so: http.client opens a new connection for the next one
            # The next request on the same connection must find it usable.
            conn.request("POST", "/predict/echo", body=good, headers=JSON)
            answer = conn.getresponse()
            assert answer.status == 200 and msgspec.json.decode(answer.read())["predictions"] == [7]
        except (OSError, http.client.HTTPException) as error:
            broken.append(f"{method} {path} {size} bytes: {error!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.close()
    assert broken == [], f"seed {seed}: {len(broken)} broken connections, first {broken[:3]}"
    # Every body here is within what is drained: none needed the connection closed.
    assert closed == 0


def test_a_body_too_large_to_drain_gets_its_413_and_a_clean_close(serve: Any, tmp_path: Path) -> None:
    server = serve(_hold_repo(tmp_path, "echo"), trusted_repository=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = b"POST /predict/echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        sock.sendall(head + b"content-length: %d\r\n\r\n" % (100 * 1024 * 1024) + b"x" * 1024)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    assert re.search(rb"(?i)\r\nconnection: close\r\n", answer)


@pytest.mark.parametrize("path", ["/predict/echo", "/status"])
def test_a_body_that_stops_short_on_a_half_closed_connection_is_answered(
    serve: Any, tmp_path: Path, path: str
) -> None:
    # Found by tests/test_wire.py: the client said 28 bytes, sent 18 and closed its side; the
    # request was dropped and Granian answered 500 in its place.
    server = serve(_hold_repo(tmp_path, "echo"), trusted_repository=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        method = "POST" if path.startswith("/predict") else "GET"
        head = f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n".encode()
        sock.sendall(head + b"content-length: 28\r\n\r\n" + _row(4))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split()[1])
    assert status == (400 if method == "POST" else 200), answer
    assert re.search(rb"(?i)\r\nconnection: close\r\n", answer)


async def _keep_alive_client(port: int, n: int, body: bytes, tally: Counter[str]) -> None:
    """``n`` predicts on one keep-alive connection; reconnects only where an answer says close."""
    head = b"POST /predict/echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    request = head + b"content-length: %d\r\n\r\n" % len(body) + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            try:
                writer.write(request)
                status_line = await reader.readuntil(b"\r\n")
                headers = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", headers).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                tally[status_line.split()[1].decode()] += 1
                if re.search(rb"(?i)connection: close", headers):
                    tally["closed"] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, asyncio.IncompleteReadError) as error:
                tally[f"error {type(error).__name__}"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


def test_under_overload_every_keep_alive_request_gets_200_or_429(serve: Any, tmp_path: Path) -> None:
    server = serve(
        _hold_repo(tmp_path, "echo"),
        trusted_repository=1,
        max_queue_depth=8,
        max_batch_rows=8,
        queue_timeout_ms=30_000,
    )
    tally: Counter[str] = Counter()
    # 5 ms a batch: 64 clients keep a queue of 8 rows full. The padding (other keys are
    # ignored) makes a body that is not all in the server's buffers when a 429 is sent.
    body = msgspec.json.encode({"features": [3, 0.005], "padding": "x" * 256 * 1024})

    async def run() -> None:
        await asyncio.gather(*(_keep_alive_client(server.port, 20, body, tally) for _ in range(64)))

    asyncio.run(asyncio.wait_for(run(), 120))
    assert set(tally) <= {"200", "429"}, tally
    assert tally["200"] + tally["429"] == 64 * 20
    assert tally["429"] > 0 and tally["200"] > 0, tally


# -- clients that leave --------------------------------------------------------------------------


def _send_predict(port: int, body: bytes, model: str = "echo") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /predict/{model} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n".encode()
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, msgspec.json.decode(reader.read(length))


def _shed(server: RunningServer, model: str, reason: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf'fastserve_shed_total{{model="{model}",reason="{reason}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_requests_whose_clients_left_while_queued_are_never_predicted(serve: Any, tmp_path: Path) -> None:
    server = serve(
        _hold_repo(tmp_path, "echo"),
        trusted_repository=1,
        max_queue_depth=256,
        max_batch_rows=256,
        queue_timeout_ms=60_000,
    )
    before = _version(server, "echo")["rows"]
    # One request holds the model for 3 s; 200 queue behind it; 150 of their clients leave.
    blocker = _send_predict(server.port, _row(0, 3.0))
    _wait_for(lambda: _version(server, "echo")["predict_running_seconds"] is not None, "the blocker")
    queued = [_send_predict(server.port, _row(i + 1)) for i in range(200)]
    _wait_for(lambda: _version(server, "echo")["queue_depth_rows"] == 200, "200 queued rows")
    staying = {i: sock for i, sock in enumerate(queued) if i % 4 == 0}
    for i, sock in enumerate(queued):
        if i not in staying:
            sock.close()
    _wait_for(lambda: _version(server, "echo")["predict_running_seconds"] is None, "the blocker's end")
    assert _read_answer(blocker) == (200, {"model": "echo", "version": "v1", "predictions": [0]})
    for i, sock in staying.items():
        assert _read_answer(sock)[1]["predictions"] == [i + 1]
        sock.close()
    blocker.close()
    version = _version(server, "echo")
    assert version["rows"] - before == 1 + 50  # the blocker and the 50 that stayed, no more
    assert version["gone"] == 150 and version["queue_depth_rows"] == 0
    _wait_for(lambda: _shed(server, "echo", "client_gone") == 150, "the client_gone count")


def test_a_client_that_leaves_during_predict_only_loses_its_answer(serve: Any, tmp_path: Path) -> None:
    server = serve(_hold_repo(tmp_path, "echo"), trusted_repository=1, queue_timeout_ms=60_000)
    leaving = _send_predict(server.port, _row(5, 1.0))
    _wait_for(lambda: _version(server, "echo")["predict_running_seconds"] is not None, "the predict")
    leaving.close()
    _wait_for(lambda: _version(server, "echo")["predict_running_seconds"] is None, "the predict's end")
    version = _version(server, "echo")
    assert version["gone"] == 0 and version["errors"] == 0
    # The server goes on as before.
    response = httpx.post(server.url + "/predict/echo", content=_row(6), headers=JSON, timeout=10)
    assert response.status_code == 200 and response.json()["predictions"] == [6]


# -- a predict that hangs ------------------------------------------------------------------------


def test_requests_behind_a_hung_predict_get_504_at_their_deadline(serve: Any, tmp_path: Path) -> None:
    server = serve(
        _hold_repo(tmp_path, "echo", "other"), trusted_repository=1, queue_timeout_ms=300, max_batch_rows=1
    )
    hung = _send_predict(server.port, _row(0, 6.0))
    _wait_for(lambda: _version(server, "echo")["predict_running_seconds"] is not None, "the hung predict")
    behind = [_send_predict(server.port, _row(i + 1)) for i in range(5)]
    answers = [_read_answer(sock) for sock in behind]
    assert [(status, body["error"]["code"]) for status, body in answers] == [(504, "queue_timeout")] * 5
    # Answered while the predict still hangs, not when it returns.
    echo = _version(server, "echo")
    assert echo["predict_running_seconds"] is not None and echo["predict_overdue"] is True
    assert echo["expired"] == 5
    # The other model serves meanwhile.
    for i in range(3):
        response = httpx.post(server.url + "/predict/other", content=_row(i), headers=JSON, timeout=10)
        assert response.status_code == 200 and response.json()["predictions"] == [i]
    assert _version(server, "other")["predict_overdue"] is False
    for sock in behind:
        sock.close()
    assert _read_answer(hung)[0] == 200  # the hung predict's own answer, once it returns
    hung.close()
    assert _version(server, "echo")["predict_overdue"] is False


def test_on_two_workers_a_hung_predict_holds_no_one_past_their_deadline(serve: Any, tmp_path: Path) -> None:
    server = serve(
        _hold_repo(tmp_path, "echo", "other"),
        "--workers",
        "2",
        trusted_repository=1,
        queue_timeout_ms=300,
        max_batch_rows=1,
    )
    hung = _send_predict(server.port, _row(0, 8.0))
    _wait_for(
        lambda: any(
            status["models"]["echo"]["versions"]["v1"]["predict_running_seconds"] is not None
            for status in status_of_every_worker(server, 2).values()
        ),
        "the hung predict",
    )
    # New connections land on either worker: behind the hung predict they get their 504 at
    # their deadline, on the other worker their answer; the other model answers on both.
    behind = [_send_predict(server.port, _row(i + 1)) for i in range(10)]
    others = [_send_predict(server.port, _row(i + 1), model="other") for i in range(10)]
    outcomes = Counter()
    for sock in behind:
        status, body = _read_answer(sock)
        outcomes[status] += 1
        assert status == 200 or body["error"]["code"] == "queue_timeout"
        sock.close()
    assert set(outcomes) <= {200, 504}
    for i, sock in enumerate(others):
        assert _read_answer(sock) == (200, {"model": "other", "version": "v1", "predictions": [i + 1]})
        sock.close()
    statuses = status_of_every_worker(server, 2).values()
    overdue = [status["models"]["echo"]["versions"]["v1"]["predict_overdue"] for status in statuses]
    assert sorted(overdue) == [False, True]  # answered while the predict still hangs
    expired = sum(status["models"]["echo"]["versions"]["v1"]["expired"] for status in statuses)
    assert expired == outcomes[504]
    hung.close()
