"""Shared machinery: start a server pinned to core 0, load it with wrk on core 1, stop it.

Every server runs in its own process group (``start_new_session``) so that stopping it
by its pid reaches the workers it spawned. Every wait is bounded: readiness polls give up
after ``ready_timeout_s``, wrk runs under ``timeout``, a server that ignores SIGTERM gets
SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import (
    CLIENT_CORE,
    HZ,
    SERVER_CORE,
    SINGLE_THREAD_ENV,
    busy_ticks,
    calibrate,
    children_cpu_s,
    pinned,
    tree_ticks,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LUA_SCRIPT = BENCH_DIR / "wrk" / "post.lua"
Record = dict[str, Any]  # one JSON line of results


class HarnessError(RuntimeError):
    """A server did not start, a tool is missing, or a run produced no result."""


class NotServed(HarnessError):
    """The server runs but says it will not serve a model (fastserve's ``/status`` gives why)."""


@dataclass
class Server:
    """How to start one server and where to reach it.

    ``batch_metric`` names a Prometheus histogram on ``/metrics`` whose ``_sum``/``_count``
    give the mean batch size; ``stats_file`` is the alternative for servers without
    ``/metrics`` (a file holding ``rows batches``), and ``status_path`` a JSON status page
    with ``rows`` and ``batches`` per model version (fastserve's ``/status``).
    """

    name: str
    argv: list[str]
    port: int
    ready_path: str = "/readyz"
    predict_path: str = "/predict/digits"
    batch_metric: str | None = None
    stats_file: Path | None = None
    status_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Speaks HTTP/2 over cleartext to a client that starts with it (h2c, prior knowledge), as
    # Granian does: the overload's open load then multiplexes (see run_h2load). uvicorn does not.
    http2: bool = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_body(path: Path, row: int = 0) -> Path:
    """Write ``{"features": [64 floats]}`` for one row of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    features = load_digits().data[row].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"features": features}))
    return path


def write_bodies(path: Path, rows: int = 500, noise: float = 3.0) -> Path:
    """One ``{"features": [...]}`` body per line: wrk sends them in turn (``wrk/post.lua``).

    Digits rows with seeded noise: both demo versions classify the clean training rows
    perfectly, so without noise they would never disagree.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    data = load_digits().data[:rows]
    data = np.clip(data + rng.normal(0.0, noise, data.shape), 0.0, 16.0).round(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"features": row.tolist()}) + "\n" for row in data))
    return path


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise HarnessError("wrk is not installed: apt-get install wrk (Debian, Ubuntu) or brew install wrk")
    return wrk


H2LOAD_MISSING = (
    "h2load is not installed: apt-get install nghttp2-client (Debian, Ubuntu) or brew install nghttp2"
)


def require_h2load() -> str:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise HarnessError(H2LOAD_MISSING)
    return h2load


# --- processes -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, grandchildren, ...)."""
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(server: Server, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``server`` pinned to the server core, in its own process group, logging to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SINGLE_THREAD_ENV, "PYTHONUNBUFFERED": "1", **server.env}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            pinned(SERVER_CORE, server.argv),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout_s``."""
    family = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_in_group(pid, proc.pid) for pid in family):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:  # a worker that left the group is still ours
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return _alive(pid) and os.getpgid(pid) == pgid
    except ProcessLookupError:
        return False


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(
    url: str, body: bytes, timeout_s: float = 10.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(server: Server, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"{server.name} exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError):
            if http_get(server.url(server.ready_path), timeout_s=1.0)[0] == 200:
                return
        refused = not_served(server)
        if refused:
            raise NotServed(f"{server.name} does not serve {refused}")
        time.sleep(0.2)
    raise HarnessError(f"{server.name} not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")


def not_served(server: Server) -> str | None:
    """What a fastserve that has finished loading refuses to serve, and why; None otherwise.

    A version that fails to load or to warm up is reported on ``/status`` and never served,
    and ``/readyz`` stays 503 while a model has no servable stable version: waiting longer
    would not change it.
    """
    if server.status_path is None:
        return None
    try:
        status, text = http_get(server.url(server.status_path), timeout_s=1.0)
        page = json.loads(text) if status == 200 else {}
    except (OSError, ValueError):
        return None
    if page.get("phase") != "serving":
        return None
    failed = [
        f"{model} {version} ({info.get('reason')})"
        for model, entry in page.get("models", {}).items()
        for version, info in entry.get("versions", {}).items()
        if info.get("state") == "failed"
    ]
    return ", ".join(failed) or None


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def serving(
    server: Server, log_dir: Path, ready_timeout_s: float = 120.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``server`` for the duration of the block; it is always stopped, by pid, on the way out."""
    log_path = log_dir / f"{server.name}.log"
    proc = start(server, log_path)
    try:
        wait_ready(server, proc, log_path, ready_timeout_s)
        yield proc
    finally:
        stop(proc)


