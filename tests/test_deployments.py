"""End to end: canary, shadow, promote and rollback on real Granian processes, one or two workers."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
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

from conftest import (
    RunningServer,
    assert_error,
    free_port,
    running,
    serve_command,
    server_env,
    status_of,
    status_of_every_worker,
    write_joblib_model,
)
from fake_models import EchoUnless, SleepyModel
from http_load import post_many

pytestmark = pytest.mark.e2e

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# How long an action may take to reach every worker (the bound).
SWITCH_S = 0.1


def deploy(server: RunningServer, model: str, **action: object) -> httpx.Response:
    return httpx.post(f"{server.url}/deploy/{model}", json=action, headers=AUTH, timeout=10)


@pytest.fixture(scope="module")
def digit_rows() -> np.ndarray[Any, Any]:
    return load_digits().data  # type: ignore[no-any-return]


def offline(repo: Path, version: str) -> Any:
    return sio.load(repo / "digits" / version / "model.skops", trusted=list(TRUSTED_TYPES))


def echo_repo(repo: Path, candidate: object, toml: str = "") -> Path:
    """Model ``m``: v1 echoes the first of 4 features, v2 is ``candidate``."""
    write_joblib_model(repo, "m", "v1", SleepyModel(4, delay_s=0.0), toml='stable = "v1"\n' + toml)
    write_joblib_model(repo, "m", "v2", candidate)
    return repo


# -- canary ----------------------------------------------------------------------------------


def test_canary_share_is_observed_and_every_answer_comes_from_its_version(
    serve: Any, demo_repo: Path, digit_rows: np.ndarray[Any, Any]
) -> None:
    server = serve(demo_repo, admin_token=TOKEN)
    assert deploy(server, "digits", action="candidate", version="v2", canary=0.25).status_code == 200
    n = 2000
    rows = digit_rows[np.arange(n) % len(digit_rows)]
    bodies = [msgspec.json.encode({"features": row.tolist()}) for row in rows]
    replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/digits", bodies, concurrency=16))

    expected = {version: offline(demo_repo, version).predict(rows).tolist() for version in ("v1", "v2")}
    versions = Counter()
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.body
        version = reply.headers["x-model-version"]
        body = msgspec.json.decode(reply.body)
        assert body["version"] == version
        assert body["predictions"] == [expected[version][i]]  # answered by the version it names
        versions[version] += 1
    # Binomial(2000, 0.25): 4.5 standard deviations either side cannot flake.
    bound = 4.5 * math.sqrt(n * 0.25 * 0.75)
    assert abs(versions["v2"] - n * 0.25) < bound, versions
    routed = status_of(server)["models"]["digits"]["routed"]
    assert routed == {"v1": {"stable": versions["v1"]}, "v2": {"candidate": versions["v2"]}}


def test_a_routing_key_always_gets_the_same_version(serve: Any, demo_repo: Path) -> None:
    server = serve(demo_repo, admin_token=TOKEN)
    assert deploy(server, "digits", action="candidate", version="v2", canary=0.3).status_code == 200
    body = {"features": [0.0] * 64}
    keys = [f"user-{i}" for i in range(200)]
    chosen: dict[str, set[str]] = {key: set() for key in keys}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):
            for key in keys:
                response = client.post("/predict/digits", json=body, headers={"x-routing-key": key})
                assert response.status_code == 200
                chosen[key].add(response.headers["x-model-version"])
        assert all(len(versions) == 1 for versions in chosen.values()), chosen
        share = sum(versions == {"v2"} for versions in chosen.values()) / len(keys)
        assert abs(share - 0.3) < 4.5 * math.sqrt(0.3 * 0.7 / len(keys)), share
        # A larger share keeps every key that was on the candidate there.
        assert deploy(server, "digits", action="candidate", version="v2", canary=0.6).status_code == 200
        for key in keys:
            if chosen[key] == {"v2"}:
                response = client.post("/predict/digits", json=body, headers={"x-routing-key": key})
                assert response.headers["x-model-version"] == "v2"


# -- shadow ----------------------------------------------------------------------------------


def _latencies(server: RunningServer, firsts: list[int]) -> list[float]:
    took = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for first in firsts:
            started = time.perf_counter()
            response = client.post("/predict/m", json={"features": [first, 0, 0, 0]})
            took.append(time.perf_counter() - started)
            assert response.status_code == 200
            assert response.headers["x-model-version"] == "v1"
            assert response.json()["predictions"] == [first]  # always stable's answer
    return took


def _outcomes_when_settled(server: RunningServer, total: int) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while True:
        outcomes = status_of(server)["models"]["m"]["shadow_outcomes"].get("v2", {})
        if sum(outcomes.values()) >= total:
            return outcomes  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.05)


def test_shadow_counts_agreement_and_a_slow_candidate_leaves_stable_latency_alone(
    serve: Any, tmp_path: Path
) -> None:
    # The candidate takes 300 ms per batch and disagrees on rows whose first feature is 7.
    repo = echo_repo(
        tmp_path / "repo", EchoUnless(4, odd_one_out=7, delay_s=0.3), "[batching]\nqueue_timeout_ms = 20000\n"
    )
    server = serve(repo, trusted_repository=1, admin_token=TOKEN)
    firsts = [i % 10 for i in range(40)]
    before = _latencies(server, firsts)
    assert deploy(server, "m", action="candidate", version="v2", shadow=True).status_code == 200
    during = _latencies(server, firsts)

    # Nobody waited for the candidate: each answer took far less than one of its batches.
    assert statistics.median(during) < statistics.median(before) + 0.02, (before, during)
    assert sorted(during)[int(0.9 * len(during))] < 0.15, during
    outcomes = _outcomes_when_settled(server, len(firsts))
    assert outcomes == {"agree": 36, "disagree": 4}
    routed = status_of(server)["models"]["m"]["routed"]
    assert routed == {"v1": {"stable": 2 * len(firsts)}}  # users only ever got stable
    assert '"event":"shadow_disagreement"' in server.output()


def test_shadow_copies_are_dropped_not_queued_when_the_candidate_is_busy(serve: Any, tmp_path: Path) -> None:
    repo = echo_repo(
        tmp_path / "repo", EchoUnless(4, odd_one_out=-5, delay_s=0.3), "[batching]\nmax_queue_depth = 16\n"
    )
    server = serve(repo, trusted_repository=1, admin_token=TOKEN)
    assert deploy(server, "m", action="candidate", version="v2", shadow=True).status_code == 200
    bodies = [msgspec.json.encode({"features": [i, 0, 0, 0]}) for i in range(96)]
    replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/m", bodies, concurrency=8))
    # Every user got stable's answer; none was refused for the candidate's sake.
    assert [msgspec.json.decode(r.body)["predictions"] for r in replies] == [[i] for i in range(96)]
    outcomes = _outcomes_when_settled(server, len(bodies))
    assert outcomes["dropped"] > 0 and outcomes.get("disagree", 0) == 0, outcomes
    assert sum(outcomes.values()) == len(bodies)
    assert status_of(server)["models"]["m"]["versions"]["v1"]["shed"] == 0


# -- promote and rollback ----------------------------------------------------------------------


async def _fresh_connection_post(port: int, body: bytes) -> tuple[int, str]:
    """One request on its own connection, so that successive requests spread over the workers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /predict/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        reply = await reader.read()
    finally:
        writer.close()
    head = reply.split(b"\r\n\r\n", 1)[0].decode()
    status = int(head.split(" ", 2)[1])
    version = next(
        (
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-model-version")
        ),
        "",
    )
    return status, version


