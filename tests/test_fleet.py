"""End to end: a fleet, 2 replicas x 2 workers on one real redis-server, behind a real nginx.

Everything on loopback: nginx round-robins each request over the two `fastserve serve`
replicas (its upstream), and the replicas share their deployment state through Redis. The
clients talk to nginx, as a fleet's clients talk to its load balancer; actions go to one
replica or the other, as an operator's would.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from test_lifecycle import Load

from conftest import (
    RedisServer,
    RunningServer,
    assert_error,
    free_port,
    redis_running,
    running,
    serve_command,
    server_env,
    status_of_every_worker,
    write_joblib_model,
)
from fake_models import SleepyModel

pytestmark = pytest.mark.e2e

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SWITCH_S = 0.1  # how long an action may take to govern every worker of every replica
ROW = msgspec.json.encode({"features": [1, 2, 3, 4]})


@dataclass
class Fleet:
    redis: RedisServer
    replicas: list[RunningServer]
    url: str  # nginx
    port: int

    def deploy(self, replica: int, **action: object) -> httpx.Response:
        url = f"{self.replicas[replica].url}/deploy/m"
        return httpx.post(url, json=action, headers=AUTH, timeout=10)

    def aliases(self) -> list[dict[str, Any]]:
        """The aliases every worker of every replica routes by."""
        return [
            status["models"]["m"]["aliases"]
            for replica in self.replicas
            for status in status_of_every_worker(replica, 2).values()
        ]


def _nginx_conf(directory: Path, port: int, upstreams: list[int]) -> Path:
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstreams)
    # As root, nginx's workers would switch to `nobody`, who cannot reach pytest's directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream fleet {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;  # a failed request is the client's to see, not retried
        }}
    }}
}}
"""
    )
    return conf


@contextlib.contextmanager
def _nginx(directory: Path, upstreams: list[int]) -> Iterator[int]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run does)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = _nginx_conf(directory, port, upstreams)
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (directory / "error.log").read_text(errors="replace")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    repo = root / "repo"
    write_joblib_model(repo, "m", "v1", SleepyModel(4, delay_s=0.0), toml='stable = "v1"\n')
    write_joblib_model(repo, "m", "v2", SleepyModel(4, delay_s=0.0))
    (root / "redis").mkdir()
    with redis_running(root / "redis") as redis, contextlib.ExitStack() as stack:
        env = server_env(repository=repo, trusted_repository=1, admin_token=TOKEN, state_url=redis.url)
        replicas = []
        for _ in range(2):
            port = free_port()
            command = serve_command(repo, port, "--workers", "2")
            replicas.append(stack.enter_context(running(command, dict(env), port, root)))
        nginx_port = stack.enter_context(_nginx(root / "nginx", [r.port for r in replicas]))
        yield Fleet(redis, replicas, f"http://127.0.0.1:{nginx_port}", nginx_port)


@pytest.fixture
def fresh(fleet: Fleet) -> Fleet:
    """The fleet at stable v1, no candidate, Redis up."""
    if fleet.redis.process is None or fleet.redis.process.poll() is not None:
        fleet.redis.start()
    deadline = time.monotonic() + 20
    while True:  # after an outage: until the workers restored the state
        current = fleet.deploy(0, action="clear_candidate")
        if current.status_code == 200:
            break
        assert time.monotonic() < deadline, current.text
        time.sleep(0.1)
    if current.json()["stable"] != "v1":
        assert fleet.deploy(0, action="rollback", version="v1").status_code == 200
    time.sleep(SWITCH_S)
    return fleet


def test_the_canary_share_across_the_fleet_is_within_binomial_bounds(fresh: Fleet) -> None:
    assert fresh.deploy(1, action="candidate", version="v2", canary=0.3).status_code == 200
    time.sleep(SWITCH_S)
    n = 800
    with httpx.Client(base_url=fresh.url, timeout=10) as client:
        versions = Counter(
            client.post("/predict/m", content=ROW, headers={"content-type": "application/json"}).headers[
                "x-model-version"
            ]
            for _ in range(n)
        )
    share, sigma = versions["v2"] / n, math.sqrt(0.3 * 0.7 / n)
    assert sum(versions.values()) == n and abs(share - 0.3) < 4.5 * sigma, versions
    # nginx spread them: both replicas routed a share of them to each version.
    for replica in fresh.replicas:
        routed: Counter[str] = Counter()
        for status in status_of_every_worker(replica, 2).values():
            for version, roles in status["models"]["m"]["routed"].items():
                routed[version] += sum(roles.values())
        assert routed["v1"] > 0 and routed["v2"] > 0, routed


