"""The bench harness's own arithmetic, without servers or load generators."""

from __future__ import annotations

from bench.harness import split_h2load_log

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
