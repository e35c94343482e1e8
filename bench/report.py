"""Results out: JSON lines, markdown tables sorted fastest first with ratio columns, a PNG plot."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bench.compute_ceiling import SCIKIT_LEARN, rows_per_s_at
from bench.harness import Record
from bench.machine import SERVER_CORE, SLOW_FACTOR, machine_info

FASTAPI, LITSERVE, HTTP_CEILING = "fastapi-batcher", "litserve", "http-ceiling"
NOISY_PCT = 10.0  # other processes took more than this share of the server's core during the run


def noise(run: Record) -> float:
    """The share of the server's core that other processes took during ``run``."""
    return float(run.get("other_cpu_pct", {}).get(f"cpu{SERVER_CORE}", 0.0))


def cpu_column(run: Record) -> str:
    """``server / wrk / others on the server's core``, in percent of one core; ⚠ when disturbed."""
    flag = " ⚠" if noise(run) > NOISY_PCT else ""
    return f"{run['server_cpu_pct']:.0f} / {run['wrk_cpu_pct']:.0f} / {noise(run):.0f}{flag}"


def start_session(out: Path, prefix: str = "") -> tuple[str, Path, Recorder, Record]:
    """A timestamped results session: its stamp, its work folder, its recorder, and the
    machine record (written first and printed, so that every table names its machine)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    recorder = Recorder(out / f"{prefix}{stamp}.jsonl")
    machine = recorder.add({"kind": "machine", **machine_info()})
    print(machine_header(machine), flush=True)
    return stamp, out / f"{prefix}{stamp}", recorder, machine


class Recorder:
    """Appends one JSON object per line to ``path`` and keeps them for the tables."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, record: Record) -> Record:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def machine_header(machine: Record) -> str:
    versions = ", ".join(f"{name} {v}" for name, v in machine["versions"].items())
    return (
        f"Machine: {machine['platform']}; CPU {machine['cpu']} ({machine['cores']} cores); "
        f"Python {machine['python']}; {machine['wrk']}.  \nLibraries: {versions}."
    )


def _ms(us: float | None) -> str:
    return "n/a" if us is None else f"{us / 1000:.2f}"


def _ratio(value: float, base: float | None, percent: bool = False) -> str:
    if not base:
        return "n/a"
    return f"{100 * value / base:.0f}%" if percent else f"{value / base:.2f}×"


def http_table(runs: Sequence[Record], ceilings: Mapping[str, Sequence[Record]]) -> str:
    """One markdown table per concurrency, fastest first, with the ratio columns.

    The compute-ceiling share compares a server's RPS (one row per request) with the
    ceiling of the predict it runs (``ceilings`` by path: scikit-learn's or fastserve's
    compiled one) in rows/s at the mean batch size that server achieved in that run:
    measured right after the run where the harness did (``ceiling_beside``, same phase of
    the machine), else interpolated from the ceiling measured at the start. The last share
    is of the lower of the two ceilings, HTTP and compute: what the run could have reached.
    """
    out = []
    for connections in sorted({r["connections"] for r in runs}):
        rows = sorted((r for r in runs if r["connections"] == connections), key=lambda r: -r["rps"])
        by_name = {r["server"]: r["rps"] for r in rows}
        http = by_name.get(HTTP_CEILING)
        out.append(
            f"\nConcurrency {connections}:\n\n"
            "| server | predict | RPS | p50 ms | p99 ms | mean batch | vs FastAPI | vs LitServe "
            "| of HTTP ceiling | of compute ceiling @batch | of the lower ceiling | non-2xx | socket errors "
            "| CPU % server / wrk / others |\n"
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        )
        for r in rows:
            batch = r.get("mean_batch_rows")
            beside = r.get("ceiling_beside")
            ceiling = ceilings.get(r.get("predict", SCIKIT_LEARN))
            if beside:
                compute = beside["rows_per_s"]
            else:
                compute = rows_per_s_at(ceiling, batch) if ceiling and batch else None
            lower = min((c for c in (http, compute) if c), default=None)
            lat = r["latency_us"]
            out.append(
                f"| {r['server']} | {r.get('predict', 'n/a')} | {r['rps']:,.0f} "
                f"| {_ms(lat['p50'])} | {_ms(lat['p99'])} "
                f"| {'n/a' if batch is None else f'{batch:.1f}'} "
                f"| {_ratio(r['rps'], by_name.get(FASTAPI))} | {_ratio(r['rps'], by_name.get(LITSERVE))} "
                f"| {_ratio(r['rps'], http, percent=True)} "
                f"| {_ratio(r['rps'], compute, percent=True)} "
                f"| {_ratio(r['rps'], lower, percent=True)} "
                f"| {sum(r['non_2xx'].values()) or ''} | {r['socket_errors'] or ''} "
                f"| {cpu_column(r)} |"
            )
    out.append(calibration_note(runs))
    return "\n".join(out)


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join("n/a" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def calibration_note(runs: Sequence[Record]) -> str:
    """One line on how steady the host was: the spread of the runs' calibration times."""
    times = [r["calibration_ms"] for r in runs if "calibration_ms" in r]
    if not times:
        return ""
    spread = max(times) / min(times) - 1
    verdict = "steady" if spread <= SLOW_FACTOR - 1 else "NOT steady: compare these runs with care"
    return (
        f"\nCore-0 calibration (fixed Python loop before each run): {min(times):.0f}–{max(times):.0f} ms, "
        f"spread {100 * spread:.0f}% ({verdict})."
    )


def ceiling_table(ceiling: Iterable[Record]) -> str:
    lines = ["| batch rows | ms per call | rows/s |", "|--:|--:|--:|"]
    for r in ceiling:
        lines.append(f"| {r['batch_rows']} | {r['s_per_call_mean'] * 1000:.2f} | {r['rows_per_s']:,.0f} |")
    return "\n".join(lines)


def plot(runs: Sequence[Record], path: Path, title: str) -> Path | None:
    """Throughput and p99 against concurrency, one line per server; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in sorted({r["server"] for r in runs}):
        mine = (r for r in runs if r["server"] == server)
        points = sorted((r["connections"], r["rps"], r["latency_us"]["p99"] / 1000) for r in mine)
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], marker="o", label=server)
        right.plot(xs, [p[2] for p in points], marker="o", label=server)
    concurrencies = sorted({r["connections"] for r in runs})
    for axis, label in ((left, "requests/s (2xx)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_xlabel("concurrency (wrk connections)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
