"""Tabular models over real HTTP: the churn pipeline against MLServer, and class probabilities.

One run, every server alone on the server core in turn, wrk at ``-c`` connections (64):

1. **churn**, the demo's Pipeline on a mixed-type DataFrame (``fastserve.demo``): fastserve on
   named rows, MLServer's scikit-learn runtime on its pandas codec (``content_type: "pd"``,
   adaptive batching on, 64 rows / 2 ms as fastserve), and the pipeline's compute ceiling
   (its predict on DataFrame batches in a loop, no HTTP).
2. **digits v1** (RF-300): fastserve with ``"outputs": ["predict_proba"]`` against predict
   only, on the same server one after the other, and MLServer on its V2 tensor body.

Before any load, each server's answers are compared with the offline estimator's on the same
rows (the body wrk sends among them): a server that answers differently is not measured. A
server that refuses a model or an output (as fastserve did before issue 16: it failed the
churn pipeline's warm-up and ignored ``outputs``) is skipped with its reason, and the rest of
the run goes on. MLServer runs from its own environment (``python -m bench.peers install
mlserver``); without it, it is skipped the same way. The tables end with issue 16's targets.

    python -m bench.tabular                  # 64 connections, 10 s per run
    python -m bench.tabular --smoke          # CI: 1 s runs at 16 connections
    python -m bench.tabular --servers mlserver --mlserver-workers 1   # MLServer's default: a worker process
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import bodies, models, peers, servers
from bench.bodies import Case, check_answers, write_json
from bench.compare import compute_ceiling, measure_clean
from bench.compute_ceiling import CHURN, DIGITS, SCIKIT_LEARN, rows_per_s_at
from bench.harness import (
    RESULTS_DIR,
    HarnessError,
    NotServed,
    Record,
    Server,
    require_wrk,
    serving,
)
from bench.machine import calibrate, wait_for_quiet
from bench.report import Recorder, calibration_note, ceiling_table, cpu_column, start_session, table

MLSERVER = "mlserver"
SERVERS = ("fastserve", MLSERVER)
PROBA_TARGET = 0.85  # issue 16: predict_proba within 15% of predict-only throughput
CHURN_TARGET = 3.0  # issue 16: at least 3x MLServer's throughput on churn, with a lower p99


# --- runs -------------------------------------------------------------------------------


@contextmanager
def _skipping(recorder: Recorder, suite: str, name: str, skipped: list[str]) -> Iterator[None]:
    """A server that refuses (NotServed) is skipped with its reason; one that fails is an error."""
    try:
        yield
    except NotServed as exc:
        recorder.add({"kind": "skipped", "suite": suite, "server": name, "reason": str(exc)})
        skipped.append(f"{name} on {suite}: skipped, {exc}")
        print(f"  {skipped[-1]}", flush=True)
    except (HarnessError, subprocess.SubprocessError, OSError) as exc:
        recorder.add({"kind": "error", "suite": suite, "server": name, "error": str(exc)})
        skipped.append(f"{name} on {suite}: FAILED, {exc}")
        print(f"  {skipped[-1]}", flush=True)


def _run(
    server: Server,
    proc: subprocess.Popen[bytes],
    case: Case,
    estimator: Any,
    args: argparse.Namespace,
    recorder: Recorder,
    predict: str = SCIKIT_LEARN,
) -> Record:
    """Check the answers, then load one server with one case's body; the run's record."""
    recorder.add(check_answers(server, case, estimator))
    body = write_json(args.work / f"{server.name}-{case.suite}-{'-'.join(case.outputs)}.json", case.body)
    result = measure_clean(server, proc, args.connections, args, body)
    result.update(suite=case.suite, body=case.label, outputs=list(case.outputs), predict=predict)
    result.update(_ceiling_beside(result, case, args))
    record = recorder.add({"kind": "http", **result})
    lat, batch = result["latency_us"], result["mean_batch_rows"] or "n/a"
    print(
        f"  {server.name:<10} {case.suite:<6} {case.label:<28} {result['rps']:>8,.0f} RPS  "
        f"p50 {lat['p50'] / 1000:7.2f} ms  p99 {lat['p99'] / 1000:7.2f} ms  batch {batch}  "
        f"CPU % server/wrk/others {cpu_column(result)}",
        flush=True,
    )
    return record


def _ceiling_beside(result: Record, case: Case, args: argparse.Namespace) -> Record:
    """The compute ceiling at the batch the run achieved, right after it (see compare.py).

    For scikit-learn's predict only: churn's pipeline, and RF-300 where the server calls
    scikit-learn's predict (MLServer). fastserve's compiled RF-300 predict_proba has no ceiling here.
    """
    batch = result.get("mean_batch_rows")
    if not batch or case.outputs != ("predict",) or result.get("predict", SCIKIT_LEARN) != SCIKIT_LEARN:
        return {}
    model, rows = (args.churn_model, CHURN) if case.suite == CHURN else (args.rf300_model, DIGITS)
    size = max(1, round(batch))
    (point,) = compute_ceiling(model, args.ceiling_seconds, [size], SCIKIT_LEARN, rows)
    return {"ceiling_beside": {"batch_rows": size, "rows_per_s": point["rows_per_s"]}}


def _fastserve_predict(server: Server) -> str:
    """Which predict fastserve runs for the model it serves (its /status says)."""
    from bench.harness import http_get

    status, text = http_get(server.url("/status"))
    page = json.loads(text) if status == 200 else {}
    for entry in page.get("models", {}).values():
        for info in entry.get("versions", {}).values():
            if "predict" in info:
                return str(info["predict"])
    return "n/a"


# --- tables -----------------------------------------------------------------------------


def _share(run: Record, ceiling: Sequence[Record] | None) -> str:
    beside, batch = run.get("ceiling_beside"), run.get("mean_batch_rows")
    compute = beside["rows_per_s"] if beside else None
    if compute is None and ceiling and batch and run.get("predict") == SCIKIT_LEARN:
        compute = rows_per_s_at(ceiling, batch)
    return f"{100 * run['rps'] / compute:.0f}%" if compute else "n/a"


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}×" if base else "n/a"


_HEADER = (
    "server", "body", "predict", "RPS", "vs {base}", "p50 ms", "p99 ms", "mean batch",
    "of compute ceiling @batch", "failed", "CPU % server / wrk / others",
)  # fmt: skip


def _row(run: Record, base: float | None, ceiling: Sequence[Record]) -> tuple[object, ...]:
    lat, batch = run["latency_us"], run["mean_batch_rows"]
    return (
        run["server"],
        run["body"],
        run.get("predict", "n/a"),
        f"{run['rps']:,.0f}",
        _ratio(run["rps"], base),
        f"{lat['p50'] / 1000:.2f}",
        f"{lat['p99'] / 1000:.2f}",
        "n/a" if batch is None else f"{batch:.1f}",
        _share(run, ceiling),
        sum(run["non_2xx"].values()) + run["socket_errors"],
        cpu_column(run),
    )


def churn_table(runs: Sequence[Record], ceiling: Sequence[Record]) -> str:
    """Fastest first, with the compute ceiling at a full batch (64 rows) as a row of its own."""
    base = next((r["rps"] for r in runs if r["server"].startswith(MLSERVER)), None)
    rows = [_row(r, base, ceiling) for r in sorted(runs, key=lambda r: -r["rps"])]
    full = next((c for c in ceiling if c["batch_rows"] == 64), None)
    if full:
        per_call = f"{full['s_per_call_mean'] * 1000:.2f} a call"
        rate = full["rows_per_s"]
        body = "DataFrame of 64 rows, no HTTP"
        rows.append(("compute ceiling", body, SCIKIT_LEARN, f"{rate:,.0f}", _ratio(rate, base), per_call))
        rows[-1] += ("", "64", "100%", "", "")
    out = table([h.format(base="MLServer") for h in _HEADER], rows)
    fastserve = next((r for r in runs if r["server"] == "fastserve"), None)
    mlserver = next((r for r in runs if r["server"].startswith(MLSERVER)), None)
    if fastserve and mlserver:
        ratio = fastserve["rps"] / mlserver["rps"]
        lower_p99 = fastserve["latency_us"]["p99"] < mlserver["latency_us"]["p99"]
        verdict = "met" if ratio >= CHURN_TARGET and lower_p99 else "NOT met"
        p99 = "lower" if lower_p99 else "NOT lower"
        out += (
            f"\n\nfastserve / MLServer: {ratio:.2f}× the throughput, p99 {p99} "
            f"(target ≥ {CHURN_TARGET:.0f}× with a lower p99: {verdict})."
        )
    return out + "\n" + calibration_note(runs)


def digits_table(runs: Sequence[Record], ceiling: Sequence[Record]) -> str:
    """fastserve's predict_proba against its predict-only run, and MLServer beside them."""
    fastserve = [r for r in runs if r["server"] == "fastserve"]
    base = next((r["rps"] for r in fastserve if r["outputs"] == ["predict"]), None)
    proba = next((r["rps"] for r in fastserve if "predict_proba" in r["outputs"]), None)
    rows = [_row(r, base, ceiling) for r in sorted(runs, key=lambda r: -r["rps"])]
    out = table([h.format(base="fastserve predict only") for h in _HEADER], rows)
    if proba and base:
        verdict = "met" if proba / base >= PROBA_TARGET else "NOT met"
        out += (
            f"\n\npredict_proba / predict only: {proba / base:.2f} (target ≥ {PROBA_TARGET:.2f}: {verdict})."
        )
    return out + "\n" + calibration_note(runs)


