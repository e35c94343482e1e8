"""The Redis state store against a real redis-server: following, heartbeats, outages, auth.

The store's semantics (seeding, actions, audit, readiness, racing promotes) are the SQLite
store's, and tests/test_state.py runs them on both; here is what only Redis has.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastserve import redis_state
from fastserve.actions import Candidate, ClearCandidate, Deployment, Promote
from fastserve.errors import StateUnavailable
from fastserve.redis_state import RedisStore
from fastserve.state import SERVING, VersionState

from conftest import (
    RedisServer,
    RunningServer,
    assert_error,
    free_port,
    redis_running,
    running,
    serve_command,
    server_env,
    status_of,
    status_of_every_worker,
    write_joblib_model,
)
from fake_models import SleepyModel

SERVABLE: dict[str, int | None] = {"v1": 4, "v2": 4}
SERVE = VersionState(SERVING, None, 1000)


@pytest.fixture
def open_redis() -> Iterator[Callable[..., RedisStore]]:
    """``open_redis(url, **options)``: a RedisStore, closed at teardown."""
    opened: list[RedisStore] = []

    def open_(url: str, **options: object) -> RedisStore:
        store = RedisStore(url, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until ``condition`` held; fails past ``timeout_s``."""
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < timeout_s, "condition not met in time"
        time.sleep(0.001)
    return time.perf_counter() - start


