"""Shared fixtures: the demo repository, and real Granian servers on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import msgspec
import pytest

from fastserve.demo import write_demo_repository

TESTS = Path(__file__).parent
READY_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_repository(tmp_path_factory.mktemp("repo"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_joblib_model(repo: Path, model: str, version: str, estimator: object, toml: str = "") -> Path:
    """A trusted-repository model (joblib), for the fake estimators of ``fake_models``."""
    target = repo / model / version / "model.joblib"
    target.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, target)
    if toml:
        (repo / model / "model.toml").write_text(toml)
    return target


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def server_env(**settings: object) -> dict[str, str]:
    # Settings come only from the test; which queue runs is the suite's choice.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FASTSERVE_") or k == "FASTSERVE_NO_EXTENSIONS"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    for name, value in settings.items():
        env[f"FASTSERVE_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def running(
    command: list[str], env: dict[str, str], port: int, tmp_path: Path, wait_ready: bool = True
) -> Iterator[RunningServer]:
    """Start a server process in its own session; always stop it (and its workers) by pid."""
    log = tmp_path / f"server-{port}.log"
    # Deployment state stays inside the test: by default it would go to ~/.local/state.
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        if wait_ready:
            wait_until_ready(server)
        yield server
    finally:
        stop(process)


def wait_until_ready(server: RunningServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"server not ready in {timeout_s} s:\n{server.output()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    # Granian's workers share the session: make sure none outlives the test.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def serve_command(repo: Path, port: int, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastserve.cli",
        "serve",
        "--repository",
        str(repo),
        "--port",
        str(port),
        *flags,
    ]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """``serve(repo, *flags, **settings)`` starts ``fastserve serve`` and returns a RunningServer."""
    with contextlib.ExitStack() as stack:

        def start(repo: Path, *flags: str, wait_ready: bool = True, **settings: object) -> RunningServer:
            port = free_port()
            return stack.enter_context(
                running(serve_command(repo, port, *flags), server_env(**settings), port, tmp_path, wait_ready)
            )

        yield start


def status_of(server: RunningServer) -> dict[str, Any]:
    """/status on a fresh connection: with several workers, either may answer."""
    response = httpx.get(server.url + "/status", timeout=5)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def status_of_every_worker(server: RunningServer, workers: int) -> dict[int, dict[str, Any]]:
    """/status from each worker process, by pid (asking until each has answered)."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"
        status = status_of(server)
        seen[status["pid"]] = status
    return seen


def wait_for_every_worker(server: RunningServer, workers: int) -> None:
    """Until each worker says it is ready. /readyz waits for them all at start; this is for
    later, as when a killed worker has been replaced."""
    deadline = time.monotonic() + 60
    while not all(status["ready"] for status in status_of_every_worker(server, workers).values()):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    if response.headers["content-type"] == "application/msgpack":
        body = msgspec.msgpack.decode(response.content)
    else:
        body = response.json()
    assert body["error"]["code"] == code
    # No internals: no traceback, no file paths.
    assert "Traceback" not in response.text and "/tmp" not in response.text and ".py" not in response.text


# -- a real redis-server, for the Redis state store ---------------------------------------------


@dataclass
class RedisServer:
    """A redis-server on a loopback port, without persistence: a restart starts it empty."""

    port: int
    password: str | None
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        command += ["--dir", str(self.directory)]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()


@contextlib.contextmanager
def redis_running(directory: Path, password: str | None = None) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(free_port(), password, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session's tests; ``redis_server`` empties it for each."""
    with redis_running(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    if redis_session.process is None or redis_session.process.poll() is not None:
        redis_session.stop()
        redis_session.start()  # a test stopped it
    redis_session.flush()
    return redis_session