# --- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per run (whole seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run, not measured")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a run that others disturbed")
    parser.add_argument(
        "--quiet-wait", type=float, default=30, help="max seconds to wait for a quiet machine"
    )
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        default=0,
        help="MLServer's parallel_workers (0: inference in its process)",
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: fastserve, mlserver")
    parser.add_argument("--smoke", action="store_true", help="CI: 1 s runs at 16 connections, short ceiling")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.servers = [n for n in args.servers.split(",") if n]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    if args.smoke:
        args.connections, args.duration, args.warmup, args.ceiling_seconds = 16, 1, 0, 0.2
        args.retries, args.quiet_wait = 0, 0
    try:
        require_wrk()
    except HarnessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    try:
        import pandas  # noqa: F401
    except ImportError:
        print("bench: the churn pipeline needs pandas: pip install -e '.[bench,pandas]'", file=sys.stderr)
        return 1

    stamp, args.work, recorder, machine = start_session(args.out, prefix="tabular-")
    peer_versions = recorder.add({"kind": "peer_versions", MLSERVER: peers.versions(MLSERVER)})[MLSERVER]
    args.churn_model = models.churn_model_path()
    args.demo = servers.fastserve_demo(models.MODELS_DIR / "demo") if servers.fastserve_command() else None
    # The RF-300 fastserve serves as digits v1; MLServer gets a joblib copy of the same file.
    args.rf300_model = (
        args.demo / "digits" / "v1" / "model.skops" if args.demo else models.model_path("rf300")
    )
    churn_model, rf300 = models.load(args.churn_model), models.load(args.rf300_model)
    cases = bodies.cases()

    versions = ", ".join(f"{k} {v}" for k, v in peer_versions.items()) or peers.missing(MLSERVER)
    report = [f"# Tabular models, fastserve and MLServer ({stamp})\n", _header(machine, versions), ""]
    wait_for_quiet(args.quiet_wait)
    args.reference_ms = recorder.add({"kind": "calibration", "calibration_ms": calibrate()})["calibration_ms"]
    print("\ncompute ceiling, churn pipeline, DataFrame batches (core 0, no HTTP):", flush=True)
    ceiling = [
        recorder.add({"suite": CHURN, **r})
        for r in compute_ceiling(args.churn_model, args.ceiling_seconds, rows=CHURN)
    ]
    print(ceiling_table(ceiling), flush=True)

    runs: list[Record] = []
    skipped: list[str] = []
    print(f"\nchurn and digits v1, {args.connections} connections:", flush=True)
    if "fastserve" in args.servers:
        runs += _fastserve_runs(args, cases, churn_model, rf300, recorder, skipped)
    if MLSERVER in args.servers:
        runs += _mlserver_runs(args, cases, churn_model, rf300, recorder, skipped)

    churn_runs = [r for r in runs if r["suite"] == CHURN]
    digits_runs = [r for r in runs if r["suite"] == DIGITS]
    settings = (
        f"wrk -t1 -c{args.connections}, {args.duration} s per run after {args.warmup} s warm-up, "
        "one row per request, server on core 0, wrk on core 1"
    )
    report += [
        "## Compute ceiling, churn pipeline (DataFrame batches, one core)\n",
        ceiling_table(ceiling),
        "",
        f"## churn (Pipeline on a mixed-type DataFrame), {args.connections} connections\n\n{settings}.\n",
        churn_table(churn_runs, ceiling),
        "",
        f"## digits v1 (RF-300), predict_proba against predict only, {args.connections} connections\n",
        f"{settings}.\n",
        digits_table(digits_runs, []),
        "",
    ]
    if skipped:
        report += ["## Not measured\n", *[f"- {line}" for line in skipped], ""]
    text = "\n".join(report)
    (args.out / f"tabular-{stamp}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nJSON lines: {recorder.path}\nTable: {args.out / f'tabular-{stamp}.md'}")
    return 0


