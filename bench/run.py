"""What each fastserve mechanism buys, measured over real HTTP on the demo repository.

1. batching on vs off (``--max-batch-rows 1``): RPS, p50/p95/p99, mean batch rows;
2. canary: configured vs observed share per version;   } need the deployment issue (#4):
3. shadow: mirrored count and disagreement rate;        } they say so, with no figure;
4. overload (small ``--max-queue-depth``) at 4x capacity: accepted vs shed, p99 of
   accepted requests, p99 time-to-429, requests lost.

    python -m bench                        # or python -m bench.run
    python -m bench --smoke                # CI: a few seconds per scenario
    python -m bench --target fastapi-batcher   # the same scenarios on the baseline (checks the harness)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import models, servers
from bench.harness import (
    RESULTS_DIR,
    HarnessError,
    Server,
    check_predict,
    measure,
    require_wrk,
    serving,
    write_body,
)
from bench.machine import (
    CLIENT_CORE,
    calibrate,
    pinned,
    wait_for_quiet,
)
from bench.report import Recorder, calibration_note, cpu_column, machine_header, start_session, table

NEEDS_DEPLOYMENT = "needs the deployment issue (#4)"
TARGETS = ("fastserve", "fastapi-batcher")


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


def overload(args: argparse.Namespace, body: Path, recorder: Recorder) -> str:
    """A small queue under 4x the load it can hold: what is accepted, shed, and how fast.

    Capacity is what the server can hold at once: a batch in predict plus a full queue
    (``max_batch_rows + max_queue_depth`` one-row requests); wrk keeps 4x that many
    connections busy. wrk's latency histogram mixes 200s and 429s, so the probe
    (``bench/probe.py``, on wrk's core) times them apart.
    """
    depth, batch = args.overload_queue_depth, 64
    connections = 4 * (depth + batch)
    server = _server(args, f"{args.target}-overload", max_queue_depth=depth, max_batch_rows=batch)
    probe_s = max(1, args.duration - 1)
    probe_argv = pinned(CLIENT_CORE, [sys.executable, "-m", "bench.probe"])
    probe_argv += ["127.0.0.1", str(server.port), server.predict_path, str(body)]
    probe_argv += ["--seconds", str(probe_s), "--delay", str(args.warmup + 0.5)]
    with serving(server, args.work) as proc:
        check_predict(server, body.read_bytes())
        wait_for_quiet(args.quiet_wait, args.reference_ms)
        probe = subprocess.Popen(probe_argv, stdout=subprocess.PIPE, text=True)
        try:
            result = measure(server, proc, connections, args.duration, body, args.warmup, [probe.pid])
            out, _ = probe.communicate(timeout=args.warmup + probe_s + 30)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait(10)
    probed = next((json.loads(x[11:]) for x in out.splitlines() if x.startswith("PROBE_JSON ")), None)
    if probed is None:
        raise HarnessError("the probe gave no result")
    statuses = {int(s): n for s, n in result["statuses"].items()}
    accepted = sum(n for s, n in statuses.items() if 200 <= s < 300)
    shed = statuses.get(429, 0)
    lost = sum(n for s, n in statuses.items() if not (200 <= s < 300 or s == 429))
    lost += result["socket_errors"] + probed["errors"]
    ok_probe, shed_probe = probed["statuses"].get("200"), probed["statuses"].get("429")
    record = recorder.add(
        {
            "kind": "scenario",
            "scenario": "overload",
            "max_queue_depth": depth,
            "max_batch_rows": batch,
            "accepted": accepted,
            "shed": shed,
            "lost": lost,
            "accepted_p99_ms": ok_probe and ok_probe["p99_ms"],
            "time_to_429_p99_ms": shed_probe and shed_probe["p99_ms"],
            "probe": probed,
            **result,
        }
    )
    header = ("figure", "value")
    rows = [
        ("connections (4 × (queue depth + batch))", connections),
        ("accepted (2xx)", f"{accepted:,} ({record['rps']:,.0f}/s)"),
        ("shed (429)", f"{shed:,}"),
        ("lost (other statuses, socket errors, timeouts)", lost),
        ("p99 of accepted, ms (probe)", ok_probe and f"{ok_probe['p99_ms']:.2f}"),
        ("p99 time-to-429, ms (probe)", shed_probe and f"{shed_probe['p99_ms']:.2f}"),
        ("p99 of all responses, ms (wrk, 200s and 429s mixed)", _ms(result["latency_us"]["p99"])),
        (
            "probe samples (200 / 429)",
            f"{ok_probe and ok_probe['count']} / {shed_probe and shed_probe['count']}",
        ),
        ("mean batch rows", result["mean_batch_rows"]),
        ("CPU % server / wrk / others on the server's core", cpu_column(result)),
        ("core-0 calibration, ms (slower of before and after)", result["calibration_ms"]),
    ]
    return f"## 4. Overload, max_queue_depth={depth}, max_batch_rows={batch}\n\n" + table(header, rows)


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
    parser.add_argument("--scenarios", default="batching,overload", help="which measured scenarios to run")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 s runs, no warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.quiet_wait = 2, 0, 0
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
    for name, scenario in (("batching", batching), ("overload", overload)):
        if name not in chosen:
            continue
        print(f"\n{name} ...", flush=True)
        try:
            report.append(scenario(args, body, recorder) + "\n")
        except (HarnessError, subprocess.SubprocessError, OSError) as exc:
            recorder.add({"kind": "error", "scenario": name, "error": str(exc)})
            report.append(f"## {name}: FAILED\n\n{exc}\n")
        print(report[-1], flush=True)
    for number, name in ((2, "canary"), (3, "shadow")):
        recorder.add({"kind": "scenario", "scenario": name, "result": NEEDS_DEPLOYMENT})
        report.append(f"## {number}. {name.capitalize()}: {NEEDS_DEPLOYMENT}\n")
        print(report[-1])

    (args.out / f"run-{stamp}.md").write_text("\n".join(report) + "\n")
    print(f"JSON lines: {recorder.path}\nTable: {args.out / f'run-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
