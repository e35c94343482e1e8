"""What each fastserve mechanism buys, measured over real HTTP on the demo repository.

1. batching on vs off (``--max-batch-rows 1``): RPS, p50/p95/p99, mean batch rows;
2. canary: configured vs observed share of answers per version;
3. shadow: mirrored count, agreement and disagreement rate, drops, and what mirroring costs
   stable's throughput (the candidate predicts on the same core);
4. overload (small ``--max-queue-depth``) at 4x capacity: accepted vs shed, p99 of
   accepted requests, p99 time-to-429, requests lost.

    python -m bench                        # or python -m bench.run
    python -m bench --smoke                # CI: a few seconds per scenario
    python -m bench --target fastapi-batcher   # the same scenarios on the baseline (checks the harness)
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import models, servers
from bench.compute_ceiling import COMPILED, PROCESS, SCIKIT_LEARN
from bench.harness import (
    H2LOAD_MISSING,
    RESULTS_DIR,
    HarnessError,
    Server,
    check_predict,
    digits_status,
    http_post,
    measure,
    per_batch,
    require_wrk,
    run_h2load,
    serving,
    version_totals,
    write_bodies,
    write_body,
)
from bench.local_batch import latency_in_local_batches
from bench.machine import (
    calibrate,
    wait_for_quiet,
)
from bench.report import Recorder, calibration_note, cpu_column, machine_header, start_session, table

TARGETS = ("fastserve", "fastapi-batcher")
FASTSERVE_ONLY = "fastserve only: the baseline has no versions"


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _server(args: argparse.Namespace, name: str, **settings: object) -> Server:
    """The scenario's server: fastserve on the demo repository, or the FastAPI baseline on RF-300."""
    if args.target == "fastserve":
        return servers.fastserve(args.repository, name=name, **settings)
    return servers.fastapi_batcher(models.model_path("rf300"), name=name, **settings)


def batching(args: argparse.Namespace, body: Path, recorder: Recorder) -> str:
    """Batching on (``max_batch_rows`` 64, the default) against off (1), same load."""
    runs = []
    for label, rows in (("on", 64), ("off", 1)):
        server = _server(args, f"{args.target}-batching-{label}", max_batch_rows=rows)
        with serving(server, args.work) as proc:
            check_predict(server, body.read_bytes())
            wait_for_quiet(args.quiet_wait, args.reference_ms)
            result = measure(server, proc, args.connections, args.duration, body, args.warmup)
        record = {"kind": "scenario", "scenario": "batching", "batching": label, "max_batch_rows": rows}
        runs.append(recorder.add({**record, **result}))
    off = next(r["rps"] for r in runs if r["batching"] == "off")
    rows_out = [
        (
            f"batching {r['batching']} (max_batch_rows={r['max_batch_rows']})",
            f"{r['rps']:,.0f}",
            f"{r['rps'] / off:.2f}×" if off else None,
            _ms(r["latency_us"]["p50"]),
            _ms(r["latency_us"]["p95"]),
            _ms(r["latency_us"]["p99"]),
            r["mean_batch_rows"],
            sum(r["non_2xx"].values()) + r["socket_errors"],
            cpu_column(r),
        )
        for r in sorted(runs, key=lambda r: -r["rps"])
    ]
    header = (
        "setting",
        "RPS",
        "vs off",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean batch",
        "failed",
        "CPU % server / wrk / others",
    )
    return (
        f"## 1. Batching, {args.connections} connections\n\n"
        + table(header, rows_out)
        + "\n"
        + calibration_note(runs)
    )


def _deployable(args: argparse.Namespace, name: str) -> tuple[Server, dict[str, str]]:
    """fastserve with /deploy on (a fresh token per run), and the header that authorizes it."""
    token = secrets.token_urlsafe(24)
    server = servers.fastserve(args.repository, name=name)
    server.env["FASTSERVE_ADMIN_TOKEN"] = token
    return server, {"Authorization": f"Bearer {token}"}


def _deploy(server: Server, auth: dict[str, str], **action: object) -> None:
    status, answer = http_post(server.url("/deploy/digits"), json.dumps(action).encode(), headers=auth)
    if status != 200:
        raise HarnessError(f"POST /deploy/digits {action} answered {status}: {answer[:200]!r}")


def _answered(digits: dict[str, Any]) -> dict[str, int]:
    return {version: v.get("requests", 0) for version, v in digits["versions"].items()}


