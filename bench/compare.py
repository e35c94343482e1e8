"""fastserve against its peers and the two ceilings: same model, same body, same wrk settings.

Each server runs in turn, alone, in its own process pinned to core 0; wrk runs on core 1
with one thread. RF-300 (digits v1) is the model; a trivial LogisticRegression run then
exposes fastserve's own overhead against the HTTP ceiling.

    python -m bench.compare                  # 16, 64, 256 connections, 10 s each
    python -m bench.compare --smoke          # CI: 1 s at 16 connections
    python -m bench.compare -c 64 -d 10 --servers fastapi-batcher,litserve,http-ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import models, servers
from bench.compute_ceiling import BATCH_SIZES, COMPILED, DIGITS, PROCESS, SCIKIT_LEARN
from bench.harness import (
    RESULTS_DIR,
    HarnessError,
    Record,
    Server,
    check_predict,
    digits_status,
    measure,
    require_wrk,
    serving,
    write_body,
)
from bench.machine import (
    SERVER_CORE,
    SINGLE_THREAD_ENV,
    SLOW_FACTOR,
    calibrate,
    pinned,
    wait_for_quiet,
)
from bench.report import (
    HTTP_CEILING,
    NOISY_PCT,
    ceiling_table,
    cpu_column,
    http_table,
    machine_header,
    noise,
    plot,
    start_session,
)

# fastserve-batch256: the same server with max_batch_rows=256, to show throughput rising
# with the batch where there are enough requests in flight to fill it (c=256). On the compiled
# predict HTTP sets the throughput, so fastserve-sklearn-batch256 shows the same where the
# model's fixed cost per call does (RF-300 on scikit-learn: 31 ms for 64 rows, 45 ms for 256).
# fastserve-nometrics: the same server with --no-metrics, to show what metrics cost.
# fastserve-sklearn: the same server calling scikit-learn's predict, as the peers do, to show
# what is the server's doing and what is the compiled trees' (and the server's overhead
# against scikit-learn's ceiling). It runs where --predict-process auto puts it: for RF-300,
# in a predict process (/status says which).
VARIANTS: dict[str, dict[str, object]] = {
    "fastserve": {},
    "fastserve-sklearn": {"compile_trees": False},
    "fastserve-batch256": {"max_batch_rows": 256},
    "fastserve-sklearn-batch256": {"compile_trees": False, "max_batch_rows": 256},
    "fastserve-nometrics": {"metrics": False},
}
SERVERS = (*VARIANTS, "fastapi-batcher", "litserve", "http-ceiling")
MISSING_FASTSERVE = "the `fastserve` command is not installed (pip install -e .)"


def compute_ceiling(
    model: Path,
    seconds: float,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    predict: str = SCIKIT_LEARN,
    rows: str = DIGITS,
) -> list[Record]:
    """The compute ceiling of ``predict`` (a path, see compute_ceiling.py) on batches of ``rows``
    (digits or churn) in its own process, pinned to the servers' core."""
    argv = pinned(SERVER_CORE, [sys.executable, "-m", "bench.compute_ceiling", str(model)])
    argv += ["--seconds", str(seconds), "--batch-sizes", ",".join(map(str, batch_sizes))]
    argv += ["--predict", predict, "--rows", rows]
    env = {**os.environ, **SINGLE_THREAD_ENV}
    timeout = 120 + 30 * seconds
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def measure_clean(
    server: Server, proc: subprocess.Popen[bytes], connections: int, args: argparse.Namespace, body: Path
) -> Record:
    """``measure`` on a quiet, full-speed machine; a disturbed run is run again (``--retries``).

    Disturbed: others took more than ``NOISY_PCT`` of the server's core, or the host ran
    the VM slower than the best calibration seen so far (``args.reference_ms``).
    """
    for attempt in range(1, args.retries + 2):
        waited = wait_for_quiet(args.quiet_wait, args.reference_ms)
        result = measure(server, proc, connections, args.duration, body, args.warmup)
        result.update(attempt=attempt, waited_for_quiet_s=waited)
        slow = result["calibration_ms"] > args.reference_ms * SLOW_FACTOR
        args.reference_ms = min(args.reference_ms, result["calibration_ms"])
        if noise(result) <= NOISY_PCT and not slow:
            break
        print(
            f"  {server.name} c={connections}: disturbed (others took {noise(result):.0f}% of the server's "
            f"core; calibration {result['calibration_ms']:.0f} ms against {args.reference_ms:.0f} ms)",
            flush=True,
        )
    return result


