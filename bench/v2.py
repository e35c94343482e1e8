"""The Open Inference Protocol against fastserve's own route: what V2's framing costs.

One fastserve on the demo's digits v1 (RF-300, compiled), one single-row body each, the same
row: ``POST /predict/digits`` in JSON, then ``POST /v2/models/digits/infer`` with the tensor in
JSON ``data`` and with it in binary (``Inference-Header-Content-Length``, the output asked for
in binary too). Same server process for all three, runs alternated, wrk at 64 connections.
Issue 17's target: both V2 forms at least 85% of the native route's RPS.

    python -m bench.v2                 # 10 s a run, each form twice
    python -m bench.v2 --smoke         # CI: 1 s runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import models, servers
from bench.harness import RESULTS_DIR, HarnessError, Server, http_post, measure, require_wrk, serving
from bench.machine import calibrate, wait_for_quiet
from bench.report import calibration_note, cpu_column, machine_header, start_session, table

NATIVE, V2_JSON, V2_BINARY = "native JSON", "V2 JSON", "V2 binary"
TARGET = 0.85  # V2's RPS over the native route's (issue 17)


def write_bodies(work: Path) -> dict[str, tuple[str, Path, dict[str, str] | None]]:
    """Each form's path, body file and extra headers, for digits row 0."""
    from sklearn.datasets import load_digits

    row = load_digits().data[0]
    work.mkdir(parents=True, exist_ok=True)
    native = work / "native.json"
    native.write_text(json.dumps({"features": row.tolist()}))
    tensor = {"name": "input-0", "shape": [1, 64], "datatype": "FP64"}
    v2_json = work / "v2.json"
    v2_json.write_text(json.dumps({"inputs": [{**tensor, "data": row.tolist()}]}))
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": 64 * 8}}],
            "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
        }
    ).encode()
    v2_binary = work / "v2.bin"
    v2_binary.write_bytes(header + row.astype("<f8").tobytes())
    infer = "/v2/models/digits/infer"
    return {
        NATIVE: ("/predict/digits", native, None),
        V2_JSON: (infer, v2_json, None),
        V2_BINARY: (infer, v2_binary, {"Inference-Header-Content-Length": str(len(header))}),
    }


def _check(server: Server, path: str, body: Path, headers: dict[str, str] | None) -> None:
    status, answer = http_post(server.url(path), body.read_bytes(), headers=headers)
    if status != 200:
        raise HarnessError(f"POST {path} answered {status}: {answer[:200]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per run (whole seconds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each form, alternated")
    parser.add_argument("--quiet-wait", type=float, default=30)
    parser.add_argument("--smoke", action="store_true", help="CI: 1 s runs, one round, no warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.rounds, args.quiet_wait = 1, 0, 1, 0
    try:
        require_wrk()
    except HarnessError as exc:
        print(f"bench.v2: {exc}", file=sys.stderr)
        return 1
    stamp, work, recorder, machine = start_session(args.out, prefix="v2-")
    if servers.fastserve_command() is None:
        recorder.add({"kind": "skipped", "reason": "the `fastserve` command is not installed"})
        print("bench.v2: skipped, the `fastserve` command is not installed (pip install -e .)")
        return 0
    forms = write_bodies(work)
    server = servers.fastserve(models.repository("rf300"), name="fastserve")
    reference_ms = calibrate()
    runs: list[dict[str, object]] = []
    try:
        with serving(server, work) as proc:
            for path, body, headers in forms.values():
                _check(server, path, body, headers)
            for _ in range(args.rounds):
                for form, (path, body, headers) in forms.items():
                    wait_for_quiet(args.quiet_wait, reference_ms)
                    server.predict_path = path
                    result = measure(
                        server, proc, args.connections, args.duration, body, args.warmup, headers
                    )
                    runs.append(recorder.add({"kind": "http", "suite": "v2", "form": form, **result}))
    except (HarnessError, subprocess.SubprocessError, OSError) as exc:
        recorder.add({"kind": "error", "error": str(exc)})
        print(f"bench.v2: FAILED: {exc}", file=sys.stderr)
        return 1
    best = {form: max(float(r["rps"]) for r in runs if r["form"] == form) for form in forms}  # type: ignore[arg-type]
    rows = [
        (
            form,
            f"{best[form]:,.0f}",
            f"{best[form] / best[NATIVE]:.2f}" if best[NATIVE] else None,
            "—" if form == NATIVE else ("met" if best[form] >= TARGET * best[NATIVE] else "missed"),
            cpu_column(max((r for r in runs if r["form"] == form), key=lambda r: float(r["rps"]))),  # type: ignore[arg-type]
        )
        for form in sorted(forms, key=lambda f: -best[f])
    ]
    report = "\n".join(
        [
            f"# V2 against the native route ({stamp})\n",
            machine_header(machine),
            "",
            f"digits v1 (RF-300, compiled), one row a request, {args.connections} connections, "
            f"best of {args.rounds} run(s) of {args.duration} s each, alternated.\n",
            table(
                ("form", "RPS", "vs native", f"≥ {TARGET:.0%} of native", "CPU % server / wrk / others"), rows
            ),
            "",
            calibration_note(runs),  # type: ignore[arg-type]
        ]
    )
    (args.out / f"v2-{stamp}.md").write_text(report + "\n")
    print(report)
    print(f"JSON lines: {recorder.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
