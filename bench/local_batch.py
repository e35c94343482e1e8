"""Accepted latency in batch times of the moment, read from the overload's h2load log.

The overload target compares the p99 of accepted requests with the batch service time, and
the scenario's batch time is the run's mean (``/status``). On the 2-core VM of the README the
core's speed drifts within a run, and a predict at nice 19 gets only what HTTP leaves of the
core, so the drift lands on the batch time several times over: in ``run-20261129-235531`` the
batches of the predict process took 70-100 ms for six seconds, then about 250 ms for three and
a half, with the 429s no slower than before. Against the run's mean, the slow phase is all of
the tail.

Under overload the model is never idle, and each batch's answers leave together: the accepted
answers come in bursts, one per batch, and the time from one burst to the next is a batch's
service time as it was then. A request answered in burst ``i`` waited behind the batch that
ended at burst ``i-1`` and then for its own: its latency over the mean of the two intervals
before its answer is how many batch times it waited, at the speed of the moment. Where the
admission queue holds one batch, that is about 2; it says whether the server queues as it
should, apart from how fast the machine happened to run.

Only where a batch takes long enough for its burst to stand apart (tens of milliseconds):
at a compiled predict's millisecond the answers of successive batches interleave.
"""

from __future__ import annotations

from typing import Any

from bench.harness import h2load_entries, measured_from_us, percentiles

# The bursts must stand clear of each other: a batch's 64 answers leave within a few ms.
MIN_BATCH_MS = 10.0


def answer_bursts(answers: list[tuple[float, float]], gap_ms: float) -> list[list[tuple[float, float]]]:
    """``answers`` — (answered at, started at) in ms, any order — grouped by the time answered
    into bursts: a new burst starts after ``gap_ms`` without an answer."""
    bursts: list[list[tuple[float, float]]] = []
    last = None
    for answer in sorted(answers):
        if last is None or answer[0] - last > gap_ms:
            bursts.append([])
        bursts[-1].append(answer)
        last = answer[0]
    return bursts


def latency_in_local_batches(log: str, warmup_s: float, batch_ms: float) -> dict[str, Any] | None:
    """Count, p50, p99 and max of each measured accepted request's latency over the batch time around
    it (see the module's docstring), from h2load's ``--log-file`` (start in µs since the epoch,
    status, time in µs); None where ``batch_ms``, the run's mean, is too short to tell bursts
    apart, or fewer than three bursts came.

    The warm-up's answers mark bursts too, so that the first measured requests have batches
    behind them; only requests started after ``warmup_s`` are counted, as in ``split_h2load_log``.
    """
    if batch_ms < MIN_BATCH_MS:
        return None
    entries = h2load_entries(log)
    accepted = [(start, micros) for start, status, micros in entries if status == 200]
    if not accepted:
        return None
    measured_from = measured_from_us(entries, warmup_s)
    answers = [((start + micros) / 1000, start / 1000) for start, micros in accepted]
    bursts = answer_bursts(answers, gap_ms=batch_ms / 4)
    if len(bursts) < 3:
        return None
    ends = [burst[0][0] for burst in bursts]
    ratios = []
    for i in range(2, len(bursts)):
        local_ms = (ends[i] - ends[i - 2]) / 2
        for answered, started in bursts[i]:
            if started * 1000 >= measured_from:
                ratios.append((answered - started) / local_ms)
    if not ratios:
        return None
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        **percentiles(ratios),
        "bursts": len(bursts),
        "mean_burst": round(len(accepted) / len(bursts), 1),
        "burst_interval_ms": percentiles(intervals, (("p50", 0.5), ("p90", 0.9))),
    }