def check_predict(server: Server, body: bytes) -> Record:
    """One request before the load: a server answering 404 or 500 must not be measured."""
    status, answer = http_post(server.url(server.predict_path), body)
    if status != 200 or b"predictions" not in answer:
        raise HarnessError(f"{server.name}: POST {server.predict_path} answered {status}: {answer[:200]!r}")
    sample: Record = json.loads(answer)
    return sample


# --- measurements ----------------------------------------------------------------------


def run_wrk(
    url: str,
    connections: int,
    duration_s: int,
    body_file: Path,
    timeout_s: int = 10,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """wrk pinned to the client core, one thread; the JSON line of ``post.lua``, plus ``rps``.

    wrk takes whole seconds only. Requests slower than ``timeout_s`` count as timeout errors.
    With ``headers`` (sent on every request), the file is one body, sent as it is (binary
    V2 bodies), rather than one body a line.
    """
    argv = pinned(CLIENT_CORE, [
        require_wrk(), "-t1", f"-c{connections}", f"-d{duration_s}s",
        f"--timeout={timeout_s}s", "--latency", "-s", str(LUA_SCRIPT), url,
    ])  # fmt: skip
    env = {**os.environ, "WRK_BODY_FILE": str(body_file)}
    if headers:
        env["WRK_WHOLE_BODY"] = "1"
        env["WRK_HEADERS"] = "".join(f"{name}: {value}\n" for name, value in headers.items())
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s + 30)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise HarnessError(f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    seconds = result["duration_us"] / 1e6
    statuses = {int(k): v for k, v in result["statuses"].items()}
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    result["rps"] = round(ok / seconds, 1)
    result["ok"] = ok
    result["non_2xx"] = {str(s): n for s, n in statuses.items() if not 200 <= s < 300}
    # wrk's errors.status counts every status >= 400: it is in non_2xx, not a socket error.
    errors = result["errors"]
    result["socket_errors"] = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    return result


_MAX_CLIENTS = 512
# HTTP/2: connections, and the requests each may hold in flight (Granian allows 200).
_H2_CLIENTS = 64
_H2_STREAMS = 16


def run_h2load(
    url: str,
    rate: float,
    duration_s: int,
    body_file: Path,
    log_file: Path,
    warmup_s: int = 0,
    http2: bool = False,
) -> dict[str, Any]:
    """An open load at ``rate`` requests/s: h2load on the client core, one thread.

    wrk keeps each connection busy back to back (a closed loop): under overload its latency
    is connections / throughput whatever the server does. h2load's ``--rps`` paces each
    connection instead. Every request's status and time come back (``--log-file``), so
    accepted and refused requests are timed apart.

    The load is open only while no connection falls behind its pace. Over HTTP/1.1 a
    connection holds one request at a time: under overload an accepted request holds it for
    hundreds of milliseconds, past its next send time, and when the answer comes the overdue
    requests go at once. The answers of a batch come together, so those catch-up sends do
    too: on RF-300 at 4x capacity, h2load sent 8x its mean rate in the millisecond after each
    batch's answers, and the 429s of that burst set the p99. With ``http2`` (the server must
    speak h2c) each connection multiplexes several requests (see ``h2load_plan``), so a send
    does not wait for another request's answer: the same runs then sent 1.3-1.5x the mean in
    that millisecond and the mean after it. Without it (a server that speaks only
    HTTP/1.1), the load is open only while answers come within a pacing interval.

    h2load starts every connection's pacing timer at the moment it connects: connections
    opened together send together, in bursts of hundreds within a millisecond. So they are
    opened a few per millisecond (``-r``, ``--rate-period 1ms``) across one pacing interval,
    which spreads their sends over it. ``-r`` rules out ``-D``: the run is ``rate *
    duration_s`` requests instead (``-n``). At most ``_MAX_CLIENTS`` connections: more
    overflow Granian's listen backlog (1024) and wait on SYN retries. ``sent_rps`` says
    what rate h2load really offered: when connections fall behind, it falls below
    ``offered_rps``.

    The first ``warmup_s`` seconds are load but not measured, as the warm-up before a wrk
    run: they hold the connect storm, hundreds of connections opened within a pacing
    interval, which a server behind long-lived connections does not see. Requests started
    then are left out of ``statuses`` and ``latency_ms`` (``warmup_statuses`` counts them)
    but not out of the loss figures: every request must still get its answer.
    """
    clients, per_client, protocol = h2load_plan(rate, http2)
    per_ms = math.ceil(rate / 1000)  # connections opened per ms: all in one pacing interval
    log_file.unlink(missing_ok=True)  # h2load appends to it
    argv = pinned(CLIENT_CORE, [
        require_h2load(), *protocol, "-t1", f"-c{clients}", f"-r{per_ms}", "--rate-period=1ms",
        f"--rps={per_client:.3f}", f"-n{math.ceil(rate * (warmup_s + duration_s))}", f"--log-file={log_file}",
        "-d", str(body_file), "-H", "content-type: application/json", url,
    ])  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10 * (warmup_s + duration_s) + 60)
    summary = parse_h2load_summary(done.stdout)
    if done.returncode != 0 or summary is None:
        raise HarnessError(f"h2load failed (exit {done.returncode}): {(done.stdout + done.stderr)[-500:]}")
    seconds, started, finished, errored, timeouts = summary
    times, warmup = split_h2load_log(log_file.read_text(), warmup_s)
    return {
        "protocol": "h2c" if http2 else "http/1.1",
        "clients": clients,
        "offered_rps": round(rate, 1),
        "sent_rps": round(started / seconds, 1),
        "seconds": round(max(seconds - warmup_s, 0.001), 3),  # the measured part
        "warmup_s": warmup_s,
        "warmup_statuses": {str(s): n for s, n in sorted(warmup.items())},
        "statuses": {str(s): len(t) for s, t in sorted(times.items())},
        "latency_ms": {str(s): percentiles(t) for s, t in sorted(times.items())},
        "errored": errored,
        "timeouts": timeouts,
        # Started and never finished: h2load had no answer for them when it stopped.
        "unanswered": started - finished,
    }


