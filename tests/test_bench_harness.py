"""The bench harness's own arithmetic, without servers or load generators."""

from __future__ import annotations

import pytest
from bench.harness import h2load_plan, parse_h2load_summary, split_h2load_log
from bench.local_batch import answer_bursts, latency_in_local_batches

_T0 = 1_795_570_243_000_000  # a start time in microseconds since the epoch, as h2load logs it


def _line(start_s: float, status: int, ms: float) -> str:
    return f"{_T0 + int(start_s * 1e6)}\t{status}\t{int(ms * 1000)}"


def test_h2load_log_leaves_the_warm_up_out_of_the_times_but_counts_it() -> None:
    log = "\n".join(
        [
            _line(0.0, 429, 50.0),  # the connect storm
            _line(0.999, 200, 120.0),
            _line(1.0, 429, 1.5),  # the first measured start
            _line(2.5, 200, 80.0),
            _line(2.6, 429, 0.75),
        ]
    )
    times, warmup = split_h2load_log(log, warmup_s=1)
    assert warmup == {429: 1, 200: 1}
    assert times == {429: [1.5, 0.75], 200: [80.0]}


def test_h2load_log_without_warm_up_times_every_request() -> None:
    log = "\n".join([_line(0.0, 429, 50.0), _line(0.5, 200, 90.0)])
    assert split_h2load_log(log, warmup_s=0) == ({429: [50.0], 200: [90.0]}, {})
    assert split_h2load_log("", warmup_s=2) == ({}, {})


def test_an_http2_load_keeps_sending_while_answers_are_slow_but_bounds_what_is_in_flight() -> None:
    # Under overload an accepted request takes hundreds of milliseconds: a connection that
    # could not send its next requests meanwhile would send them together when it is answered.
    for rate in (100, 5_000, 8_000):
        clients, per_client, flags = h2load_plan(rate, http2=True)
        assert clients * per_client == pytest.approx(rate)
        assert "--h1" not in flags
        streams = int(flags[flags.index("-m") + 1])
        assert streams / per_client >= 0.1, (rate, clients, streams)  # 100 ms of its pace
    clients, _, flags = h2load_plan(45_000, http2=True)
    assert clients * int(flags[flags.index("-m") + 1]) <= 1024


def test_an_http1_load_paces_each_connection_every_100_ms_within_the_backlog() -> None:
    clients, per_client, flags = h2load_plan(5_000, http2=False)
    assert flags == ["--h1"]
    assert (clients, per_client) == (500, 10.0)
    assert h2load_plan(40_000, http2=False)[0] == 512


_H2LOAD_OUT = """finished in {took}, 4274.00 req/s, 483.63KB/s
requests: 4300 total, 4290 started, 4280 done, 6 succeeded, 4274 failed, 3 errored, 2 timeout
status codes: 6 2xx, 0 3xx, 4274 4xx, 0 5xx
"""


def test_h2load_summary_reads_the_run_length_in_any_unit() -> None:
    # A run shorter than a second is reported in milliseconds (a smoke run in CI was).
    for took, seconds in (("1.25s", 1.25), ("998.64ms", 0.99864), ("850.00us", 0.00085)):
        parsed = parse_h2load_summary(_H2LOAD_OUT.format(took=took))
        assert parsed is not None, took
        assert parsed[0] == pytest.approx(seconds)
        assert parsed[1:] == (4290, 4280, 3, 2)
    assert parse_h2load_summary("h2load: could not connect") is None


def _overload_log(batch_ends_s: list[float], late: int = 0) -> str:
    """An overload as h2load logs it: each batch answers 4 requests admitted when the batch two
    before it ended (they waited for the batch ahead, then their own) and refuses 20 in between;
    the last ``late`` batches each hold one request that waited a whole batch more."""
    lines = []
    for i in range(2, len(batch_ends_s)):
        end, admitted = batch_ends_s[i], batch_ends_s[i - 2] + 0.001
        for k in range(4):
            waited_more = k == 0 and i >= len(batch_ends_s) - late
            start = batch_ends_s[i - 3] + 0.001 if waited_more else admitted
            lines.append(_line(start, 200, (end - start) * 1000 + k * 0.5))
        lines += [_line(admitted + j * 0.002, 429, 1.0) for j in range(20)]
    return "\n".join(lines)


def test_accepted_latency_is_read_in_batch_times_of_the_moment() -> None:
    # 100 ms batches for a second, then 250 ms ones: a machine that slowed down mid-run.
    ends = [0.1 * i for i in range(11)] + [1.0 + 0.25 * i for i in range(1, 9)]
    log = _overload_log(ends)
    times, _ = split_h2load_log(log, warmup_s=0)
    mean_batch_ms = 1000 * (ends[-1] - ends[0]) / (len(ends) - 1)
    p99 = sorted(times[200])[int(0.99 * len(times[200]))]
    assert p99 / mean_batch_ms > 3  # against the run's mean, the slow phase is the tail
    figures = latency_in_local_batches(log, warmup_s=0, batch_ms=mean_batch_ms)
    assert figures is not None
    assert 1.9 <= figures["p50"] <= figures["p99"] <= 2.1, figures
    # Bursts are marked from the first answer on; ratios need two intervals behind them.
    assert figures["bursts"] == len(ends) - 2 and figures["mean_burst"] == 4.0
    assert figures["count"] == 4 * (len(ends) - 4)
    assert figures["burst_interval_ms"] == {"count": len(ends) - 3, "p50": 250.0, "p90": 250.0}


def test_a_request_that_waited_a_batch_more_shows_in_batch_times() -> None:
    ends = [0.1 * i for i in range(30)]
    figures = latency_in_local_batches(_overload_log(ends, late=3), warmup_s=0, batch_ms=100)
    assert figures is not None
    assert figures["p50"] == pytest.approx(2.0, abs=0.05) and figures["max"] >= 2.9, figures


def test_the_warm_up_marks_bursts_but_is_not_counted() -> None:
    ends = [0.1 * i for i in range(20)]
    everything = latency_in_local_batches(_overload_log(ends), warmup_s=0, batch_ms=100)
    measured = latency_in_local_batches(_overload_log(ends), warmup_s=1, batch_ms=100)
    assert everything is not None and measured is not None
    assert measured["bursts"] == everything["bursts"]
    assert 0 < measured["count"] < everything["count"]


def test_batches_too_short_or_too_few_to_tell_apart_give_no_figure() -> None:
    ends = [0.1 * i for i in range(20)]
    assert latency_in_local_batches(_overload_log(ends), warmup_s=0, batch_ms=2) is None  # compiled
    assert latency_in_local_batches(_overload_log(ends[:4]), warmup_s=0, batch_ms=100) is None
    assert latency_in_local_batches("", warmup_s=0, batch_ms=100) is None


def test_answers_group_into_bursts_at_gaps_longer_than_given() -> None:
    answers = [(100.0, 0.0), (0.0, 0.0), (3.0, 0.0), (104.0, 0.0), (250.0, 0.0)]
    assert [len(b) for b in answer_bursts(answers, gap_ms=25)] == [2, 2, 1]
    assert [len(b) for b in answer_bursts(answers, gap_ms=200)] == [5]