MISSING_FASTSERVE = "the `fastserve` command is not installed (pip install -e .)"


def _header(machine: Record, peer_versions: str) -> str:
    from bench.report import machine_header

    return f"{machine_header(machine)}  \nMLServer's environment: {peer_versions}."


def _fastserve_runs(
    args: argparse.Namespace,
    cases: dict[str, Case],
    churn_model: Any,
    rf300: Any,
    recorder: Recorder,
    skipped: list[str],
) -> list[Record]:
    """fastserve on the churn repository, then on the demo's digits: predict only, then predict_proba."""
    if servers.fastserve_command() is None or args.demo is None:
        recorder.add({"kind": "skipped", "server": "fastserve", "reason": MISSING_FASTSERVE})
        skipped.append(f"fastserve: skipped, {MISSING_FASTSERVE}")
        return []
    runs: list[Record] = []
    churn = servers.fastserve(models.churn_repository(), "fastserve")
    server = dataclasses.replace(churn, predict_path=f"/predict/{CHURN}")
    with _skipping(recorder, CHURN, "fastserve", skipped), serving(server, args.work / CHURN) as proc:
        predict = _fastserve_predict(server)
        runs.append(_run(server, proc, cases["fastserve-churn"], churn_model, args, recorder, predict))
    server = servers.fastserve(args.demo, "fastserve")
    with _skipping(recorder, DIGITS, "fastserve", skipped), serving(server, args.work / DIGITS) as proc:
        predict = _fastserve_predict(server)
        runs.append(_run(server, proc, cases["fastserve-digits"], rf300, args, recorder, predict))
        case = cases["fastserve-digits-proba"]
        runs.append(_run(server, proc, case, rf300, args, recorder, predict))
    return runs


