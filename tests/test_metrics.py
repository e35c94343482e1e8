"""Metrics: the tallies and their flush, multiprocess aggregation, and /metrics on real Granian workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastserve.config import MetricsSettings, Settings
from fastserve.metrics import DURATION_BUCKETS, ROW_BUCKETS, Metrics, _Buckets, multiprocess_dir

from conftest import (
    RunningServer,
    free_port,
    running,
    serve_command,
    server_env,
    status_of_every_worker,
    wait_for_every_worker,
    write_joblib_model,
)
from fake_models import EchoUnless, SleepyModel

# -- helpers ---------------------------------------------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...]]


def samples(text: str) -> dict[Sample, float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):  # per process only, and a time: not compared
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def values_of(
    scrape: dict[Sample, float], name: str, **match: str
) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        labels: value
        for (sample, labels), value in scrape.items()
        if sample == name and all(dict(labels).get(k) == v for k, v in match.items())
    }


def total(scrape: dict[Sample, float], name: str, **match: str) -> float:
    return sum(values_of(scrape, name, **match).values())


def assert_histograms_consistent(scrape: dict[Sample, float], name: str) -> None:
    """Buckets rise with ``le``, and the +Inf bucket is the ``_count``."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    for labels, value in values_of(scrape, name + "_bucket").items():
        rest = tuple((k, v) for k, v in labels if k != "le")
        series[rest].append((float(dict(labels)["le"]), value))
    for rest, buckets in series.items():
        counts = [value for _, value in sorted(buckets)]
        assert counts == sorted(counts), (name, rest, buckets)
        assert counts[-1] == scrape[(name + "_count", rest)], (name, rest)


@pytest.fixture
def per_process() -> None:
    if multiprocess_dir() is not None:
        pytest.skip("PROMETHEUS_MULTIPROC_DIR was set when prometheus_client was imported")


# -- unit: tallies ---------------------------------------------------------------------------


def test_a_flushed_tally_equals_observing_one_at_a_time() -> None:
    # The flush writes into prometheus_client's private bucket values: this catches a change there.
    observed = [0.0, 0.0005, 0.0006, 0.003, 0.1, 0.1000001, 9.9, 10.0, 10.5, 1e6]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h_seconds", "h", ["m"], buckets=DURATION_BUCKETS, registry=one)
    flushed = Histogram("h_seconds", "h", ["m"], buckets=DURATION_BUCKETS, registry=bulk)
    tally = _Buckets(DURATION_BUCKETS)
    for value in observed:
        direct.labels("a").observe(value)
        tally.observe(value)
    tally.flush_into(flushed.labels("a"))
    assert tally.counts == [0.0] * (len(DURATION_BUCKETS) + 2)
    assert samples(generate_latest(bulk).decode()) == samples(generate_latest(one).decode())
    tally.flush_into(flushed.labels("a"))  # nothing pending: nothing added
    assert samples(generate_latest(bulk).decode()) == samples(generate_latest(one).decode())


def test_buckets_span_half_a_millisecond_to_ten_seconds_and_one_to_1024_rows() -> None:
    assert DURATION_BUCKETS[0] == 0.0005 and DURATION_BUCKETS[-1] == 10.0
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    assert ROW_BUCKETS == tuple(float(2**i) for i in range(11))


class _Queue:
    queued_rows = 0


def _router(
    routed: dict[str, Counter[tuple[str, str]]], outcomes: dict[str, Counter[tuple[str, str]]]
) -> Any:
    return SimpleNamespace(routed=routed, shadow=SimpleNamespace(outcomes=outcomes))