_H2LOAD_SUMMARY = re.compile(
    r"finished in ([\d.]+)(s|ms|us),.*requests: (\d+) total, (\d+) started, (\d+) done, "
    r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
    re.DOTALL,
)
_SECONDS_PER = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_h2load_summary(stdout: str) -> tuple[float, int, int, int, int] | None:
    """(seconds, started, finished, errored, timeouts) from h2load's summary; None if absent.

    h2load gives the run's length in the largest unit below it: ``finished in 1.02s`` but
    ``finished in 998.64ms``.
    """
    found = _H2LOAD_SUMMARY.search(stdout)
    if found is None:
        return None
    value, unit, _, started, finished, _, _, errored, timeouts = found.groups()
    return float(value) * _SECONDS_PER[unit], int(started), int(finished), int(errored), int(timeouts)


def h2load_plan(rate: float, http2: bool) -> tuple[int, float, list[str]]:
    """(connections, requests/s per connection, protocol flags) for an open load at ``rate``.

    Over HTTP/2, ``_H2_CLIENTS`` connections of ``_H2_STREAMS`` streams each. At RF-300's 4x
    capacity here (about 7,000/s) a connection may hold 146 ms of its pace in flight, while
    it holds two requests on average (most are 429s, answered in a millisecond or two). A
    server that cannot carry the rate at all (the compiled path at 4x what HTTP carries)
    gets ``_H2_CLIENTS * _H2_STREAMS`` requests in flight, not an unbounded pile: a client
    fleet has its limits too. Over HTTP/1.1 each connection sends every 100 ms, as many
    connections as the listen backlog allows.
    """
    if http2:
        return _H2_CLIENTS, rate / _H2_CLIENTS, ["-m", str(_H2_STREAMS)]
    clients = min(_MAX_CLIENTS, max(16, math.ceil(rate / 10)))
    return clients, rate / clients, ["--h1"]