def test_a_following_store_sees_another_replicas_action_within_100_ms(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    a = open_redis(redis_server.url, follow=True, host="replica-a")
    b = open_redis(redis_server.url, follow=True, host="replica-b")
    a.seed({"m": "v1"}, "seeder")
    assert b.changed() and b.deployments()["m"].stable == "v1"
    delays = []
    for i in range(20):
        action = Candidate("v2", canary=round(0.01 * (i + 1), 2))
        after = a.act("m", action, SERVABLE, "alice")
        assert a.deployments()["m"] == after  # the writer reads its own write at once
        delays.append(wait_for(lambda after=after: b.deployments()["m"] == after))
        assert b.changed()
    median, worst = statistics.median(delays) * 1000, max(delays) * 1000
    print(f"action propagation: median {median:.1f} ms, max {worst:.1f} ms")
    assert max(delays) < 0.1
    assert not b.changed()  # nothing since


def test_changed_costs_the_loop_no_network_when_following(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_server.url, follow=True)
    store.seed({"m": "v1"}, "seeder")
    store.changed()
    start = time.perf_counter()
    for _ in range(10_000):
        store.changed()
        store.deployments()
    per_call = (time.perf_counter() - start) / 10_000
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per poll"


def test_a_dead_replicas_workers_drop_out_when_their_heartbeat_lapses(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    # Two replicas on other hosts (their pids cannot be checked from here): only the TTL tells.
    a = open_redis(redis_server.url, host="replica-a", ttl_s=0.4)
    b = open_redis(redis_server.url, host="replica-b", ttl_s=60)
    b.seed({"m": "v1"}, "seeder")
    b.seed_loaded({"m": ["v1", "v2"]})
    for store in (a, b):
        store.worker_ready(7, 1)  # the same pid on both hosts: two workers all the same
    a.record_version(7, "m", "v1", SERVE)
    for version in ("v1", "v2"):
        b.record_version(7, "m", version, SERVE)
    assert b.serving_everywhere() == {("m", "v1")}  # replica a does not serve v2
    assert set(b.version_states()[("m", "v1")]) == {"replica-a:7", "replica-b:7"}
    assert a.ready_workers(1) == [7] and b.ready_workers(1) == [7]  # per replica
    # While replica a beats, it counts; once it stops (it died), it drops out by itself.
    for _ in range(4):
        time.sleep(0.2)
        a.heartbeat()
        assert ("m", "v2") not in b.serving_everywhere()
    assert not a.replaced()
    wait_for(lambda: ("m", "v2") in b.serving_everywhere(), timeout_s=2)
    assert a.ready_workers(1) == []
    assert set(b.version_states()[("m", "v1")]) == {"replica-b:7"}
    # A replica that comes back (a long pause, not a death) learns that it was dropped.
    a.heartbeat()
    assert a.replaced()
    a.close()
    a.worker_ready(7, 1)
    assert not a.replaced()
    assert ("m", "v2") not in b.serving_everywhere()


def test_a_following_store_keeps_its_workers_alive_past_their_ttl(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    worker = open_redis(redis_server.url, follow=True, ttl_s=2.5)
    other = open_redis(redis_server.url)
    worker.seed({"m": "v1"}, "seeder")
    worker.worker_ready(os.getpid(), os.getppid())
    worker.changed()  # following from now on: its thread beats every second
    time.sleep(4)
    assert other.ready_workers(os.getppid()) == [os.getpid()]
    worker.close()  # nothing beats any more; the pid lives on, so only the TTL tells
    wait_for(lambda: other.ready_workers(os.getppid()) == [], timeout_s=4)


def test_a_worker_of_this_host_killed_outright_drops_out_at_once(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_server.url, ttl_s=60)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    store.worker_ready(exited.pid, os.getppid())
    store.worker_ready(os.getpid(), os.getppid())
    assert store.ready_workers(os.getppid()) == [os.getpid()]  # its TTL has not run out


def test_redis_stopped_refuses_actions_fast_keeps_the_last_state_and_recovers(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_server.url, follow=True)
    store.seed({"m": "v1"}, "seeder")
    store.seed_loaded({"m": ["v1", "v2"]})
    store.worker_ready(os.getpid(), os.getppid())
    for version in ("v1", "v2"):
        store.record_version(os.getpid(), "m", version, SERVE)
    store.act("m", Candidate("v2", canary=0.5), SERVABLE, "alice")
    redis_server.stop()
    start = time.perf_counter()
    with pytest.raises(StateUnavailable, match="cannot be written: Redis is unreachable"):
        store.act("m", Promote(), SERVABLE, "alice")
    assert time.perf_counter() - start < 1.0
    wait_for(lambda: _raises(store.changed), timeout_s=2)
    with pytest.raises(StateUnavailable, match="cannot be read: Redis is unreachable"):
        store.changed()
    # What the loop reads stays the last state: routes, readiness, /status.
    assert store.deployments()["m"].candidate == "v2"
    assert store.ready_workers(os.getppid()) == [os.getpid()]
    assert store.serving_everywhere() == {("m", "v1"), ("m", "v2")}
    # Back, but empty (no persistence): the state was lost, and the last truth restores it.
    redis_server.start()
    wait_for(store.replaced, timeout_s=3)
    store.changed()  # readable again
    assert store.deployments()["m"].candidate == "v2"
    with pytest.raises(StateUnavailable, match="it was lost"):
        store.act("m", Promote(), SERVABLE, "alice")
    deployments, loaded = store.deployments(), store.loaded()
    store.close()
    assert store.restore(deployments, loaded, "server pid 1") == ["m"]
    assert store.restore(deployments, loaded, "server pid 2") == []  # another worker's: no-op
    store.worker_ready(os.getpid(), os.getppid())
    for version in ("v1", "v2"):
        store.record_version(os.getpid(), "m", version, SERVE)
    after = store.act("m", Promote(), SERVABLE, "alice")
    assert (after.stable, after.previous_stable) == ("v2", "v1")
    assert [e.action for e in store.history()] == ["promote", "restore"]
    assert not store.replaced()


def test_a_redis_that_hangs_costs_an_action_its_timeout_and_loses_nothing(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_server.url)
    store.seed({"m": "v1"}, "seeder")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # a partition: connected, never answering
    try:
        start = time.perf_counter()
        with pytest.raises(StateUnavailable, match="did not answer within 0.5 s"):
            store.act("m", Candidate("v2"), SERVABLE, "alice")
        assert time.perf_counter() - start < 1.5
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    store.close()  # the timed-out connection is dropped; the state itself is intact
    assert store.deployments()["m"] == Deployment("m", "v1", updated_at=store.deployments()["m"].updated_at)
    # The refused action was not applied, then or later: the next one is the only one.
    store.act("m", Candidate("v2"), SERVABLE, "alice")
    assert [e.action for e in store.history()] == ["candidate", "init"]


def test_a_password_protected_redis(tmp_path: Path, open_redis: Callable[..., RedisStore]) -> None:
    password = "correct-horse-battery"
    with redis_running(tmp_path, password=password) as server:
        store = open_redis(server.url)
        store.seed({"m": "v1"}, "seeder")
        assert store.deployments()["m"].stable == "v1"
        wrong = open_redis(server.url.replace(password, "wrong-password"))
        with pytest.raises(StateUnavailable, match="Redis refused the credentials") as refused:
            wrong.seed({"m": "v1"}, "seeder")
        none = open_redis(server.url.replace(f":{password}@", ""))
        with pytest.raises(StateUnavailable, match="Redis refused the credentials") as refused_too:
            none.deployments()
        for raised in (refused, refused_too):
            assert password not in str(raised.value) and "wrong-password" not in str(raised.value)


def test_an_action_whose_writes_fail_writes_nothing(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_redis(redis_server.url)
    store.seed({"m": "v1"}, "seeder")
    before, history = store.deployments(), store.history()

    def broken_audit(pipe: object, entry: object) -> None:
        raise RuntimeError("audit broken")

    monkeypatch.setattr(redis_state, "_audit", broken_audit)
    with pytest.raises(RuntimeError, match="audit broken"):
        store.act("m", Candidate("v2"), SERVABLE, "alice")
    monkeypatch.undo()
    assert store.deployments() == before  # the deployment queued before the audit was discarded
    assert store.history() == history
    assert store.act("m", ClearCandidate(), SERVABLE, "alice").candidate is None


def test_a_long_history_is_read_past_the_snapshot(
    redis_server: RedisServer, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_server.url, follow=True)
    store.seed({"m": "v1"}, "seeder")
    for i in range(120):
        store.act("m", Candidate("v2", canary=i / 200) if i % 2 == 0 else ClearCandidate(), SERVABLE, "a")
    assert len(store.history(20)) == 20 and len(store.history(500)) == 121
    assert store.history(500)[-1].action == "init"
    assert store.action_counts() == {("m", "init"): 1, ("m", "candidate"): 60, ("m", "clear_candidate"): 60}


def _raises(call: Callable[[], object]) -> bool:
    try:
        call()
    except StateUnavailable:
        return True
    return False


# -- two replicas (two `fastserve serve`, two workers each) on one Redis ---------------------------

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _fleet_status(server: RunningServer, workers: int) -> dict[int, dict[str, Any]]:
    return status_of_every_worker(server, workers)


def _aliases_everywhere(replicas: list[RunningServer]) -> list[dict[str, Any]]:
    return [
        status["models"]["m"]["aliases"]
        for replica in replicas
        for status in _fleet_status(replica, 2).values()
    ]


@pytest.mark.e2e
def test_two_replicas_on_one_redis_follow_each_others_actions_and_survive_an_outage(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_joblib_model(repo, "m", "v1", SleepyModel(4, delay_s=0.0), toml='stable = "v1"\n')
    write_joblib_model(repo, "m", "v2", SleepyModel(4, delay_s=0.0))
    env = server_env(repository=repo, trusted_repository=1, admin_token=TOKEN, state_url=redis_server.url)
    with contextlib.ExitStack() as stack:
        replicas = []
        for _ in range(2):
            port = free_port()
            command = serve_command(repo, port, "--workers", "2")
            replicas.append(stack.enter_context(running(command, dict(env), port, tmp_path)))
        a, b = replicas
        counts = [s["ready_workers"] for r in replicas for s in _fleet_status(r, 2).values()]
        assert counts == [2, 2, 2, 2], counts

        # An action through either replica governs every worker of both within 100 ms.
        for via, version in ((a, "v2"), (b, "v1"), (a, "v2")):
            response = httpx.post(
                f"{via.url}/deploy/m",
                json={"action": "candidate", "version": "v2", "canary": 0.5}
                if version == "v2"
                else {"action": "clear_candidate"},
                headers=AUTH,
                timeout=10,
            )
            assert response.status_code == 200, response.text
            time.sleep(0.1)
            expected = "v2" if version == "v2" else None
            assert all(aliases["candidate"] == expected for aliases in _aliases_everywhere(replicas))

        # The canary share holds across the fleet: each replica routes by the same state.
        versions = Counter(
            httpx.post(f"{replica.url}/predict/m", json={"features": [1, 2, 3, 4]}, timeout=5).headers[
                "x-model-version"
            ]
            for replica in replicas * 200
        )
        assert sum(versions.values()) == 400 and 0.4 < versions["v2"] / 400 < 0.6, versions  # ±4 sigma

        # A version loaded through replica a is routable once every worker of both serves it.
        write_joblib_model(repo, "m", "v3", SleepyModel(4, delay_s=0.0))
        loading = httpx.post(
            f"{a.url}/deploy/m", json={"action": "load", "version": "v3"}, headers=AUTH, timeout=10
        )
        assert loading.status_code == 200, loading.text
        deadline = time.monotonic() + 30
        while not status_of(b)["models"]["m"]["versions"].get("v3", {}).get("routable"):
            assert time.monotonic() < deadline, status_of(b)["models"]["m"]["versions"]
            time.sleep(0.1)
        workers = status_of(b)["models"]["m"]["versions"]["v3"]["workers"]
        assert len(workers) == 4 and {w["state"] for w in workers.values()} == {"serving"}, workers

        # Redis down: both keep serving, /readyz stays 200, actions answer 503.
        redis_server.stop()
        time.sleep(0.2)
        for replica in replicas:
            for _ in range(20):
                answer = httpx.post(f"{replica.url}/predict/m", json={"features": [1, 2, 3, 4]}, timeout=5)
                assert answer.status_code == 200
            assert httpx.get(replica.url + "/readyz", timeout=5).status_code == 200
            refused = httpx.post(
                f"{replica.url}/deploy/m", json={"action": "promote"}, headers=AUTH, timeout=10
            )
            assert_error(refused, 503, "state_unavailable")
        assert all(s["state_problem"] for r in replicas for s in _fleet_status(r, 2).values())

        # Back, empty: the workers restore what they serve, and actions work again.
        redis_server.start()
        deadline = time.monotonic() + 20
        while True:
            promoted = httpx.post(f"{b.url}/deploy/m", json={"action": "promote"}, headers=AUTH, timeout=10)
            if promoted.status_code == 200:
                break
            # Until a worker restored the state (503), and every worker recorded v2 again (409).
            assert promoted.status_code in (503, 409) and time.monotonic() < deadline, promoted.text
            time.sleep(0.1)
        assert promoted.json()["stable"] == "v2" and promoted.json()["previous_stable"] == "v1"
        time.sleep(0.1)
        assert all(
            aliases == {"stable": "v2", "candidate": None} for aliases in _aliases_everywhere(replicas)
        )
        log = [(e["action"], e["model"]) for e in status_of(a)["deploy_log"]]
        assert log == [("promote", "m"), ("restore", "m")]  # one restore, by whichever worker came first
        assert not any(s["state_problem"] for r in replicas for s in _fleet_status(r, 2).values())


def test_the_cli_deploys_and_shows_the_state_in_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("v1", "v2"):
        write_joblib_model(repo, "m", version, SleepyModel(4, delay_s=0.0), toml='stable = "v1"\n')
    env = server_env(repository=repo, trusted_repository=1, state_url=redis_server.url)
    cli = [sys.executable, "-m", "fastserve.cli"]
    done = subprocess.run(
        [*cli, "deploy", "m", "candidate", "v2", "--canary", "0.25"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["candidate"] == "v2"
    store = RedisStore(redis_server.url)
    try:
        assert store.deployments()["m"].canary == 0.25  # the server's state, not a file
    finally:
        store.close()
    shown = json.loads(subprocess.run([*cli, "status"], env=env, capture_output=True, text=True).stdout)
    assert [e["action"] for e in shown["deploy_log"]] == ["candidate", "init"]
    redis_server.stop()
    down = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert down.returncode == 1
    assert down.stderr.strip() == "fastserve: the deployment state cannot be written: Redis is unreachable"
