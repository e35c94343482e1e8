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
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import models, servers
from bench.harness import (
    RESULTS_DIR,
    HarnessError,
    Server,
    check_predict,
    http_get,
    http_post,
    measure,
    require_wrk,
    serving,
    write_bodies,
    write_body,
)
from bench.machine import (
    CLIENT_CORE,
    calibrate,
    pinned,
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


def _digits_status(server: Server) -> dict[str, Any]:
    status, text = http_get(server.url("/status"))
    if status != 200:
        raise HarnessError(f"GET /status answered {status}")
    digits: dict[str, Any] = json.loads(text)["models"]["digits"]
    return digits


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
        before = _answered(_digits_status(server))
        result = measure(server, proc, args.connections, args.duration, bodies, args.warmup)
        after = _answered(_digits_status(server))
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
        digits = _digits_status(server)
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
    parser.add_argument("--canary-share", type=float, default=0.2)
    parser.add_argument(
        "--scenarios",
        default="batching,canary,shadow,overload",
        help="which scenarios to run, comma-separated",
    )
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
    for name, scenario in (
        ("batching", batching),
        ("canary", canary),
        ("shadow", shadow),
        ("overload", overload),
    ):
        if name not in chosen:
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