def test_requests_sheds_and_durations_by_code(per_process: None) -> None:
    metrics = Metrics()
    meter = metrics.meter("m", "v1", _Queue())
    for _ in range(3):
        meter.answered(0.002)
    metrics.refused("m", "v1", 429)
    metrics.refused("m", "v1", 504)
    metrics.refused("m", "", 404)
    metrics.refused("m", "v1", 422)
    text = metrics.render([], {}).decode()
    assert text.startswith(
        f"# fastserve: PROMETHEUS_MULTIPROC_DIR is not set: metrics of process {os.getpid()}"
    )
    scrape = samples(text)
    codes = {dict(labels)["code"]: v for labels, v in values_of(scrape, "fastserve_requests_total").items()}
    assert codes == {"200": 3, "429": 1, "504": 1, "404": 1, "422": 1}
    assert values_of(scrape, "fastserve_requests_total", code="404") == {
        (("code", "404"), ("model", "m"), ("version", "")): 1.0
    }
    assert values_of(scrape, "fastserve_shed_total") == {
        (("model", "m"), ("reason", "queue_full")): 1.0,
        (("model", "m"), ("reason", "queue_timeout")): 1.0,
    }
    # Only successful answers are request latencies: fast refusals would hide slow predictions.
    assert total(scrape, "fastserve_request_duration_seconds_count") == 3
    assert total(scrape, "fastserve_request_duration_seconds_bucket", le="0.0025") == 3
    assert total(scrape, "fastserve_request_duration_seconds_bucket", le="0.001") == 0
    assert_histograms_consistent(scrape, "fastserve_request_duration_seconds")
    # A second render adds nothing that was already flushed.
    assert (
        samples(metrics.render([], {}).decode())[
            ("fastserve_requests_total", (("code", "200"), ("model", "m"), ("version", "v1")))
        ]
        == 3
    )


def test_batch_meter_records_waits_rows_and_predict_time(per_process: None) -> None:
    metrics = Metrics()
    queue = _Queue()
    meter = metrics.meter("m", "v1", queue)
    meter.enqueued.extend([1_000_000, 2_000_000, 3_000_000, 4_000_000])
    # The two oldest expired (504, not a wait); the next two waited 8 ms and 7 ms.
    meter.drained(2, 2, 11_000_000)
    assert list(meter.enqueued) == []
    meter.predicted(2, 0.004)
    meter.predicted(64, 0.02)
    queue.queued_rows = 7
    scrape = samples(metrics.render([], {}).decode())
    assert total(scrape, "fastserve_queue_wait_seconds_count") == 2
    assert total(scrape, "fastserve_queue_wait_seconds_sum") == pytest.approx(0.015)
    assert total(scrape, "fastserve_queue_wait_seconds_bucket", le="0.005") == 0
    assert total(scrape, "fastserve_queue_wait_seconds_bucket", le="0.01") == 2
    assert total(scrape, "fastserve_batch_rows_bucket", le="2.0") == 1
    assert total(scrape, "fastserve_batch_rows_bucket", le="64.0") == 2
    assert total(scrape, "fastserve_predict_duration_seconds_sum") == pytest.approx(0.024)
    assert total(scrape, "fastserve_queue_depth_rows", model="m", version="v1") == 7
    for name in ("queue_wait_seconds", "batch_rows", "predict_duration_seconds"):
        assert_histograms_consistent(scrape, "fastserve_" + name)


def test_routed_and_shadow_counts_are_flushed_as_deltas(per_process: None) -> None:
    routed: dict[str, Counter[tuple[str, str]]] = {"m": Counter({("v1", "stable"): 5})}
    outcomes: dict[str, Counter[tuple[str, str]]] = {"m": Counter({("v2", "agree"): 2})}
    metrics = Metrics()
    metrics.follow(_router(routed, outcomes))
    metrics.flush()
    routed["m"]["v1", "stable"] += 3
    routed["m"]["v2", "candidate"] += 1
    outcomes["m"]["v2", "disagree"] += 1
    metrics.flush()
    metrics.flush()
    scrape = samples(metrics.render([], {}).decode())
    assert values_of(scrape, "fastserve_routed_total") == {
        (("model", "m"), ("role", "stable"), ("version", "v1")): 8.0,
        (("model", "m"), ("role", "candidate"), ("version", "v2")): 1.0,
    }
    assert values_of(scrape, "fastserve_shadow_total") == {
        (("model", "m"), ("outcome", "agree"), ("version", "v2")): 2.0,
        (("model", "m"), ("outcome", "disagree"), ("version", "v2")): 1.0,
    }