def test_promote_and_rollback_under_load_on_two_workers(serve: Any, demo_repo: Path) -> None:
    server = serve(demo_repo, "--workers", "2", admin_token=TOKEN)
    assert deploy(server, "digits", action="candidate", version="v2").status_code == 200
    body = msgspec.json.encode({"features": [0.0] * 64})
    answers: list[tuple[float, float, int, str]] = []
    actions: dict[str, tuple[float, float]] = {}

    async def load(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            status, version = await _fresh_connection_post(server.port, body)
            answers.append((sent, time.monotonic(), status, version))

    async def act(name: str, **action: object) -> None:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(f"{server.url}/deploy/digits", json=action, headers=AUTH)
        assert response.status_code == 200, response.text
        actions[name] = (started, time.monotonic())

    async def scenario() -> None:
        start = time.monotonic()
        loaders = [asyncio.create_task(load(start + 3.0)) for _ in range(6)]
        await asyncio.sleep(0.8)
        await act("promote", action="promote")
        await asyncio.sleep(0.8)
        await act("rollback", action="rollback")
        await asyncio.gather(*loaders)

    asyncio.run(scenario())

    def stable_at(t: float) -> set[str]:
        (promote_start, promote_end), (rollback_start, rollback_end) = actions["promote"], actions["rollback"]
        if t < promote_start:
            return {"v1"}
        if promote_end + SWITCH_S <= t < rollback_start:
            return {"v2"}
        if t >= rollback_end + SWITCH_S:
            return {"v1"}
        return {"v1", "v2"}  # while the action is taken and spreads

    assert len(answers) > 100
    assert all(status == 200 for _, _, status, _ in answers), Counter(s for _, _, s, _ in answers)
    for sent, received, _, version in answers:
        assert version in stable_at(sent) | stable_at(received), (sent, received, version, actions)
    seen = Counter(version for *_, version in answers)
    assert seen["v1"] > 20 and seen["v2"] > 20, seen
    for status in status_of_every_worker(server, 2).values():
        assert status["models"]["digits"]["aliases"] == {"stable": "v1", "candidate": None}


def test_every_worker_follows_each_action_and_the_state_survives_a_restart(
    demo_repo: Path, tmp_path: Path
) -> None:
    state = tmp_path / "deployments.sqlite"
    env = server_env(repository=demo_repo, admin_token=TOKEN, state_path=state)
    port = free_port()
    command = serve_command(demo_repo, port, "--workers", "2")
    with running(command, env, port, tmp_path) as server:
        steps: list[tuple[dict[str, object], dict[str, Any]]] = [
            ({"action": "candidate", "version": "v2", "canary": 0.5, "shadow": True}, {"candidate": "v2"}),
            ({"action": "promote"}, {"stable": "v2", "candidate": None}),
            ({"action": "rollback"}, {"stable": "v1", "candidate": None}),
            ({"action": "rollback", "version": "v2"}, {"stable": "v2", "candidate": None}),
        ]
        for action, expected in steps:
            response = deploy(server, "digits", **action)
            assert response.status_code == 200, response.text
            new_state = response.json()
            for key, value in expected.items():
                assert new_state[key] == value
            time.sleep(SWITCH_S)
            for status in status_of_every_worker(server, 2).values():
                digits = status["models"]["digits"]
                assert digits["aliases"] == {
                    "stable": new_state["stable"],
                    "candidate": new_state["candidate"],
                }
                assert digits["canary"] == new_state["canary"] and digits["shadow"] == new_state["shadow"]
        log = [entry for entry in status_of(server)["deploy_log"] if entry["model"] == "digits"]
        assert [entry["action"] for entry in log] == ["rollback", "rollback", "promote", "candidate", "init"]
        assert log[0]["from_version"] == "v1" and log[0]["to_version"] == "v2"
        assert log[0]["actor"].startswith("http ")
    assert server.process.poll() is not None

    with running(command, env, port, tmp_path) as restarted:
        for status in status_of_every_worker(restarted, 2).values():
            assert status["models"]["digits"]["aliases"] == {"stable": "v2", "candidate": None}
            assert status["models"]["digits"]["previous_stable"] == "v1"
        response = httpx.post(restarted.url + "/predict/digits", json={"features": [0.0] * 64})
        assert response.headers["x-model-version"] == "v2"
        # The restart added no action (churn's init is the demo's other model).
        assert len([e for e in status_of(restarted)["deploy_log"] if e["model"] == "digits"]) == 5


def test_the_cli_acts_on_a_running_server_without_http(demo_repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "deployments.sqlite"
    env = server_env(repository=demo_repo, state_path=state)  # no token: HTTP actions are off
    port = free_port()
    with running(serve_command(demo_repo, port, "--workers", "2"), env, port, tmp_path) as server:
        assert_error(deploy(server, "digits", action="promote"), 403, "deploy_disabled")
        cli = [sys.executable, "-m", "fastserve.cli"]
        done = subprocess.run(
            [*cli, "deploy", "digits", "candidate", "v2", "--canary", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(done.stdout)["candidate"] == "v2"
        time.sleep(SWITCH_S)
        for _ in range(10):  # canary 1: every request on every worker goes to v2
            response = httpx.post(server.url + "/predict/digits", json={"features": [0.0] * 64})
            assert response.headers["x-model-version"] == "v2"
        refused = subprocess.run(
            [*cli, "deploy", "digits", "rollback"], env=env, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1
        assert refused.stderr.strip() == "fastserve: digits has no previous stable version to roll back to"
        shown = subprocess.run(
            [*cli, "status"], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        state_shown = json.loads(shown.stdout)
        assert state_shown["models"]["digits"]["candidate"] == "v2"
        assert state_shown["models"]["digits"]["versions"] == ["v1", "v2"]
        assert state_shown["deploy_log"][0]["actor"].startswith("cli ")


# -- the ops route -----------------------------------------------------------------------------


def test_deploy_is_off_without_a_token(serve: Any, demo_repo: Path) -> None:
    server = serve(demo_repo)
    assert_error(deploy(server, "digits", action="promote"), 403, "deploy_disabled")
    assert_error(
        httpx.post(server.url + "/deploy/digits", json={"action": "promote"}), 403, "deploy_disabled"
    )


def test_deploy_refuses_bad_credentials_and_bad_actions(serve: Any, demo_repo: Path) -> None:
    server = serve(demo_repo, admin_token=TOKEN)
    url = server.url + "/deploy/digits"
    action = {"action": "candidate", "version": "v2"}
    for headers in (
        {},
        {"authorization": "Bearer wrong-token-wrong-token"},
        {"authorization": f"Basic {TOKEN}"},
    ):
        response = httpx.post(url, json=action, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(deploy(server, "nope", action="promote"), 404, "unknown_model")
    assert_error(deploy(server, "digits", action="candidate", version="v9"), 404, "unknown_version")
    assert_error(deploy(server, "digits", action="rollback", version="v9"), 404, "unknown_version")
    assert_error(deploy(server, "digits", action="explode"), 400, "malformed_body")
    assert_error(
        deploy(server, "digits", action="candidate", version="v2", canary=1.5), 400, "malformed_body"
    )
    assert_error(deploy(server, "digits", action="candidate"), 400, "malformed_body")
    assert_error(httpx.post(url, content=b"{not json", headers=AUTH), 400, "malformed_body")
    assert_error(httpx.post(url, content=b" " * 20_000, headers=AUTH), 413, "body_too_large")
    assert_error(deploy(server, "digits", action="promote"), 409, "deploy_conflict")
    assert_error(deploy(server, "digits", action="candidate", version="v1"), 409, "deploy_conflict")
    assert_error(deploy(server, "digits", action="rollback"), 409, "deploy_conflict")
    # Nothing was changed by any of them.
    status = status_of(server)
    assert status["models"]["digits"]["aliases"] == {"stable": "v1", "candidate": None}
    assert sorted((entry["model"], entry["action"]) for entry in status["deploy_log"]) == [
        ("churn", "init"),
        ("digits", "init"),
    ]


def test_a_short_admin_token_is_refused_at_start(demo_repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastserve.cli", "serve", "--repository", str(demo_repo)],
        env=server_env(admin_token="short"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "fastserve: FASTSERVE_ADMIN_TOKEN must be at least 16 characters"


def test_versions_refused_at_load_cannot_be_deployed(serve: Any, tmp_path: Path, demo_repo: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "model.toml").write_text('stable = "v1"\n')
    (repo / "digits" / "v1").mkdir()
    (repo / "digits" / "v1" / "model.skops").write_bytes(
        (demo_repo / "digits" / "v2" / "model.skops").read_bytes()
    )
    outside = tmp_path / "outside"
    (outside / "v").mkdir(parents=True)
    (outside / "v" / "model.skops").write_bytes((demo_repo / "digits" / "v2" / "model.skops").read_bytes())
    # A model file that is a symlink out of the repository, a version directory that is one,
    # and a skops file holding a type nobody trusted.
    (repo / "digits" / "v2").mkdir()
    (repo / "digits" / "v2" / "model.skops").symlink_to(outside / "v" / "model.skops")
    (repo / "digits" / "v3").symlink_to(outside / "v", target_is_directory=True)
    (repo / "digits" / "v4").mkdir()
    sio.dump(SleepyModel(64, delay_s=0.0), repo / "digits" / "v4" / "model.skops")
    server = serve(repo, admin_token=TOKEN)
    versions = status_of(server)["models"]["digits"]["versions"]
    assert versions["v1"]["state"] == "serving"
    assert "outside the repository" in versions["v2"]["reason"]
    assert "outside the repository" in versions["v3"]["reason"]
    assert versions["v4"]["reason"].startswith("UntrustedTypesFoundException")
    for version in ("v2", "v3", "v4"):
        assert_error(deploy(server, "digits", action="candidate", version=version), 404, "unknown_version")
        assert_error(deploy(server, "digits", action="rollback", version=version), 404, "unknown_version")
