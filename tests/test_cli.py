"""The command line: ``fastserve serve`` / ``demo``, and ``granian`` on ``fastserve.app:app``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, running, server_env, write_joblib_model
from fake_models import SlowToWarmInOneProcess

pytestmark = pytest.mark.e2e

ROW = {"features": [0.0] * 64}


def test_serve_with_no_arguments_writes_and_serves_the_demo(tmp_path: Path) -> None:
    port = free_port()
    env = server_env(port=port)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "fastserve.cli", "serve"]
    with running(command, env, port, tmp_path) as server:
        assert "first run, writing the demo repository" in server.output()
        assert (tmp_path / "cache" / "fastserve" / "demo-models" / "digits" / "v2" / "model.skops").is_file()
        reply = httpx.post(server.url + "/predict/digits", json=ROW)
        assert reply.status_code == 200 and reply.headers["x-model-version"] == "v1"


def test_granian_cli_serves_the_app_from_environment_settings(tmp_path: Path, demo_repo: Path) -> None:
    port = free_port()
    env = server_env(repository=demo_repo, max_batch_rows=4)
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port)]
    with running([*command, "fastserve.app:app"], env, port, tmp_path) as server:
        rows = {"instances": [ROW["features"]] * 3}
        reply = httpx.post(server.url + "/predict/digits/versions/v2", json=rows)
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 3


def test_serve_with_two_workers(tmp_path: Path, demo_repo: Path, serve: Any) -> None:
    # Each worker loads its own models; /readyz says 200 (the fixture waits for it) only once
    # both have, so from then on every fresh connection, whichever worker takes it, is served.
    server = serve(demo_repo, "--workers", "2")
    pids = set()
    for _ in range(30):
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert httpx.post(server.url + "/predict/digits", json=ROW).status_code == 200
        status = httpx.get(server.url + "/status").json()
        assert status["ready"] and status["ready_workers"] == 2
        pids.add(status["pid"])
    assert len(pids) == 2, pids  # both workers answered
    assert "worker-2" in server.output()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-queue-depth", "many"], "FASTSERVE_MAX_QUEUE_DEPTH='many' is not a valid int"),
        (["--max-batch-rows", "0"], "FASTSERVE_MAX_BATCH_ROWS=0 must be at least 1"),
        (["--repository", "/nonexistent/models"], "is not a directory"),
    ],
)
def test_bad_settings_exit_1_with_one_line(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastserve.cli", "serve", *flags],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_writes_a_repository(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastserve.cli", "demo", str(tmp_path / "models")],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert 'stable = "v1"' in (tmp_path / "models" / "digits" / "model.toml").read_text()
    assert (tmp_path / "models" / "digits" / "v1" / "model.skops").is_file()


def test_readiness_waits_for_every_worker(tmp_path: Path, serve: Any) -> None:
    repo = tmp_path / "repo"
    write_joblib_model(repo, "m", "v1", SlowToWarmInOneProcess(2, str(tmp_path / "marker"), delay_s=4.0))
    server = serve(repo, "--workers", "2", trusted_repository=1, wait_ready=False)
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 60
    while not answers or answers[-1][0] != 200:
        assert time.monotonic() < deadline, server.output()
        try:
            response = httpx.get(server.url + "/readyz", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        message = response.json()["error"]["message"] if response.status_code != 200 else ""
        answers.append((response.status_code, message))
        time.sleep(0.05)
    # The fast worker, ready for seconds, said 503 for the whole server while the other loaded.
    assert any(message == "1 of 2 workers have loaded their models" for _, message in answers), answers
    for _ in range(20):  # and once it said 200, whichever worker takes a request serves it
        response = httpx.post(server.url + "/predict/m", json={"features": [3, 0]})
        assert response.status_code == 200 and response.json()["predictions"] == [3]