def _mlserver_runs(
    args: argparse.Namespace,
    cases: dict[str, Case],
    churn_model: Any,
    rf300: Any,
    recorder: Recorder,
    skipped: list[str],
) -> list[Record]:
    """One MLServer process serving both models, each measured in turn."""
    if peers.executable(MLSERVER, "mlserver") is None:
        reason = peers.missing(MLSERVER)
        recorder.add({"kind": "skipped", "server": MLSERVER, "reason": reason})
        skipped.append(f"{MLSERVER}: skipped, {reason}")
        print(f"  {skipped[-1]}", flush=True)
        return []
    repository = servers.write_mlserver_repository(
        args.work / "mlserver-repository", {CHURN: churn_model, DIGITS: rf300}
    )
    server = servers.mlserver(repository, CHURN, parallel_workers=args.mlserver_workers)
    runs: list[Record] = []
    with _skipping(recorder, f"{CHURN}, {DIGITS}", MLSERVER, skipped), serving(server, args.work) as proc:
        for suite, estimator in ((CHURN, churn_model), (DIGITS, rf300)):
            model_server = dataclasses.replace(
                server, predict_path=f"/v2/models/{suite}/infer", stats_file=repository / f"{suite}.stats"
            )
            with _skipping(recorder, suite, MLSERVER, skipped):
                runs.append(_run(model_server, proc, cases[f"mlserver-{suite}"], estimator, args, recorder))
    return runs


if __name__ == "__main__":
    sys.exit(main())