def _ceiling_beside(result: Record, args: argparse.Namespace) -> Record:
    """The compute ceiling at the batch this run achieved, measured right after it.

    This VM's speed drifts by up to 2x within minutes: a ceiling measured once, at the start,
    can come from another phase than the run it is compared with. The server is idle now
    (its predict thread waits), so the ceiling has the core to itself.
    """
    batch = result.get("mean_batch_rows")
    if not batch or args.model_path is None:
        return {}
    size = max(1, round(batch))
    (point,) = compute_ceiling(args.model_path, args.ceiling_seconds, [size], result["predict"])
    return {"ceiling_beside": {"batch_rows": size, "rows_per_s": point["rows_per_s"]}}


def predict_path(server: Server) -> str:
    """Which predict the server runs: fastserve says on /status; the peers call scikit-learn's."""
    if server.name == HTTP_CEILING:
        return "none"
    if server.status_path is None:
        return SCIKIT_LEARN
    path: str = digits_status(server)["versions"]["v1"]["predict"]
    return path


def run_server(
    server: Server, args: argparse.Namespace, body: Path, log_dir: Path, record: Callable[[Record], Record]
) -> list[Record]:
    """Every concurrency against one server; a server that fails is reported, not fatal."""
    runs = []
    try:
        with serving(server, log_dir) as proc:
            sample = check_predict(server, body.read_bytes())
            predict = predict_path(server)
            for connections in args.concurrency:
                result = measure_clean(server, proc, connections, args, body)
                result["predict"] = predict
                result.update(_ceiling_beside(result, args))
                runs.append(record({"kind": "http", "suite": args.suite, "sample": sample, **result}))
                lat, batch = result["latency_us"], result["mean_batch_rows"] or "n/a"
                print(
                    f"  {server.name:<16} c={connections:<4} {result['rps']:>9,.0f} RPS  "
                    f"p50 {lat['p50'] / 1000:7.2f} ms  p99 {lat['p99'] / 1000:7.2f} ms  batch {batch}  "
                    f"CPU % server/wrk/others {cpu_column(result)}",
                    flush=True,
                )
    except (HarnessError, subprocess.SubprocessError, OSError) as exc:
        record({"kind": "error", "suite": args.suite, "server": server.name, "error": str(exc)})
        print(f"  {server.name}: FAILED: {exc}", flush=True)
    return runs


