"""The machine: its two cores, what else runs on them, how fast the host lets them run.

The server gets core 0, the load generator core 1. On a shared virtual machine neither
is ours alone: other processes land on them, and the host can slow the VM down without
any steal time showing. This module measures both, so that a disturbed run says so.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SERVER_CORE = "0"
CLIENT_CORE = "1"
# The server has one core: one BLAS/OpenMP thread each, for every server and the ceiling alike.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HZ = os.sysconf("SC_CLK_TCK")


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    """``argv`` pinned to ``core`` and, as root, at nice -10.

    On a shared machine a background process lands on whichever core is less busy; the
    higher priority makes it yield to the benchmark rather than halve it (the same for
    every server, wrk and the compute ceiling).
    """
    priority = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
    return ["taskset", "-c", core, *priority, *argv]


_CALIBRATION = "import time\nt = time.perf_counter()\nsum(range(5_000_000))\nprint(time.perf_counter() - t)"


def calibrate() -> float:
    """Milliseconds a fixed pure-Python loop takes on the server's core, at the server's priority.

    The host may slow a virtual machine down without showing it as steal time; runs whose
    calibration differs are not comparable, whatever the other figures say.
    """
    done = subprocess.run(
        pinned(SERVER_CORE, [sys.executable, "-c", _CALIBRATION]), capture_output=True, text=True, timeout=60
    )
    return round(float(done.stdout) * 1000, 1)


def busy_ticks() -> dict[str, int]:
    """user + nice + system per CPU (interrupt time left out: loopback traffic lands there)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, user, nice, system = line.split()[:4]
            busy[name] = int(user) + int(nice) + int(system)
    return busy


SLOW_FACTOR = 1.15  # a calibration this much above the best one seen: the host was slowing the VM


def wait_for_quiet(
    max_wait_s: float = 30.0, reference_ms: float | None = None, threshold_pct: float = 10.0
) -> float:
    """Wait (bounded) for a quiet, full-speed machine; the seconds waited.

    Quiet: no CPU busier than ``threshold_pct`` over one second (another session's tests
    would take the server's core, or wrk's, halfway through a run). Full speed: with a
    ``reference_ms``, the calibration is within ``SLOW_FACTOR`` of it. Call it while the
    server is idle.
    """
    start = time.monotonic()
    while max_wait_s > 0:
        before = busy_ticks()
        time.sleep(1.0)
        after = busy_ticks()
        busiest = max(after[cpu] - before.get(cpu, 0) for cpu in after) * 100 / HZ
        steady = reference_ms is None or calibrate() <= reference_ms * SLOW_FACTOR
        waited = time.monotonic() - start
        if (busiest <= threshold_pct and steady) or waited >= max_wait_s:
            return round(waited, 1)
    return 0.0


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children: wrk, once it has been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total


LIBRARIES = (
    "granian", "starlette", "msgspec", "numpy", "scikit-learn", "skops",
    "fastapi", "uvicorn", "uvloop", "litserve", "fastserve",
)  # fmt: skip


def machine_info() -> dict[str, object]:
    """Platform, CPU model, core count, Python, library versions and wrk's version."""
    import platform
    from importlib import metadata

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    wrk = shutil.which("wrk")
    wrk_version = "not installed"
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0]
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions,
        "wrk": wrk_version,
    }