def canary(args: argparse.Namespace, _body: Path, recorder: Recorder) -> str:
    """v2 as candidate with a canary share: the share of answers each version gave, under load."""
    share = args.canary_share
    server, auth = _deployable(args, "fastserve-canary")
    bodies = write_bodies(args.work / "bodies.jsonl")
    with serving(server, args.work) as proc:
        _deploy(server, auth, action="candidate", version="v2", canary=share)
        wait_for_quiet(args.quiet_wait, args.reference_ms)
        before = _answered(digits_status(server))
        result = measure(server, proc, args.connections, args.duration, bodies, args.warmup)
        after = _answered(digits_status(server))
    answered = {version: after[version] - before.get(version, 0) for version in after}
    total = sum(answered.values())
    observed = answered.get("v2", 0) / total if total else 0.0
    # Binomial spread of the candidate's share over `total` independent draws.
    sigma = math.sqrt(share * (1 - share) / total) if total else 0.0
    within = abs(observed - share) <= 4.5 * sigma
    recorder.add(
        {
            "kind": "scenario",
            "scenario": "canary",
            "configured_share": share,
            "observed_share": observed,
            "answered": answered,
            "within_4_5_sigma": within,
            **result,
        }
    )
    rows = [
        ("configured canary share (v2)", f"{share:.3f}"),
        ("observed share of answers from v2", f"{observed:.4f}"),
        ("answers v1 / v2", f"{answered.get('v1', 0):,} / {answered.get('v2', 0):,}"),
        ("within 4.5 binomial sigma", "yes" if within else "NO"),
        ("RPS (mixed versions)", f"{result['rps']:,.0f}"),
        ("p99 ms", _ms(result["latency_us"]["p99"])),
        ("failed", sum(result["non_2xx"].values()) + result["socket_errors"]),
    ]
    return f"## 2. Canary, {args.connections} connections\n\n" + table(("figure", "value"), rows)


def shadow(args: argparse.Namespace, _body: Path, recorder: Recorder) -> str:
    """Stable v1 with v2 mirrored: counts, disagreement, and stable's throughput without and with it.

    Both runs are in one server process, on 500 different digits rows sent in turn, so the
    two versions really disagree on some. The candidate predicts on the server's core too:
    what mirroring costs stable is the candidate's compute, and the table shows it.
    """
    server, auth = _deployable(args, "fastserve-shadow")
    bodies = write_bodies(args.work / "bodies.jsonl")
    runs = {}
    with serving(server, args.work) as proc:
        for label, mirrored in (("off", False), ("on", True)):
            _deploy(server, auth, action="candidate", version="v2", shadow=mirrored)
            wait_for_quiet(args.quiet_wait, args.reference_ms)
            result = measure(server, proc, args.connections, args.duration, bodies, args.warmup)
            runs[label] = recorder.add({"kind": "scenario", "scenario": "shadow", "shadow": label, **result})
        digits = digits_status(server)
    outcomes = {k: int(v) for k, v in digits["shadow_outcomes"].get("v2", {}).items()}
    mirrored_total = sum(outcomes.values())
    compared = outcomes.get("agree", 0) + outcomes.get("disagree", 0)
    disagreement = outcomes.get("disagree", 0) / compared if compared else None
    recorder.add(
        {"kind": "scenario", "scenario": "shadow", "outcomes": outcomes, "disagreement": disagreement}
    )
    off, on = runs["off"], runs["on"]
    rows = [
        (
            "stable RPS, shadow off / on",
            f"{off['rps']:,.0f} / {on['rps']:,.0f} ({on['rps'] / off['rps']:.2f}×)",
        ),
        (
            "stable p99 ms, shadow off / on",
            f"{_ms(off['latency_us']['p99'])} / {_ms(on['latency_us']['p99'])}",
        ),
        ("failed (user requests)", sum(on["non_2xx"].values()) + on["socket_errors"]),
        ("mirrored requests (compared + dropped + errors)", f"{mirrored_total:,}"),
        ("agree / disagree", f"{outcomes.get('agree', 0):,} / {outcomes.get('disagree', 0):,}"),
        ("disagreement rate", f"{disagreement:.3f}" if disagreement is not None else None),
        (
            "dropped (candidate queue had no room) / candidate errors",
            f"{outcomes.get('dropped', 0):,} / {outcomes.get('error', 0):,}",
        ),
    ]
    return f"## 3. Shadow, {args.connections} connections\n\n" + table(("figure", "value"), rows)