def _adapters(names: list[str], model_name: str, work: Path) -> list[Server | str]:
    """The servers to run on ``model_name``; a string where a server must be skipped, saying why."""
    model = models.model_path(model_name)
    chosen: list[Server | str] = []
    for name in names:
        if name.startswith("fastserve"):
            if servers.fastserve_command() is None:
                chosen.append(f"{name}: skipped, {MISSING_FASTSERVE}")
                continue
            if model_name == "rf300":
                repo = servers.fastserve_demo(models.MODELS_DIR / "demo")
            else:
                repo = models.repository(model_name)
            chosen.append(servers.fastserve(repo, name, **VARIANTS[name]))
        elif name == "fastapi-batcher":
            chosen.append(servers.fastapi_batcher(model))
        elif name == "litserve":
            chosen.append(servers.litserve(model, work))
        elif name == "http-ceiling":
            chosen.append(servers.http_ceiling())
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--concurrency", default="16,64,256", help="comma-separated wrk connections")
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per run (whole seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run, not measured")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a run that others disturbed")
    parser.add_argument(
        "--quiet-wait", type=float, default=30, help="max seconds to wait for a quiet machine"
    )
    parser.add_argument("--no-trivial", action="store_true", help="skip the LogisticRegression run")
    parser.add_argument("--smoke", action="store_true", help="CI: 1 s runs at 16 connections, short ceiling")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.duration, args.warmup, args.ceiling_seconds = "16", 1, 0, 0.2
        args.retries, args.quiet_wait = 0, 0
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    names = [n for n in args.servers.split(",") if n]
    unknown = set(names) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    try:
        require_wrk()
    except HarnessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    stamp, work, recorder, machine = start_session(args.out)
    body = write_body(work / "body.json")

    report = [f"# fastserve vs peers ({stamp})\n", machine_header(machine), ""]
    settings = (
        f"wrk -t1, {args.duration} s per run after {args.warmup} s warm-up, server on core 0, wrk on core 1"
    )

    wait_for_quiet(args.quiet_wait)
    calibration = recorder.add({"kind": "calibration", "calibration_ms": calibrate()})["calibration_ms"]
    args.reference_ms = calibration
    ceilings: dict[str, list[Record]] = {}
    for predict in (SCIKIT_LEARN, COMPILED):
        print(f"\ncompute ceiling, RF-300, {predict} predict (core 0, no HTTP):", flush=True)
        ceilings[predict] = [
            recorder.add({"suite": "rf300", **r})
            for r in compute_ceiling(models.model_path("rf300"), args.ceiling_seconds, predict=predict)
        ]
        print(ceiling_table(ceilings[predict]))
        report += [
            f"## Compute ceiling, RF-300, {predict} predict (full batches, one core)\n",
            ceiling_table(ceilings[predict]),
            "",
        ]
    ceilings[PROCESS] = ceilings[SCIKIT_LEARN]  # the predict process runs scikit-learn's predict
    report.append(f"Core-0 calibration just before: {calibration:.0f} ms.\n")

    args.suite, args.model_path = "rf300", models.model_path("rf300")
    print("\nRF-300 (digits v1), one JSON row per request:", flush=True)
    runs = []
    for server in _adapters(names, "rf300", work):
        if isinstance(server, str):
            recorder.add({"kind": "skipped", "suite": args.suite, "reason": server})
            print(f"  {server}", flush=True)
            continue
        runs += run_server(server, args, body, work, recorder.add)
    report += [f"## RF-300 (digits v1), one JSON row per request\n\n{settings}.", http_table(runs, ceilings)]
    report.append("")
    png = None
    if runs:
        png = plot(runs, args.out / f"{stamp}.png", f"RF-300, 1 worker on 1 core; {machine['cpu']}")

    if not args.no_trivial and {"fastserve", "http-ceiling"} & set(names):
        args.suite, args.model_path = "logreg", models.model_path("logreg")
        print("\ntrivial model (LogisticRegression): fastserve against the HTTP ceiling:", flush=True)
        trivial_ceiling = {
            SCIKIT_LEARN: [
                recorder.add({"suite": "logreg", **r})
                for r in compute_ceiling(models.model_path("logreg"), args.ceiling_seconds)
            ]
        }
        # The HTTP ceiling has no model: its RF-300 runs are its trivial-model runs too.
        trivial = [{**r, "suite": "logreg"} for r in runs if r["server"] == "http-ceiling"]
        trivial_servers = [n for n in names if n in ("fastserve", "fastserve-nometrics")]
        for server in _adapters(trivial_servers, "logreg", work):
            if isinstance(server, str):
                print(f"  {server}", flush=True)
                continue
            trivial += run_server(server, args, body, work, recorder.add)
        report += [
            f"## Trivial model (LogisticRegression): fastserve's own overhead\n\n{settings}.",
            http_table(trivial, trivial_ceiling),
            "",
        ]

    text = "\n".join(report)
    (args.out / f"{stamp}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nJSON lines: {recorder.path}\nTable: {args.out / f'{stamp}.md'}")
    print(f"Plot: {png}" if png else "Plot: none (no runs, or matplotlib missing: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