def test_model_info_and_deploy_actions_come_from_the_state(per_process: None) -> None:
    info = [("m", "v1", "stable", False), ("m", "v2", "stable", True), ("m", "v1", "candidate", False)]
    scrape = samples(Metrics().render(info, {("m", "promote"): 2, ("m", "candidate"): 3}).decode())
    assert values_of(scrape, "fastserve_model_info") == {
        (("alias", "stable"), ("model", "m"), ("version", "v1")): 0.0,
        (("alias", "stable"), ("model", "m"), ("version", "v2")): 1.0,
        (("alias", "candidate"), ("model", "m"), ("version", "v1")): 0.0,
    }
    assert values_of(scrape, "fastserve_deploy_actions_total") == {
        (("action", "promote"), ("model", "m")): 2.0,
        (("action", "candidate"), ("model", "m")): 3.0,
    }


def test_metrics_can_be_turned_off() -> None:
    from fastserve.worker import Server

    server = Server(Settings(metrics=MetricsSettings(metrics=False)))
    assert server.metrics is None
    assert server.render_metrics().startswith(b"# fastserve: metrics are off")
    assert Server(Settings()).metrics is not None


# -- unit: across processes ------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys
    from fastserve.metrics import Metrics
    metrics = Metrics()
    queue = type("Q", (), {"queued_rows": int(sys.argv[2])})()
    meter = metrics.meter("m", "v1", queue)
    for _ in range(int(sys.argv[1])):
        meter.answered(0.003)
    if sys.argv[3] == "stop":
        metrics.stop()      # a normal shutdown
    else:
        metrics.flush()
        os._exit(0)         # killed: no shutdown ran
    """
)
_SCRAPE = "from fastserve.metrics import Metrics\nprint(Metrics().render([], {}).decode())"


def _python(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_values_add_up_across_processes_and_outlive_them(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    _python(_WORKER, "5", "3", "stop", env=env)
    _python(_WORKER, "7", "4", "kill", env=env)
    text = _python(_SCRAPE, env=env)
    assert not text.startswith("# fastserve: PROMETHEUS_MULTIPROC_DIR is not set")
    scrape = samples(text)
    # Counters and histograms of finished processes stay in the totals...
    assert total(scrape, "fastserve_requests_total") == 12
    assert total(scrape, "fastserve_request_duration_seconds_count") == 12
    assert_histograms_consistent(scrape, "fastserve_request_duration_seconds")
    # ...their live gauges do not: the stopped one removed its own, the killed one's was reaped.
    assert total(scrape, "fastserve_queue_depth_rows") == 0
    assert not list(tmp_path.glob("gauge_live*"))


# -- end to end: two Granian workers ---------------------------------------------------------

WORKERS = 2
# Each worker flushes its tallies every 100 ms: a scrape answered by the other worker is late by at most that.
SETTLE_S = 0.5


def metrics_repo(repo: Path) -> Path:
    """``slow``: one request in predict at a time and two queued per worker, then 429.
    ``echo``: fast, four features."""
    slow_toml = (
        'stable = "v1"\n[batching]\nmax_batch_rows = 1\nmax_queue_depth = 2\nqueue_timeout_ms = 30000\n'
    )
    write_joblib_model(repo, "slow", "v1", SleepyModel(4, delay_s=0.3), toml=slow_toml)
    write_joblib_model(repo, "echo", "v1", SleepyModel(4, delay_s=0.0), toml='stable = "v1"\n')
    return repo


def scrape(server: RunningServer) -> tuple[str, dict[Sample, float]]:
    response = httpx.get(server.url + "/metrics", timeout=10)  # a fresh connection: either worker
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return response.text, samples(response.text)


def post(server: RunningServer, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60
    )


def send_mix(server: RunningServer) -> Counter[tuple[str, str, str]]:
    """A known mix of answers: (model, version, code) for every request to a known model."""
    good = b'{"features": [1, 2, 3, 4]}'
    expected: Counter[tuple[str, str, str]] = Counter()
    with ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(lambda _: post(server, "/predict/slow", good), range(24)))
        fast = list(pool.map(lambda _: post(server, "/predict/echo", good), range(40)))
    for model, responses in (("slow", burst), ("echo", fast)):
        for response in responses:
            expected[model, "v1", str(response.status_code)] += 1
    codes = Counter(r.status_code for r in burst)
    assert codes[429] >= 1 and codes[200] >= 1, codes
    assert {r.status_code for r in fast} == {200}
    for content, code in ((b'{"features": [1, 2, 3]}', 422), (b"not json", 400), (b'{"rows": 1}', 400)):
        assert post(server, "/predict/echo", content).status_code == code
        expected["echo", "v1", str(code)] += 1
    assert post(server, "/predict/echo/versions/v9", good).status_code == 404  # before a version is chosen
    expected["echo", "", "404"] += 1
    # Nothing below may leave a series.
    assert post(server, "/predict/nope", good).status_code == 404
    assert post(server, "/predict/nope/versions/v1", good).status_code == 404
    assert post(server, "/predict/echo/bogus/path", good).status_code == 404
    assert httpx.get(server.url + "/random/path", timeout=5).status_code == 404
    return expected


def check_scrape(scraped: dict[Sample, float], expected: Counter[tuple[str, str, str]]) -> None:
    requests = {
        (dict(labels)["model"], dict(labels)["version"], dict(labels)["code"]): value
        for labels, value in values_of(scraped, "fastserve_requests_total").items()
    }
    assert requests == expected
    models = {dict(labels).get("model") for _, labels in scraped}
    assert models <= {None, "slow", "echo"}, models
    assert {dict(labels).get("version") for _, labels in scraped} <= {None, "", "v1"}
    for model in ("slow", "echo"):
        ok = expected[model, "v1", "200"]
        assert total(scraped, "fastserve_request_duration_seconds_count", model=model) == ok
        assert total(scraped, "fastserve_queue_wait_seconds_count", model=model) == ok
        assert total(scraped, "fastserve_batch_rows_sum", model=model) == ok  # one row per request
        assert total(scraped, "fastserve_predict_duration_seconds_count", model=model) == total(
            scraped, "fastserve_batch_rows_count", model=model
        )
    assert (
        total(scraped, "fastserve_shed_total", model="slow", reason="queue_full")
        == expected["slow", "v1", "429"]
    )
    assert total(scraped, "fastserve_routed_total", model="slow", role="stable") == sum(
        n for (model, _, _), n in expected.items() if model == "slow"
    )
    for name in ("request_duration_seconds", "queue_wait_seconds", "predict_duration_seconds", "batch_rows"):
        assert_histograms_consistent(scraped, "fastserve_" + name)
    assert total(scraped, "fastserve_model_info", model="slow", version="v1", alias="stable") == 1


def assert_counters_never_fall(scrapes: Iterable[dict[Sample, float]]) -> None:
    seen: dict[Sample, float] = {}
    for scraped in scrapes:
        for key, value in scraped.items():
            name = key[0]
            if name.endswith(("_total", "_count", "_sum", "_bucket")):
                assert value >= seen.get(key, 0.0), (key, seen.get(key), value)
                seen[key] = value


@pytest.mark.e2e
def test_two_workers_expose_exact_totals_whichever_answers(serve: Any, tmp_path: Path) -> None:
    server = serve(metrics_repo(tmp_path / "repo"), "--workers", str(WORKERS), trusted_repository=1)
    expected = send_mix(server)
    # Both workers answered some of the requests: the exact totals below are sums across them.
    per_worker = status_of_every_worker(server, WORKERS)
    assert all(s["models"]["echo"]["versions"]["v1"]["requests"] > 0 for s in per_worker.values()), per_worker
    time.sleep(SETTLE_S)
    scrapes = []
    for _ in range(8):
        _, scraped = scrape(server)
        check_scrape(scraped, expected)
        scrapes.append(scraped)
    assert_counters_never_fall(scrapes)

    # A worker killed outright is respawned by Granian, and its counts stay in the totals.
    victim = min(status_of_every_worker(server, WORKERS))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        pids = set(status_of_every_worker(server, WORKERS))
        if victim not in pids and len(pids) == WORKERS:
            break
        assert time.monotonic() < deadline, f"no worker replaced {victim}: {server.output()}"
        time.sleep(0.2)
    wait_for_every_worker(server, WORKERS)
    for _ in range(6):
        _, scraped = scrape(server)
        check_scrape(scraped, expected)
        scrapes.append(scraped)
    more = Counter({("echo", "v1", "200"): 10})
    for _ in range(10):
        assert post(server, "/predict/echo", b'{"features": [0, 0, 0, 0]}').status_code == 200
    time.sleep(SETTLE_S)
    for _ in range(6):
        _, scraped = scrape(server)
        check_scrape(scraped, expected + more)
        scrapes.append(scraped)
    assert_counters_never_fall(scrapes)


@pytest.mark.e2e
def test_the_exposition_passes_promtool(serve: Any, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    server = serve(metrics_repo(tmp_path / "repo"), trusted_repository=1)
    send_mix(server)
    time.sleep(SETTLE_S)
    text, _ = scrape(server)
    assert "fastserve_request_duration_seconds_bucket" in text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


TOKEN = "test-admin-token-0123456789"


@pytest.mark.e2e
def test_deployments_show_in_routed_shadow_info_and_actions(tmp_path: Path) -> None:
    repo = metrics_repo(tmp_path / "repo")
    # echo v2 disagrees with v1 on rows whose first feature is -5.
    write_joblib_model(repo, "echo", "v2", EchoUnless(4, odd_one_out=-5))
    env = server_env(
        repository=repo, trusted_repository=1, admin_token=TOKEN, state_path=tmp_path / "s.sqlite"
    )
    port = free_port()
    with running(serve_command(repo, port, "--workers", str(WORKERS)), env, port, tmp_path) as server:

        def act(**action: object) -> None:
            auth = {"authorization": f"Bearer {TOKEN}"}
            response = httpx.post(f"{server.url}/deploy/echo", json=action, headers=auth, timeout=10)
            assert response.status_code == 200, response.text
            time.sleep(SETTLE_S)  # every worker follows within 50 ms

        act(action="candidate", version="v2", canary=0.5)
        versions = Counter(
            post(server, "/predict/echo", b'{"features": [1, 2, 3, 4]}').headers["x-model-version"]
            for _ in range(40)
        )
        act(action="candidate", version="v2", canary=0.0, shadow=True)
        for first in [-5] * 6 + [1] * 14:
            assert post(server, "/predict/echo", b'{"features": [%d, 0, 0, 0]}' % first).status_code == 200
        cli = [sys.executable, "-m", "fastserve.cli", "deploy", "echo", "promote"]
        subprocess.run(cli, env=env, capture_output=True, timeout=60, check=True)  # no worker sees it
        time.sleep(SETTLE_S)
        for _ in range(4):
            _, scraped = scrape(server)
            routed = {
                (dict(labels)["version"], dict(labels)["role"]): value
                for labels, value in values_of(scraped, "fastserve_routed_total", model="echo").items()
            }
            assert routed == {("v1", "stable"): versions["v1"] + 20, ("v2", "candidate"): versions["v2"]}
            outcomes = {
                dict(labels)["outcome"]: value
                for labels, value in values_of(scraped, "fastserve_shadow_total", model="echo").items()
            }
            assert outcomes == {"agree": 14, "disagree": 6}  # sequential: the copies always had room
            assert values_of(scraped, "fastserve_deploy_actions_total", model="echo") == {
                (("action", "candidate"), ("model", "echo")): 2.0,
                (("action", "promote"), ("model", "echo")): 1.0,
            }
            info = {
                (dict(labels)["version"], dict(labels)["alias"]): value
                for labels, value in values_of(scraped, "fastserve_model_info", model="echo").items()
            }
            assert info == {
                ("v1", "stable"): 0.0,
                ("v2", "stable"): 1.0,
                ("v1", "candidate"): 0.0,
                ("v2", "candidate"): 0.0,
            }