def overload(args: argparse.Namespace, body: Path, recorder: Recorder) -> str:
    """A small queue under an open load at 4x the server's capacity: accepted, shed, how fast, lost.

    Capacity is the server's throughput, measured first on the same server with wrk at
    ``--connections``. h2load then offers 4x that rate at a steady pace, over HTTP/2 where
    the server speaks it, so that the load stays open (see ``run_h2load``), and, after
    ``--warmup`` seconds of it, times every request by status. The batch service
    time is the mean predict time per batch during the overload (``/status``). The refusal
    floor then takes the same open load: Granian refusing every request at once, with no
    model and no framework, the least time a 429 can take on this machine. Run once per
    predict path: through scikit-learn's predict RF-300 is the bottleneck, the case load
    shedding is for, in the worker's thread (``--predict-process off``) and in its own
    process (``on``, which the default ``auto`` chooses for RF-300's scikit-learn predict);
    compiled, the model is no longer the bottleneck and 4x capacity is 4x what HTTP can carry.
    """
    depth, batch = args.overload_queue_depth, 64
    sections = []
    # The baseline has scikit-learn's predict only.
    paths = (SCIKIT_LEARN, PROCESS, COMPILED) if args.target == "fastserve" else (SCIKIT_LEARN,)
    for path in paths:
        name = f"{args.target}-overload-{path}"
        settings = {}
        if args.target == "fastserve":
            # Each path named, not left to --predict-process auto, which sends RF-300 to a process.
            settings = {
                "compile_trees": path == COMPILED,
                "predict_process": "on" if path == PROCESS else "off",
            }
        server = _server(args, name, max_queue_depth=depth, max_batch_rows=batch, **settings)
        with serving(server, args.work) as proc:
            check_predict(server, body.read_bytes())
            wait_for_quiet(args.quiet_wait, args.reference_ms)
            capacity = measure(server, proc, args.connections, args.duration, body, args.warmup)
            before = _predict_totals(_digits(server))
            rate = 4 * capacity["rps"]
            log_file = args.work / f"{name}.h2load.tsv"
            url = server.url(server.predict_path)
            result = run_h2load(url, rate, args.duration, body, log_file, args.warmup, server.http2)
            digits = _digits(server)
            after = _predict_totals(digits)
            served_by = digits and digits["versions"]["v1"]["predict"]  # which predict v1 really ran
        floor = _refusal_floor(args, rate, body) if args.target == "fastserve" else None
        statuses = {int(s): n for s, n in result["statuses"].items()}
        accepted, shed = statuses.get(200, 0), statuses.get(429, 0)
        # Lost counts the warm-up too: it is not timed, but every request must get its answer.
        answered = [*result["statuses"].items(), *result["warmup_statuses"].items()]
        lost = sum(n for s, n in answered if int(s) not in (200, 429))
        lost += result["errored"] + result["timeouts"] + result["unanswered"]
        batch_s = per_batch(before, after)
        in_batches = None
        if batch_s:
            in_batches = latency_in_local_batches(log_file.read_text(), args.warmup, batch_s * 1000)
        accepted_p99 = result["latency_ms"].get("200", {}).get("p99")
        shed_p99 = result["latency_ms"].get("429", {}).get("p99")
        recorder.add(
            {
                "kind": "scenario",
                "scenario": "overload",
                "predict": path,
                "served_by": served_by,
                "max_queue_depth": depth,
                "max_batch_rows": batch,
                "capacity_rps": capacity["rps"],
                "accepted": accepted,
                "shed": shed,
                "lost": lost,
                "batch_service_ms": batch_s and round(batch_s * 1000, 2),
                "accepted_p99_ms": accepted_p99,
                "accepted_in_local_batches": in_batches,
                "time_to_429_p99_ms": shed_p99,
                "capacity_run": capacity,
                "refusal_floor": floor,
                **result,
            }
        )
        seconds = result["seconds"]
        rows = [
            (f"capacity (wrk, {args.connections} connections)", f"{capacity['rps']:,.0f}/s"),
            ("offered (4 × capacity) / sent", f"{rate:,.0f}/s / {result['sent_rps']:,.0f}/s"),
            ("timed", f"{seconds:g} s, after {result['warmup_s']} s of warm-up"),
            ("accepted (200)", f"{accepted:,} ({accepted / seconds:,.0f}/s)"),
            ("shed (429)", f"{shed:,} ({shed / seconds:,.0f}/s)"),
            ("lost (other statuses, errors, timeouts, no answer)", lost),
            ("batch service time, ms (mean predict per batch)", batch_s and f"{batch_s * 1000:.2f}"),
            ("p99 of accepted, ms (target ≤ 3 × batch service time)", accepted_p99),
            ("accepted p50 / p99, in batch times of the moment (answer bursts)", _in_batches(in_batches)),
            ("p99 time-to-429, ms (target < 5)", shed_p99),
            ("p50 of accepted / of 429s, ms", _p50s(result)),
        ]
        if floor is not None:
            p50, p99 = (floor["latency_ms"].get("429", {}).get(q, "n/a") for q in ("p50", "p99"))
            rows.append(("refusal floor at the same load: p50 / p99 time-to-429, ms", f"{p50} / {p99}"))
        title = f"### {path} predict ({result['clients']} h2load connections, {result['protocol']})"
        sections.append(f"{title}\n\n" + table(("figure", "value"), rows))
    header = f"## 4. Overload, max_queue_depth={depth}, max_batch_rows={batch}, open load at 4× capacity\n\n"
    return header + "\n\n".join(sections)


