"""The bench harness's own arithmetic, without servers or load generators."""

from __future__ import annotations

import pytest
from bench.harness import h2load_plan, parse_h2load_summary, split_h2load_log

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