def split_h2load_log(log: str, warmup_s: float) -> tuple[dict[int, list[float]], dict[int, int]]:
    """h2load's ``--log-file`` as (times in ms by status, measured part; count by status, warm-up).

    Each line holds a request's start (microseconds since the epoch), its status and its time
    in microseconds. The warm-up is the first ``warmup_s`` seconds after the first start.
    """
    entries = h2load_entries(log)
    measured_from = measured_from_us(entries, warmup_s)
    times: dict[int, list[float]] = {}
    warmup: dict[int, int] = {}
    for start, status, micros in entries:
        if start < measured_from:
            warmup[status] = warmup.get(status, 0) + 1
        else:
            times.setdefault(status, []).append(micros / 1000)
    return times, warmup


def h2load_entries(log: str) -> list[tuple[int, int, int]]:
    """h2load's ``--log-file``: (start in µs since the epoch, status, time in µs) per request."""
    return [
        (int(start), int(status), int(micros))
        for start, status, micros, *_ in map(str.split, log.splitlines())
    ]


def measured_from_us(entries: list[tuple[int, int, int]], warmup_s: float) -> float:
    """When the measured part of an h2load run starts: ``warmup_s`` after its first request."""
    return min((start for start, _, _ in entries), default=0) + warmup_s * 1_000_000


LATENCY_QUANTILES = (("p50", 0.50), ("p99", 0.99), ("max", 1.0))


def percentiles(
    values: list[float], quantiles: Sequence[tuple[str, float]] = LATENCY_QUANTILES
) -> dict[str, float]:
    """The count and each named quantile of ``values`` (nearest rank, rounded to 0.01)."""
    ordered = sorted(values)
    at = {name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for name, q in quantiles}
    return {"count": len(ordered), **{name: round(v, 2) for name, v in at.items()}}