def test_promote_then_rollback_under_load_through_nginx_with_zero_errors(fresh: Fleet) -> None:
    assert fresh.deploy(0, action="candidate", version="v2").status_code == 200
    time.sleep(SWITCH_S)
    times: dict[str, tuple[float, float]] = {}

    def act(name: str, replica: int, **action: object) -> None:
        started = time.monotonic()
        response = fresh.deploy(replica, **action)
        assert response.status_code == 200, response.text
        times[name] = (started, time.monotonic())

    with Load(fresh.port, path="/predict/m", body=ROW).running() as load:
        time.sleep(1.0)
        act("promote", 0, action="promote")  # through replica A
        time.sleep(1.0)
        act("rollback", 1, action="rollback")  # through replica B
        time.sleep(1.0)

    def stable_at(t: float) -> set[str]:
        (promote_start, promote_end), (rollback_start, rollback_end) = times["promote"], times["rollback"]
        if t < promote_start:
            return {"v1"}
        if promote_end + SWITCH_S <= t < rollback_start:
            return {"v2"}
        if t >= rollback_end + SWITCH_S:
            return {"v1"}
        return {"v1", "v2"}  # while the action is taken and spreads

    answers = load.answers
    assert len(answers) > 200, len(answers)
    assert Counter(a.status for a in answers) == {200: len(answers)}
    for a in answers:
        assert a.version in stable_at(a.sent) | stable_at(a.received), (a, times)
    seen = Counter(a.version for a in answers)
    assert seen["v1"] > 50 and seen["v2"] > 50, seen
    assert all(aliases == {"stable": "v1", "candidate": None} for aliases in fresh.aliases())


def test_redis_killed_mid_load_costs_no_predict_and_deploys_503_until_it_is_back(fresh: Fleet) -> None:
    with Load(fresh.port, path="/predict/m", body=ROW).running() as load:
        time.sleep(0.5)
        os.kill(fresh.redis.process.pid, 9)  # type: ignore[union-attr]
        fresh.redis.process.wait(timeout=10)  # type: ignore[union-attr]
        time.sleep(0.5)
        during = [fresh.deploy(r, action="candidate", version="v2") for r in (0, 1)]
        outage = [a for a in load.answers if a.sent > time.monotonic() - 0.5]
        fresh.redis.start()  # empty: no persistence
        deadline = time.monotonic() + 20
        while (after := fresh.deploy(1, action="candidate", version="v2", canary=1.0)).status_code != 200:
            # 503 until a worker restored the state; 404 until every worker recorded v2 again.
            assert after.status_code in (503, 404, 409) and time.monotonic() < deadline, after.text
            time.sleep(0.1)
        time.sleep(0.5)
    for refused in during:
        assert_error(refused, 503, "state_unavailable")
    assert len(outage) > 10, len(outage)  # predicts went on through the outage
    assert Counter(a.status for a in load.answers) == {200: len(load.answers)}
    # The last answers follow the action taken after the outage (canary 1: all v2).
    assert {a.version for a in load.answers if a.sent > load.answers[-1].sent - 0.2} == {"v2"}


def test_racing_promotes_from_both_replicas_exactly_one_wins(fresh: Fleet) -> None:
    for round_ in range(4):
        target = "v2" if round_ % 2 == 0 else "v1"
        assert fresh.deploy(round_ % 2, action="candidate", version=target).status_code == 200
        time.sleep(SWITCH_S)
        barrier = threading.Barrier(2)
        answers: list[httpx.Response] = []

        def promote(replica: int, barrier: threading.Barrier = barrier, answers: list[Any] = answers) -> None:
            barrier.wait()
            answers.append(fresh.deploy(replica, action="promote"))

        racers = [threading.Thread(target=promote, args=(r,)) for r in (0, 1)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=30)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 409], [r.text for r in answers]
        (lost,) = [r for r in answers if r.status_code == 409]
        assert_error(lost, 409, "deploy_conflict")  # no candidate left to promote
        time.sleep(SWITCH_S)
        assert all(aliases == {"stable": target, "candidate": None} for aliases in fresh.aliases())
