"""Fuzzing the wire: hypothesis writes raw HTTP/1.1 requests, well framed or not, with odd
methods, targets, headers, lengths, chunking and bodies, to one live server, while a client
beside them sends good predictions on a keep-alive connection.

What must hold: the server never dies and never answers 5xx; every well-framed request gets an
answer (a malformed one may get a 400 or a closed connection instead); every good prediction
alongside succeeds. CI runs ``EXAMPLES`` requests (derandomized); FASTSERVE_LONG=1 ten times as
many. No speed is asserted: the timeouts only keep a hang from holding the suite.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RunningServer, free_port, running, serve_command, server_env, write_joblib_model
from fake_models import HoldsOn

pytestmark = pytest.mark.e2e

EXAMPLES = 5000 if os.environ.get("FASTSERVE_LONG") == "1" else 500
TOKEN = "wire-fuzz-token-0123"
GOOD = msgspec.json.encode({"features": [4, 0]})

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW", "post"]
TARGETS = [
    "/predict/echo",
    "/predict/echo/versions/v1",
    "/predict/echo/versions/v9",
    "/predict/nope",
    "/predict/echo/",
    "/deploy/echo",
    "/status",
    "/healthz",
    "/readyz",
    "/metrics",
    "/models/echo",
    "/openapi.json",
    "/predict/echo?x=1&x=2",
    "/predict/%65cho",
    "/predict/..%2f..%2fetc",
    "/" + "a" * 3000,
    "*",
]
CONTENT_TYPES = [
    "application/json",
    "application/msgpack",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
    "application/json\x01",
    "multipart/form-data; boundary=x",
]
BODIES = [
    GOOD,
    b"",
    b"{",
    b'{"features": [1, 2, 3]}',
    b'{"features": ["a", null]}',
    b'{"instances": [[1, 0], [2]]}',
    b'{"features": [1e400, 0]}',
    b'{"instances": "AAAA", "shape": [1, 2]}',
    b'{"action": "promote"}',
    b"\x81\xa8features\x92\x01\x00",  # MessagePack
    b"\x00\xff" * 64,
    b'{"features": [' + b"1," * 5000 + b"1]}",
]


@dataclass
class Wire:
    """One raw request and whether it is well framed (it must then be answered)."""

    data: bytes
    method: str
    well_framed: bool
    description: list[str] = field(default_factory=list)


@st.composite
def requests(draw: Any) -> Wire:
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "http/1.1", ""]))
    body = draw(st.sampled_from(BODIES) | st.binary(max_size=300))
    framings = ["length", "length", "chunked", "none", "short", "long", "both", "bad-chunk"]
    framing = draw(st.sampled_from(framings))
    well_framed = version in ("HTTP/1.1", "HTTP/1.0") and target != "*"
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"fuzz")]
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers.append((b"Content-Type", content_type.encode()))
        well_framed = well_framed and "\x01" not in content_type
    if draw(st.booleans()):
        headers.append((b"Authorization", f"Bearer {TOKEN}".encode()))
    extra = draw(
        st.sampled_from(
            [
                None,
                (b"X-Request-ID", b"fuzz-1"),
                (b"X-Request-ID", b"\xff" * 200),
                (b"Accept", b"application/msgpack"),
                (b"Accept", b"*/*;q=abc"),
                (b"Expect", b"100-continue"),
                (b"Connection", b"close"),
                (b"X-Long", b"v" * 8000),
                (b"Bad Header", b"x"),
                (b"X-Ctl", b"a\x00b"),
                (b"X-Fold", b"a\r\n b"),
            ]
        )
    )
    if extra is not None:
        headers.append(extra)
        if extra[0] in (b"Bad Header", b"X-Ctl", b"X-Fold"):
            well_framed = False
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        if version == "HTTP/1.0":
            well_framed = False
        headers.append((b"Transfer-Encoding", b"chunked"))
        cut = draw(st.integers(0, len(body)))
        pieces = [p for p in (body[:cut], body[cut:]) if p]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "none":
        payload = b""
    elif framing == "short":  # says more than it sends: waits for the rest, then times out
        headers.append((b"Content-Length", b"%d" % (len(body) + 10)))
        payload = body
        well_framed = False
    elif framing == "long":  # sends more than it says: the rest reads as the next request
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - 1)))
        payload = body
        well_framed = False
    elif framing == "both":  # the smuggling shape: length and chunked at once
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Transfer-Encoding", b"chunked")]
        payload = body
        well_framed = False
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
        well_framed = False
    if draw(st.booleans()):
        headers.append(draw(st.sampled_from([(b"Content-Length", b"-1"), (b"Content-Length", b"1e3")])))
        well_framed = False
    line = f"{method} {target} {version}".strip().encode()
    data = line + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    return Wire(data + payload, method, well_framed, [line.decode(), framing, repr(extra)])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("wire-repo")
    write_joblib_model(repo, "echo", "v1", HoldsOn(2))
    port = free_port()
    # A generous body timeout: a loaded CI machine that stalls the loop must not turn a good
    # request into a 408 (the malformed ones end their stream and never wait for it).
    env = server_env(trusted_repository=1, admin_token=TOKEN, body_timeout_ms=5000)
    with running(serve_command(repo, port), env, port, tmp_path_factory.mktemp("wire-run")) as server:
        yield server


def _exchange(port: int, wire: Wire) -> int | None:
    """The answer's status, or None where the server closed without one (malformed only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(wire.data)
        except OSError:
            assert not wire.well_framed, wire.description
            return None
        if not wire.well_framed:
            try:
                sock.shutdown(socket.SHUT_WR)  # nothing more is coming: no waiting on a timeout
            except OSError:  # the server has closed already
                return None
        response = http.client.HTTPResponse(sock, method=wire.method.upper())
        try:
            response.begin()
            response.read()
        except (OSError, http.client.HTTPException):
            assert not wire.well_framed, f"no answer to a well-framed request: {wire.description}"
            return None
        return response.status


class GoodClient(threading.Thread):
    """Good predictions on one keep-alive connection, for as long as the fuzz runs."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.answers: list[int] = []
        self.failures: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/predict/echo", body=GOOD, headers={"content-type": "application/json"})
                response = conn.getresponse()
                body = msgspec.json.decode(response.read())
                self.answers.append(response.status)
                if response.status != 200 or body["predictions"] != [4]:
                    self.failures.append(f"{response.status} {body}")
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(repr(error))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()


def test_raw_requests_never_break_the_server_nor_the_requests_beside_them(live: RunningServer) -> None:
    good = GoodClient(live.port)
    good.start()
    statuses: list[int | None] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(wire=requests())
    def fuzz(wire: Wire) -> None:
        status = _exchange(live.port, wire)
        statuses.append(status)
        assert status is None or status < 500, f"{status} for {wire.description}"
        assert live.process.poll() is None, "the server died"

    try:
        fuzz()
    finally:
        good.stop.set()
        good.join(timeout=30)
    assert live.process.poll() is None
    assert httpx.get(live.url + "/healthz", timeout=5).status_code == 200
    assert good.failures == [] and len(good.answers) > 0
    print(f"{len(statuses)} raw requests: {Counter(statuses)}; {len(good.answers)} good ones beside")
    answered = [s for s in statuses if s is not None]
    # The fuzz reached the application, not only the HTTP parser.
    assert {200, 400, 404, 405} <= set(answered), sorted(set(answered))