def batch_totals(server: Server) -> tuple[float, float] | None:
    """(rows, batches) predicted so far, from ``/metrics`` or the stats file; None when unknown."""
    if server.stats_file is not None:
        with contextlib.suppress(OSError, ValueError):
            rows, batches = server.stats_file.read_text().split()
            return float(rows), float(batches)
        return None
    if server.status_path is not None:
        return _status_totals(server)
    if server.batch_metric is None:
        return None
    try:
        status, text = http_get(server.url("/metrics"))
    except OSError:
        return None
    if status != 200:
        return None
    totals: dict[str, float] = {}
    for line in text.decode(errors="replace").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for suffix in ("_sum", "_count"):
            if name == server.batch_metric + suffix:
                totals[suffix] = totals.get(suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return (totals["_sum"], totals["_count"]) if len(totals) == 2 else None


def _status_totals(server: Server) -> tuple[float, float] | None:
    assert server.status_path is not None
    try:
        status, text = http_get(server.url(server.status_path))
        if status != 200:
            return None
        models = json.loads(text)["models"].values()
        return version_totals((v for model in models for v in model["versions"].values()), "rows")
    except (OSError, ValueError, KeyError):
        return None


def version_totals(versions: Iterable[dict[str, Any]], field: str) -> tuple[float, float]:
    """(sum of ``field``, sum of batches) over the versions of fastserve's ``/status`` that have
    ``field``: a reading for ``per_batch``."""
    counted = [v for v in versions if field in v]
    return float(sum(v[field] for v in counted)), float(sum(v["batches"] for v in counted))


def per_batch(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """How much a (total, batches) reading grew per batch between two readings; None if no batch ran."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def digits_status(server: Server) -> dict[str, Any]:
    """The ``digits`` model's part of fastserve's ``/status`` (versions, aliases, counts)."""
    assert server.status_path is not None
    status, text = http_get(server.url(server.status_path))
    if status != 200:
        raise HarnessError(f"{server.name}: GET {server.status_path} answered {status}")
    digits: dict[str, Any] = json.loads(text)["models"]["digits"]
    return digits


def measure(
    server: Server,
    proc: subprocess.Popen[bytes],
    connections: int,
    duration_s: int,
    body_file: Path,
    warmup_s: int = 1,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One load run against a ready server: wrk's figures, mean batch rows, and the noise.

    ``calibration_ms`` is the slower of the calibrations just before and just after the run.
    ``server_cpu_pct`` and ``wrk_cpu_pct`` say which side was saturated (near 100: that
    side is the bottleneck). ``other_cpu_pct`` is, per CPU, the time that neither the
    server, wrk nor this process used, in percent of that CPU: other work on a shared
    machine. On the server's core it is time taken from the server; on wrk's core it is
    mostly time wrk left idle (wrk runs at a higher priority). Interrupt time is left out.
    """
    url = server.url(server.predict_path)
    calibration_before = calibrate()
    if warmup_s > 0:
        run_wrk(url, connections, warmup_s, body_file, headers=headers)
    before_batches = batch_totals(server)
    family = [proc.pid, *descendants(proc.pid)]
    server_before, self_before = tree_ticks(family), tree_ticks([os.getpid()])
    wrk_before = children_cpu_s()
    busy_before, load_before = busy_ticks(), os.getloadavg()[0]
    result = run_wrk(url, connections, duration_s, body_file, headers=headers)
    busy = {cpu: ticks - busy_before.get(cpu, 0) for cpu, ticks in busy_ticks().items()}
    wrk_ticks = (children_cpu_s() - wrk_before) * HZ
    server_ticks = tree_ticks(family) - server_before
    self_ticks = tree_ticks([os.getpid()]) - self_before
    mean_batch = per_batch(before_batches, batch_totals(server))
    seconds = result["duration_us"] / 1e6
    # The server is pinned to its core and wrk to its own; this process is not pinned but
    # mostly asleep, so its (small) time is charged to the client core.
    ours = {f"cpu{SERVER_CORE}": server_ticks, f"cpu{CLIENT_CORE}": wrk_ticks + self_ticks}
    other = {cpu: round(max(0.0, t - ours.get(cpu, 0)) * 100 / HZ / seconds, 1) for cpu, t in busy.items()}
    pct = 100 / HZ / seconds
    result.update(
        server=server.name,
        connections=connections,
        duration_s=duration_s,
        mean_batch_rows=None if mean_batch is None else round(mean_batch, 2),
        calibration_ms=max(calibration_before, calibrate()),
        server_cpu_pct=round(server_ticks * pct, 1),
        wrk_cpu_pct=round(wrk_ticks * pct, 1),
        other_cpu_pct=other,
        loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    return result
