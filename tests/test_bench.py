"""The bench harness in smoke mode, so that it cannot rot: real servers under real wrk, briefly.

Figures are not judged here (speed is measured in bench/, never asserted in a test): only
that every server started, answered under load and was stopped, and that the records the
README's tables are made from are there. wrk comes from the system (``apt-get install
wrk``, which .ci/run does); without it these tests are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench import peers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"),
]

ROOT = Path(__file__).parent.parent


def _run_bench(module: str, out: Path, *flags: str) -> list[dict[str, Any]]:
    env = dict(os.environ)
    # The harness starts `fastserve` by name: the one installed beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (lines,) = list(out.glob("*.jsonl"))
    return [json.loads(line) for line in lines.read_text().splitlines()]


# Every adapter, and fastserve on both predict paths. fastserve-batch256 and -nometrics are
# the same adapter with one more flag each; leaving them out saves the suite half a minute.
SMOKE_SERVERS = ("fastserve", "fastserve-sklearn", "fastapi-batcher", "litserve", "http-ceiling")


def test_compare_runs_every_server_and_both_ceilings(tmp_path: Path) -> None:
    records = _run_bench("bench.compare", tmp_path, "--servers", ",".join(SMOKE_SERVERS))
    assert not [r for r in records if r["kind"] in ("error", "skipped")], records
    runs = {(r["suite"], r["server"]): r for r in records if r["kind"] == "http"}
    assert {server for suite, server in runs if suite == "rf300"} == set(SMOKE_SERVERS), runs
    for server in SMOKE_SERVERS:
        run = runs["rf300", server]
        assert run["ok"] > 0 and run["socket_errors"] == 0, run
    assert runs["rf300", "fastserve"]["mean_batch_rows"] >= 1
    assert runs["rf300", "fastserve"]["ceiling_beside"]["rows_per_s"] > 0
    assert runs["logreg", "fastserve"]["ok"] > 0
    # Each server is compared with the ceiling of the predict it really ran (its /status says).
    predicts = {server: run["predict"] for (suite, server), run in runs.items() if suite == "rf300"}
    assert predicts["fastserve"] == "compiled", predicts
    # RF-300's scikit-learn predict holds the GIL 20+ ms a batch: --predict-process auto moves it.
    assert predicts["fastserve-sklearn"] == "process" and predicts["fastapi-batcher"] == "scikit-learn"
    assert runs["logreg", "fastserve"]["predict"] == "scikit-learn"
    for path in ("scikit-learn", "compiled"):
        ceiling = [
            r
            for r in records
            if r["kind"] == "compute_ceiling" and r["suite"] == "rf300" and r["predict"] == path
        ]
        assert [r["batch_rows"] for r in ceiling] == [1, 8, 16, 32, 64, 128, 256], path
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))


def test_mechanism_scenarios_run_and_lose_nothing(tmp_path: Path) -> None:
    records = _run_bench("bench", tmp_path)
    assert not [r for r in records if r["kind"] == "error"], records
    scenarios = [r for r in records if r["kind"] == "scenario"]
    batching = {r["batching"]: r for r in scenarios if r["scenario"] == "batching"}
    assert batching["on"]["max_batch_rows"] == 64 and batching["off"]["mean_batch_rows"] == 1.0
    (canary,) = [r for r in scenarios if r["scenario"] == "canary"]
    assert canary["answered"]["v2"] > 0 and canary["within_4_5_sigma"], canary
    shadow = {r.get("shadow"): r for r in scenarios if r["scenario"] == "shadow"}
    assert shadow["on"]["ok"] > 0 and shadow["off"]["ok"] > 0
    outcomes = shadow[None]["outcomes"]
    assert outcomes["agree"] > 0 and outcomes["disagree"] > 0, outcomes
    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client): no overload scenario")
    overload = {r["predict"]: r for r in scenarios if r["scenario"] == "overload"}
    assert set(overload) == {"scikit-learn", "process", "compiled"}, overload
    for path, run in overload.items():
        assert run["served_by"] == path, run  # the server ran the predict the record names
        assert run["accepted"] > 0 and run["lost"] == 0, run
        # Multiplexed, so that the load stays open (see harness.run_h2load).
        assert run["protocol"] == run["refusal_floor"]["protocol"] == "h2c", run
        # The refusal floor (Granian refusing all, no model) took the same open load.
        assert run["refusal_floor"]["statuses"].get("429", 0) > 0, run["refusal_floor"]
    # Through scikit-learn's predict RF-300 is the bottleneck: 4x its capacity must be shed.
    assert overload["scikit-learn"]["shed"] > 0, overload["scikit-learn"]
    # A compiled batch is too short for its answers to stand apart as a burst (bench/local_batch.py).
    assert overload["compiled"]["accepted_in_local_batches"] is None
    assert "accepted_in_local_batches" in overload["process"]


def test_tabular_checks_and_measures_fastserve_mlserver_and_the_churn_ceiling(tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="the churn pipeline needs pandas: pip install -e '.[pandas]'")
    try:  # about 45 s the first time; kept, and reused while its requirements are the same
        peers.install("mlserver")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"could not make MLServer's environment (python -m bench.peers install mlserver): {exc}")
    records = _run_bench("bench.tabular", tmp_path)
    assert not [r for r in records if r["kind"] == "error"], records
    runs = {(r["suite"], r["server"], tuple(r["outputs"])): r for r in records if r["kind"] == "http"}
    checks = {(r["suite"], r["server"]): r for r in records if r["kind"] == "check"}
    for suite in ("churn", "digits"):
        # Answers equal the offline estimator's (labels and probabilities) before any load.
        check = checks[suite, "mlserver"]
        assert check["predict_equal"] and check["body_equal"], check
        assert check["predict_proba_max_abs_diff"] <= 1e-12, check
        run = runs[suite, "mlserver", ("predict",)]
        assert run["ok"] > 0 and run["socket_errors"] == 0 and not run["non_2xx"], run
        # Adaptive batching on, counted by the runtime; the ceiling measured at that batch.
        assert run["mean_batch_rows"] >= 1 and run["ceiling_beside"]["rows_per_s"] > 0, run
    ceiling = [r for r in records if r["kind"] == "compute_ceiling" and r["suite"] == "churn"]
    assert [r["batch_rows"] for r in ceiling] == [1, 8, 16, 32, 64, 128, 256]
    (versions,) = [r["mlserver"] for r in records if r["kind"] == "peer_versions"]
    assert {"mlserver", "mlserver-sklearn", "scikit-learn"} <= set(versions), versions
    # fastserve on the churn pipeline's named rows, and digits v1 with and without probabilities.
    for key in (("churn", "fastserve", ("predict",)), ("digits", "fastserve", ("predict",))):
        assert runs[key]["ok"] > 0 and runs[key]["socket_errors"] == 0 and not runs[key]["non_2xx"], key
    proba = runs["digits", "fastserve", ("predict_proba",)]
    assert proba["ok"] > 0 and not proba["non_2xx"], proba
    fastserve_checks = [r for r in records if r["kind"] == "check" and r["server"] == "fastserve"]
    assert len(fastserve_checks) == 3 and all(r["body_equal"] for r in fastserve_checks), fastserve_checks
    assert all(r.get("predict_equal", True) for r in fastserve_checks), fastserve_checks
    assert [
        r["predict_proba_max_abs_diff"] for r in fastserve_checks if "predict_proba_max_abs_diff" in r
    ] == [0.0]
    assert not [r for r in records if r["kind"] == "skipped"], records
    assert list(tmp_path.glob("tabular-*.md"))


def test_v2_measures_the_native_route_and_both_v2_forms(tmp_path: Path) -> None:
    records = _run_bench("bench.v2", tmp_path)
    assert not [r for r in records if r["kind"] in ("error", "skipped")], records
    runs = {r["form"]: r for r in records if r["kind"] == "http"}
    assert set(runs) == {"native JSON", "V2 JSON", "V2 binary"}
    for form, run in runs.items():
        # Every request answered 200: a V2 body the server refused would show here as non-2xx.
        assert run["ok"] > 0 and run["socket_errors"] == 0 and not run["non_2xx"], (form, run)
    assert list(tmp_path.glob("v2-*.md"))