def _refusal_floor(args: argparse.Namespace, rate: float, body: Path) -> dict[str, Any]:
    """The same open load on Granian refusing every request at once (``refusal_floor``):
    how fast a 429 can come at that rate on this machine with nothing else on the core."""
    floor = servers.refusal_floor(name=f"refusal-floor-{rate:.0f}rps")
    with serving(floor, args.work):
        log_file = args.work / f"{floor.name}.h2load.tsv"
        url = floor.url(floor.predict_path)
        return run_h2load(url, rate, args.duration, body, log_file, args.warmup, floor.http2)


def _digits(server: Server) -> dict[str, Any] | None:
    """The ``digits`` part of the server's ``/status``; None for a server without one (the baseline)."""
    return digits_status(server) if server.status_path is not None else None


def _predict_totals(digits: dict[str, Any] | None) -> tuple[float, float] | None:
    """(predict seconds, batches) so far across the model's versions, for ``per_batch``."""
    return version_totals(digits["versions"].values(), "predict_seconds") if digits else None


def _in_batches(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "n/a (batches too short to tell their answers apart)"
    interval = figures["burst_interval_ms"]
    return (
        f"{figures['p50']} / {figures['p99']} ({figures['bursts']} bursts of {figures['mean_burst']} answers,"
        f" {interval['p50']} ms apart at p50, {interval['p90']} at p90)"
    )


def _p50s(result: dict[str, Any]) -> str:
    latency = result["latency_ms"]
    return " / ".join(str(latency.get(code, {}).get("p50", "n/a")) for code in ("200", "429"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per run (whole seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run, not measured")
    parser.add_argument("--overload-queue-depth", type=int, default=64)
    parser.add_argument(
        "--quiet-wait", type=float, default=30, help="max seconds to wait for a quiet machine"
    )
    parser.add_argument("--target", choices=TARGETS, default="fastserve")
    parser.add_argument("--canary-share", type=float, default=0.2)
    parser.add_argument(
        "--scenarios",
        default="batching,canary,shadow,overload",
        help="which scenarios to run, comma-separated",
    )
    parser.add_argument("--smoke", action="store_true", help="CI: 1 s runs, no warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.quiet_wait = 1, 0, 0
    try:
        require_wrk()
    except HarnessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    stamp, args.work, recorder, machine = start_session(args.out, prefix="run-")
    report = [f"# fastserve mechanisms ({stamp}, target {args.target})\n", machine_header(machine), ""]
    if args.target == "fastserve":
        if servers.fastserve_command() is None:
            line = "fastserve: skipped, the `fastserve` command is not installed (pip install -e .)"
            recorder.add({"kind": "skipped", "reason": line})
            print(line)
            return 0
        args.repository = servers.fastserve_demo(models.MODELS_DIR / "demo")
    body = write_body(args.work / "body.json")
    args.reference_ms = calibrate()

    chosen = args.scenarios.split(",")
    for name, scenario in (
        ("batching", batching),
        ("canary", canary),
        ("shadow", shadow),
        ("overload", overload),
    ):
        if name not in chosen:
            continue
        if name == "overload" and shutil.which("h2load") is None:
            recorder.add({"kind": "skipped", "scenario": name, "reason": H2LOAD_MISSING})
            report.append(f"## {name}: skipped, {H2LOAD_MISSING}\n")
            continue
        if name in ("canary", "shadow") and args.target != "fastserve":
            recorder.add({"kind": "skipped", "scenario": name, "reason": FASTSERVE_ONLY})
            report.append(f"## {name}: {FASTSERVE_ONLY}\n")
            continue
        print(f"\n{name} ...", flush=True)
        try:
            report.append(scenario(args, body, recorder) + "\n")
        except (HarnessError, subprocess.SubprocessError, OSError) as exc:
            recorder.add({"kind": "error", "scenario": name, "error": str(exc)})
            report.append(f"## {name}: FAILED\n\n{exc}\n")
        print(report[-1], flush=True)

    (args.out / f"run-{stamp}.md").write_text("\n".join(report) + "\n")
    print(f"JSON lines: {recorder.path}\nTable: {args.out / f'run-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
