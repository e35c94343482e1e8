"""The ring queue: every test runs against the Python reference (``py``) and the compiled twin (``c``).

The property test at the end drives both with the same random operations and compares them
after every step, and both against a trivial FIFO model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fastserve
from fastserve import _queue_py
from fastserve._queue_py import FULL, default_capacity_rows

NO_EXTENSIONS = os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1"

try:
    from fastserve import _queue
except ImportError:  # only tolerated where the suite was asked to run without extensions
    if not NO_EXTENSIONS:
        raise
    _queue = None  # type: ignore[assignment]

IMPLEMENTATIONS: dict[str, Any] = {"py": _queue_py.RingQueue}
if _queue is not None:
    IMPLEMENTATIONS["c"] = _queue.RingQueue

MakeQueue = Callable[..., Any]


@pytest.fixture(params=["py", "c"])
def make_queue(request: pytest.FixtureRequest) -> MakeQueue:
    """A factory for one implementation's queues, with small defaults."""
    if request.param not in IMPLEMENTATIONS:
        pytest.skip("compiled queue not built (FASTSERVE_NO_EXTENSIONS=1)")
    cls = IMPLEMENTATIONS[request.param]

    def make(
        n_features: int = 2,
        *,
        max_batch_rows: int = 4,
        max_queue_depth: int = 8,
        timeout_ns: int = 1000,
        capacity_rows: int = 0,
    ) -> Any:
        return cls(
            n_features,
            max_batch_rows=max_batch_rows,
            max_queue_depth=max_queue_depth,
            timeout_ns=timeout_ns,
            capacity_rows=capacity_rows,
        )

    return make


def rows_of(n_rows: int, n_features: int, first: float = 0.0) -> list[list[float]]:
    return [[first + r * n_features + f + 0.5 for f in range(n_features)] for r in range(n_rows)]


def put(q: Any, n_rows: int, waiter: object, now_ns: int = 0, first: float = 0.0) -> int:
    """Reserve, write and commit one request; its slot."""
    slot = q.reserve(n_rows)
    assert slot != FULL
    q.write(slot, rows_of(n_rows, q.n_features, first))
    q.commit(slot, waiter, now_ns)
    return int(slot)


def start_row(q: Any, view: np.ndarray[Any, Any]) -> int:
    """Which buffer row a view of the buffer starts at."""
    assert np.shares_memory(view, q.buffer)
    offset = view.__array_interface__["data"][0] - q.buffer.__array_interface__["data"][0]
    return int(offset // (8 * q.n_features))


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["py", "c"])
def test_module_api(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        pytest.skip("compiled queue not built (FASTSERVE_NO_EXTENSIONS=1)")
    module = sys.modules[IMPLEMENTATIONS[name].__module__]
    assert module.FULL == -1
    assert module.default_capacity_rows(4, 8) == 36
    rows = np.zeros((2, 1))
    batch = module.Batch(3, 2, rows, ["w"], [2], ["x"], 7, 2)
    assert (batch.start, batch.n_rows, batch.waiters, batch.sizes) == (3, 2, ["w"], [2])
    assert (batch.expired, batch.first_slot, batch.n_slots) == (["x"], 7, 2)
    assert batch.rows is rows


def test_construction(make_queue: MakeQueue) -> None:
    q = make_queue(3, max_batch_rows=4, max_queue_depth=8, timeout_ns=7)
    assert (q.n_features, q.max_batch_rows, q.max_queue_depth, q.timeout_ns) == (3, 4, 8, 7)
    assert q.capacity_rows == default_capacity_rows(4, 8) == 4 * 8 + 4
    assert q.buffer.shape == (q.capacity_rows, 3)
    assert q.buffer.dtype == np.float64
    assert q.buffer.flags.c_contiguous
    assert q.queued_rows == 0
    assert q.oldest_enqueued_ns() == -1
    assert q.drain(10**9) is None
    assert make_queue(capacity_rows=9, max_queue_depth=9).capacity_rows == 9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_features": 0}, "must be positive"),
        ({"max_batch_rows": 0}, "must be positive"),
        ({"max_queue_depth": 0}, "must be positive"),
        ({"timeout_ns": 0}, "must be positive"),
        ({"max_queue_depth": 8, "capacity_rows": 7}, "capacity_rows must hold at least max_queue_depth rows"),
    ],
)
def test_construction_refuses(make_queue: MakeQueue, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_queue(**kwargs)


def test_constructor_options_are_keyword_only(make_queue: MakeQueue) -> None:
    cls = type(make_queue())
    with pytest.raises(TypeError):
        cls(2, 4, 8, 1000)


# -- round trip --------------------------------------------------------------------------------


def test_round_trip(make_queue: MakeQueue) -> None:
    q = make_queue(3)
    data = rows_of(2, 3)
    slot = q.reserve(2)
    assert slot == 0
    assert q.queued_rows == 2
    q.write(slot, data)
    assert np.array_equal(q.rows(slot), data)
    q.commit(slot, "a", 5)
    batch = q.drain(6)
    assert batch is not None
    assert (batch.start, batch.n_rows, batch.waiters, batch.sizes, batch.expired) == (0, 2, ["a"], [2], [])
    assert (batch.first_slot, batch.n_slots) == (0, 1)
    assert np.array_equal(batch.rows, data)
    assert np.shares_memory(batch.rows, q.buffer)
    assert q.queued_rows == 0
    assert q.drain(7) is None
    q.release(batch)
    assert q.reserve(1) == 1  # slots keep counting after a release


def test_round_trip_of_every_write(make_queue: MakeQueue) -> None:
    q = make_queue(3)
    one = q.reserve(1)
    q.write_one(one, [1.0, 2.0, 3.0])
    q.commit(one, "one", 0)
    raw = q.reserve(2)
    q.write_bytes(raw, np.arange(6, dtype="<f8").tobytes())
    q.commit(raw, "raw", 0)
    view = q.reserve(1)
    q.rows(view)[:] = [[7.0, 8.0, 9.0]]  # the slot's rows are a writable view
    q.commit(view, "view", 0)
    batch = q.drain(1)
    assert batch is not None
    assert batch.waiters == ["one", "raw", "view"]
    assert batch.sizes == [1, 2, 1]
    assert batch.rows.tolist() == [[1, 2, 3], [0, 1, 2], [3, 4, 5], [7, 8, 9]]


def test_ints_are_numbers(make_queue: MakeQueue) -> None:
    q = make_queue(2)
    slot = q.reserve(2)
    q.write(slot, [[1, 2], [-3, 2**40]])
    assert q.rows(slot).tolist() == [[1.0, 2.0], [-3.0, float(2**40)]]
    slot_one = q.reserve(1)
    q.write_one(slot_one, [5, 6.5])
    assert q.rows(slot_one).tolist() == [[5.0, 6.5]]


def test_rows_other_than_lists(make_queue: MakeQueue) -> None:
    q = make_queue(2)
    slot = q.reserve(2)
    q.write(slot, ((1.0, 2.0), np.array([3.0, 4.0])))
    assert q.rows(slot).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    q.write(slot, np.array([[5.0, 6.0], [7.0, 8.0]]))
    assert q.rows(slot).tolist() == [[5.0, 6.0], [7.0, 8.0]]
    q.write_bytes(slot, bytearray(np.arange(4.0).tobytes()))
    assert q.rows(slot).tolist() == [[0.0, 1.0], [2.0, 3.0]]


# -- admission ---------------------------------------------------------------------------------


def test_refused_past_max_queue_depth_then_admitted_after_drain(make_queue: MakeQueue) -> None:
    q = make_queue(max_batch_rows=4, max_queue_depth=4)
    put(q, 3, "a")
    assert q.reserve(2) == FULL
    assert q.queued_rows == 3
    put(q, 1, "b")
    assert q.reserve(1) == FULL
    batch = q.drain(1)
    assert batch is not None and batch.n_rows == 4
    # Depth counts queued rows, not rows in a batch that is still in predict.
    assert q.queued_rows == 0
    assert q.reserve(4) != FULL
    assert q.reserve(1) == FULL


def test_reserve_refuses_an_empty_request(make_queue: MakeQueue) -> None:
    q = make_queue()
    with pytest.raises(ValueError, match="a request has at least one row"):
        q.reserve(0)


def test_refused_when_no_room_is_left(make_queue: MakeQueue) -> None:
    # Rows of a batch in predict stay taken until release: a small explicit capacity runs out.
    q = make_queue(1, max_batch_rows=4, max_queue_depth=4, capacity_rows=4)
    put(q, 4, "a")
    batch = q.drain(1)
    assert q.queued_rows == 0
    assert q.reserve(1) == FULL
    q.release(batch)
    slot = q.reserve(4)
    assert start_row(q, q.rows(slot)) == 0


# -- draining ----------------------------------------------------------------------------------


def test_request_bigger_than_a_batch_is_a_batch_of_its_own(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=2, max_queue_depth=8)
    put(q, 1, "small")
    put(q, 5, "big")
    put(q, 1, "after")
    sizes = []
    while (batch := q.drain(1)) is not None:
        sizes.append((batch.waiters, batch.n_rows))
        q.release(batch)
    assert sizes == [(["small"], 1), (["big"], 5), (["after"], 1)]


def test_greedy_drain_stops_at_max_batch_rows(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=4, max_queue_depth=8)
    for name, n_rows in [("a", 1), ("b", 2), ("c", 1), ("d", 1)]:
        put(q, n_rows, name)
    first = q.drain(1)
    second = q.drain(1)
    assert first is not None and second is not None
    assert (first.waiters, first.sizes, first.n_rows) == (["a", "b", "c"], [1, 2, 1], 4)
    assert (second.waiters, second.start, second.first_slot) == (["d"], 4, 3)
    assert q.drain(1) is None


def test_drain_stops_before_an_uncommitted_slot(make_queue: MakeQueue) -> None:
    q = make_queue(1)
    put(q, 1, "a")
    pending = q.reserve(1)
    put(q, 1, "c")
    batch = q.drain(1)
    assert batch is not None and batch.waiters == ["a"]
    assert q.drain(1) is None
    assert q.oldest_enqueued_ns() == -1
    q.write_one(pending, [2.0])
    q.commit(pending, "b", 1)
    batch = q.drain(1)
    assert batch is not None and batch.waiters == ["b", "c"]


def test_a_batch_never_crosses_the_seam(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=4, max_queue_depth=5, capacity_rows=6)
    put(q, 3, "a", first=0)  # rows 0-2
    put(q, 2, "b", first=10)  # rows 3-4
    first = q.drain(1)
    assert first is not None and first.waiters == ["a"]  # a + b would be 5 rows
    q.release(first)
    # Only row 5 is left before the end: the next request starts again at row 0.
    slot = q.reserve(2)
    assert start_row(q, q.rows(slot)) == 0
    q.write(slot, [[20.0], [21.0]])
    q.commit(slot, "c", 1)
    # b and c would fit one batch (4 rows) but lie on both sides of the seam.
    second = q.drain(2)
    assert second is not None
    assert (second.waiters, second.start, second.n_rows) == (["b"], 3, 2)
    assert np.shares_memory(second.rows, q.buffer)
    assert start_row(q, second.rows) == 3
    assert second.rows.ravel().tolist() == [10.5, 11.5]
    # b is still in predict: rows 3-4 are taken and row 2 alone is free, too little for 2 rows.
    assert q.queued_rows == 2
    assert q.reserve(2) == FULL
    q.release(second)
    third = q.drain(3)
    assert third is not None
    assert (third.waiters, third.start) == (["c"], 0)
    assert np.shares_memory(third.rows, q.buffer)
    assert third.rows.ravel().tolist() == [20.0, 21.0]


def test_expired_requests_are_cut_out(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=8, timeout_ns=100)
    put(q, 1, "a", now_ns=0)
    put(q, 2, "b", now_ns=50)
    put(q, 1, "c", now_ns=120, first=7)
    batch = q.drain(150)  # a is 150 ns old, b exactly 100: both expired
    assert batch is not None
    assert batch.expired == ["a", "b"]
    assert (batch.waiters, batch.sizes, batch.n_rows, batch.start) == (["c"], [1], 1, 3)
    assert batch.rows.ravel().tolist() == [7.5]
    assert (batch.first_slot, batch.n_slots) == (0, 3)
    assert q.queued_rows == 0
    q.release(batch)


def test_a_batch_of_only_expired_requests_has_no_rows(make_queue: MakeQueue) -> None:
    q = make_queue(1, timeout_ns=10)
    put(q, 2, "a", now_ns=0)
    put(q, 1, "b", now_ns=5)
    batch = q.drain(1000)
    assert batch is not None
    assert batch.expired == ["a", "b"]
    assert batch.rows is None
    assert (batch.n_rows, batch.start, batch.waiters, batch.sizes) == (0, 0, [], [])
    q.release(batch)
    assert q.reserve(1) != FULL


def test_expire_cuts_only_the_expired_prefix_while_a_batch_is_in_predict(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=1, timeout_ns=100)
    put(q, 1, "in predict", now_ns=0)
    put(q, 1, "a", now_ns=10)
    put(q, 2, "b", now_ns=20)
    put(q, 1, "fresh", now_ns=200, first=9)
    in_predict = q.drain(5)
    assert in_predict is not None and in_predict.waiters == ["in predict"]
    assert q.expire(50) is None  # nobody past the deadline yet
    held = q.expire(150)
    assert held is not None
    assert (held.expired, held.waiters, held.sizes, held.n_rows, held.rows) == (["a", "b"], [], [], 0, None)
    assert (held.first_slot, held.n_slots) == (1, 2)
    assert q.queued_rows == 1  # only the fresh request waits
    with pytest.raises(ValueError, match="in the order they were drained"):
        q.release(held)  # the batch in predict goes first
    q.release(in_predict)
    q.release(held)
    batch = q.drain(210)
    assert batch is not None and (batch.expired, batch.waiters) == ([], ["fresh"])
    assert batch.rows.ravel().tolist() == [9.5]
    q.release(batch)
    assert q.queued_rows == 0 and q.expire(10_000) is None


def test_expiry_stops_at_the_first_fresh_request(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=8, timeout_ns=100)
    put(q, 1, "fresh", now_ns=90)
    put(q, 1, "stale", now_ns=0)  # out of order: FIFO, it rides along
    batch = q.drain(150)
    assert batch is not None
    assert (batch.expired, batch.waiters) == ([], ["fresh", "stale"])


def test_oldest_enqueued_ns(make_queue: MakeQueue) -> None:
    q = make_queue(1)
    assert q.oldest_enqueued_ns() == -1
    slot = q.reserve(1)
    assert q.oldest_enqueued_ns() == -1  # reserved, not committed
    q.write_one(slot, [1.0])
    q.commit(slot, "a", 42)
    put(q, 1, "b", now_ns=50)
    assert q.oldest_enqueued_ns() == 42
    batch = q.drain(60)
    assert batch is not None and batch.n_slots == 2
    assert q.oldest_enqueued_ns() == -1
    put(q, 1, "c", now_ns=70)
    assert q.oldest_enqueued_ns() == 70


# -- abort and release -------------------------------------------------------------------------


def test_abort_of_the_newest_reservation(make_queue: MakeQueue) -> None:
    q = make_queue(2)
    put(q, 2, "a")
    slot = q.reserve(3)
    assert q.queued_rows == 5
    q.abort(slot)
    assert q.queued_rows == 2
    again = q.reserve(1)
    assert again == slot
    assert start_row(q, q.rows(again)) == 2
    q.write_one(again, [1.0, 1.0])
    q.commit(again, "b", 0)
    batch = q.drain(1)
    assert batch is not None and batch.waiters == ["a", "b"]


def test_abort_restores_admission(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_queue_depth=3)
    slot = q.reserve(3)
    assert q.reserve(1) == FULL
    q.abort(slot)
    assert q.queued_rows == 0
    assert q.reserve(3) == slot


def test_abort_undoes_a_wrap(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=4, max_queue_depth=5, capacity_rows=6)
    put(q, 3, "a")
    put(q, 2, "b")
    first = q.drain(1)
    q.release(first)
    wrapped = q.reserve(2)  # does not fit in row 5: wraps to row 0
    assert start_row(q, q.rows(wrapped)) == 0
    q.abort(wrapped)
    slot = q.reserve(1)  # fits before the end again
    assert start_row(q, q.rows(slot)) == 5
    q.write_one(slot, [9.0])
    q.commit(slot, "c", 0)
    batch = q.drain(1)
    assert batch is not None
    assert (batch.waiters, batch.start, batch.n_rows) == (["b", "c"], 3, 3)


def test_abort_undoes_only_the_reservation_just_made(make_queue: MakeQueue) -> None:
    q = make_queue(1)
    first = q.reserve(1)
    second = q.reserve(1)
    q.abort(second)
    # The undo record was for the second reservation: the first cannot be taken back now.
    with pytest.raises(ValueError, match="only the newest reservation can be aborted"):
        q.abort(first)
    q.write_one(first, [1.0])
    q.commit(first, "a", 0)
    again = q.reserve(1)
    assert again == second
    assert np.shares_memory(q.rows(again), q.buffer[1:2])


def test_abort_refuses_other_slots(make_queue: MakeQueue) -> None:
    q = make_queue(1)
    with pytest.raises(ValueError, match="only the newest reservation can be aborted"):
        q.abort(0)  # nothing queued
    older = q.reserve(1)
    newer = q.reserve(1)
    with pytest.raises(ValueError, match="only the newest reservation can be aborted"):
        q.abort(older)
    with pytest.raises(ValueError, match="only the newest reservation can be aborted"):
        q.abort(FULL)
    q.write_one(newer, [1.0])
    q.commit(newer, "b", 0)
    with pytest.raises(ValueError, match="a committed slot cannot be aborted"):
        q.abort(newer)
    q.write_one(older, [1.0])
    q.commit(older, "a", 0)
    assert q.drain(1) is not None
    with pytest.raises(ValueError, match="only the newest reservation can be aborted"):
        q.abort(newer)  # drained


def test_release_out_of_order(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_batch_rows=1)
    put(q, 1, "a")
    put(q, 1, "b")
    first, second = q.drain(1), q.drain(1)
    with pytest.raises(ValueError, match="batches are released in the order they were drained"):
        q.release(second)
    q.release(first)
    with pytest.raises(ValueError, match="batches are released in the order they were drained"):
        q.release(first)  # twice
    q.release(second)
    assert q.reserve(1) != FULL


def test_release_frees_the_waiters(make_queue: MakeQueue) -> None:
    q = make_queue(1)

    class Waiter:
        pass

    waiter = Waiter()
    ref = weakref.ref(waiter)
    put(q, 1, waiter)
    batch = q.drain(1)
    del waiter
    q.release(batch)
    del batch
    assert ref() is None


def test_slot_index_out_of_range(make_queue: MakeQueue) -> None:
    q = make_queue(1, max_queue_depth=4, capacity_rows=4)
    with pytest.raises(IndexError):
        q.rows(4)
    with pytest.raises(IndexError):
        q.write_one(4, [1.0])
    with pytest.raises(IndexError):
        q.commit(-5, "x", 0)


# -- write errors ------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([[1.0, 2.0, 3.0]], r"^expected 2 rows, got 1$"),
        ([[1.0, 2.0, 3.0]] * 3, r"^expected 2 rows, got 3$"),
        ([[1.0, 2.0], [1.0, 2.0]], r"^row 0 has 2 features, expected 3$"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0]], r"^row 1 has 2 features, expected 3$"),  # ragged
        ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], r"^row 1 has 4 features, expected 3$"),
        ([[1.0, NAN, 3.0], [1.0, 2.0, 3.0]], r"^row 0 holds NaN or infinity$"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0, INF]], r"^row 1 holds NaN or infinity$"),
        ([[1.0, 2.0, 3.0], [-INF, 2.0, 3.0]], r"^row 1 holds NaN or infinity$"),
        ([[NAN, 2.0, 3.0], [1.0, INF, 3.0]], r"^row 0 holds NaN or infinity$"),
        # Every row's length is checked before any value is: the ragged row wins.
        ([[NAN, 2.0, 3.0], [1.0, 2.0]], r"^row 1 has 2 features, expected 3$"),
        ([[1.0, 2.0, 3.0], [1, 2, None]], r"^row 1 holds NaN or infinity$"),  # numpy: None is NaN
    ],
)
def test_write_refuses(make_queue: MakeQueue, instances: list[list[float]], message: str) -> None:
    q = make_queue(3)
    slot = q.reserve(2)
    with pytest.raises(ValueError, match=message):
        q.write(slot, instances)
    q.abort(slot)
    assert q.queued_rows == 0


@pytest.mark.parametrize(
    ("slot_rows", "features", "message"),
    [
        (1, [1.0, 2.0], r"^row 0 has 2 features, expected 3$"),
        (1, [1.0, 2.0, 3.0, 4.0], r"^row 0 has 4 features, expected 3$"),
        (1, [1.0, NAN, 3.0], r"^row 0 holds NaN or infinity$"),
        (1, [INF, 2.0, 3.0], r"^row 0 holds NaN or infinity$"),
        (1, [1.0, 2.0, -INF], r"^row 0 holds NaN or infinity$"),
        (2, [1.0, 2.0, 3.0], r"^expected 2 rows, got 1$"),
    ],
)
def test_write_one_refuses(
    make_queue: MakeQueue, slot_rows: int, features: list[float], message: str
) -> None:
    q = make_queue(3)
    slot = q.reserve(slot_rows)
    with pytest.raises(ValueError, match=message):
        q.write_one(slot, features)


@pytest.mark.parametrize(
    ("values", "n_bytes", "message"),
    [
        ([1.0] * 6, 47, r"^expected 48 bytes of float64, got 47$"),
        ([1.0] * 6, 56, r"^expected 48 bytes of float64, got 56$"),
        ([1.0, 2.0, 3.0, 4.0, NAN, 6.0], 48, r"^row 1 holds NaN or infinity$"),
        ([INF, 2.0, 3.0, 4.0, 5.0, 6.0], 48, r"^row 0 holds NaN or infinity$"),
        ([1.0, 2.0, 3.0, 4.0, 5.0, -INF], 48, r"^row 1 holds NaN or infinity$"),
    ],
)
def test_write_bytes_refuses(make_queue: MakeQueue, values: list[float], n_bytes: int, message: str) -> None:
    q = make_queue(3)
    slot = q.reserve(2)
    data = (np.array(values, dtype="<f8").tobytes() + bytes(8))[:n_bytes]
    with pytest.raises(ValueError, match=message):
        q.write_bytes(slot, data)


@pytest.mark.parametrize("bad", ["abc", object(), [1.0], 1j])
def test_non_numbers_are_refused(make_queue: MakeQueue, bad: object) -> None:
    q = make_queue(2)
    slot = q.reserve(1)
    with pytest.raises((ValueError, TypeError)):
        q.write(slot, [[1.0, bad]])
    with pytest.raises((ValueError, TypeError)):
        q.write_one(slot, [bad, 1.0])


# -- which queue runs --------------------------------------------------------------------------


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTSERVE_NO_EXTENSIONS=1 picks the Python queue")
def test_a_normal_run_picks_the_compiled_queue() -> None:
    from fastserve import queue

    assert queue.COMPILED is True
    assert queue.RingQueue.__module__ == "fastserve._queue"
    assert queue.RingQueue is IMPLEMENTATIONS["c"]
    assert queue.Batch.__module__ == "fastserve._queue"


def test_no_extensions_picks_the_python_queue() -> None:
    src = str(Path(fastserve.__file__).resolve().parent.parent)
    env = {**os.environ, "FASTSERVE_NO_EXTENSIONS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    code = "from fastserve import queue as q; print(q.COMPILED, q.RingQueue.__module__, q.Batch.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "fastserve._queue_py", "fastserve._queue_py"]


# -- property test: both queues, one random history ------------------------------------------
#
# Hypothesis draws a queue configuration and a list of operations, each with its own RNG
# seed for its details (sizes, values, outcomes, clock steps): the falsifying example it
# prints is the whole history, seeds included, and replays exactly. Operation lists rather
# than a rule-based machine, so that the mix of operations keeps the ring turning (rows
# taken and freed all the time), which is where wraps, seams and refusals for room happen.


@dataclass
class Request:
    waiter: int
    slot: int
    data: np.ndarray[Any, Any]
    enqueued_ns: int


@dataclass
class Outstanding:
    py: Any
    c: Any
    requests: list[Request]  # the live ones, in batch order


BATCH_FIELDS = ("start", "n_rows", "waiters", "sizes", "expired", "first_slot", "n_slots")


class Twins:
    """One Python and one compiled queue, driven alike and compared after every step.

    Beside the comparison, a trivial model checks the queue's contract: admission by depth,
    every committed request out exactly once and in FIFO order, expiry, batch limits and the
    seam, and that no row of a request is overwritten before its batch is released.
    """

    def __init__(self, n_features: int, *, default_capacity: bool, **kwargs: int) -> None:
        self.py = _queue_py.RingQueue(n_features, **kwargs)
        self.c = IMPLEMENTATIONS["c"](n_features, **kwargs)
        self.default_capacity = default_capacity
        self.now = 0
        self.next_waiter = 0
        self.waiting: deque[Request] = deque()  # committed, not drained
        self.outstanding: deque[Outstanding] = deque()  # drained, not released
        self.released: Outstanding | None = None
        self.committed: list[int] = []
        self.answered: list[int] = []
        self.seen: set[str] = set()  # which edge cases this history reached

    def both(self, method: str, *args: Any) -> tuple[Any, Any]:
        """Call a method on both queues: the same result, or the same exception (re-raised)."""
        results: list[Any] = []
        errors: list[Exception | None] = []
        for q in (self.py, self.c):
            try:
                results.append(getattr(q, method)(*args))
                errors.append(None)
            except (ValueError, TypeError, IndexError) as exc:
                results.append(None)
                errors.append(exc)
        error_py, error_c = errors
        assert repr(error_py) == repr(error_c), (method, errors)
        if error_py is not None:
            raise error_py
        return results[0], results[1]

    # -- operations ----------------------------------------------------------------------------

    def requests(self, rng: np.random.Generator) -> None:
        """A few requests arriving over a few nanoseconds."""
        for _ in range(rng.integers(1, 4)):
            self.now += int(rng.integers(0, 4))
            self.request(rng)

    def request(self, rng: np.random.Generator) -> None:
        """Reserve, write, then commit or abort: the hot path, with every way it can go."""
        depth = self.py.max_queue_depth
        # Mostly requests that the depth allows, sometimes any size up to past it.
        limit = max(1, depth // 2) if rng.random() < 0.8 else depth + 2
        n_rows = int(rng.integers(1, limit + 1))
        queued = sum(len(r.data) for r in self.waiting)
        slot, slot_c = self.both("reserve", n_rows)
        assert slot == slot_c
        if queued + n_rows > depth:
            assert slot == FULL
        elif not self.waiting and not self.outstanding:
            assert slot != FULL  # an empty queue has the whole buffer
        elif self.default_capacity and len(self.outstanding) <= 1:
            # The server's discipline (one batch in predict at a time): the default capacity
            # is what default_capacity_rows promises is enough.
            assert slot != FULL
        if slot == FULL:
            self.seen.add("refused: depth" if queued + n_rows > depth else "refused: no room")
            return
        if start_row(self.py, self.py.rows(slot)) == 0 and (self.waiting or self.outstanding):
            self.seen.add("wrapped to row 0")

        n_features = self.py.n_features
        outcome = rng.choice(["commit", "abort", "nan", "inf", "ragged"], p=[0.7, 0.1, 0.1, 0.05, 0.05])
        ints = rng.random() < 0.3  # Python ints in the lists, or floats
        values = rng.integers(-50, 50, (n_rows, n_features)).astype(np.float64)
        if not ints:
            values += rng.random((n_rows, n_features))
        bad_row = int(rng.integers(n_rows))
        if outcome in ("nan", "inf"):
            values[bad_row, rng.integers(n_features)] = np.nan if outcome == "nan" else -np.inf
        as_lists: list[list[Any]] = values.tolist()
        if ints and outcome not in ("nan", "inf"):
            as_lists = [[int(v) for v in row] for row in as_lists]
        if outcome == "ragged":
            as_lists[bad_row] = as_lists[bad_row] + [1.0]
        how = rng.choice(["write", "write_one", "write_bytes"])
        if how == "write_bytes" and outcome != "ragged":
            call: tuple[Any, ...] = ("write_bytes", slot, values.astype("<f8").tobytes())
        elif how == "write_one" and n_rows == 1:
            call = ("write_one", slot, as_lists[0])
        else:
            call = ("write", slot, as_lists)

        if outcome in ("nan", "inf", "ragged"):
            with pytest.raises(ValueError, match=f"^row {bad_row} "):
                self.both(*call)
            self.both("abort", slot)
            return
        self.both(*call)
        assert np.array_equal(self.py.rows(slot), values)
        assert np.array_equal(self.c.rows(slot), values)
        if outcome == "abort":
            self.both("abort", slot)
            return
        waiter = self.next_waiter
        self.next_waiter += 1
        self.both("commit", slot, waiter, self.now)
        self.waiting.append(Request(waiter, slot, values, self.now))
        self.committed.append(waiter)
        if rng.random() < 0.1:
            with pytest.raises(ValueError, match="a committed slot cannot be aborted"):
                self.both("abort", slot)

    def drain(self, rng: np.random.Generator) -> None:
        """Some time passes, then one drain."""
        self.now += int(rng.integers(0, 13))
        got_py, got_c = self.both("drain", self.now)
        assert (got_py is None) == (got_c is None)
        if got_py is None:
            assert not self.waiting
            return
        for name in BATCH_FIELDS:
            assert getattr(got_py, name) == getattr(got_c, name), name
        if got_py.rows is None:
            assert got_c.rows is None
        else:
            assert np.array_equal(got_py.rows, got_c.rows)
            assert np.shares_memory(got_py.rows, self.py.buffer)
            assert np.shares_memory(got_c.rows, self.c.buffer)
        self.check_against_model(got_py)
        for _ in got_py.expired:
            self.waiting.popleft()
        live = [self.waiting.popleft() for _ in got_py.waiters]
        self.answered += got_py.expired + got_py.waiters
        self.outstanding.append(Outstanding(got_py, got_c, live))

    def check_against_model(self, batch: Any) -> None:
        q = self.py
        expected = list(self.waiting)
        n_expired = len(batch.expired)
        # Expired: exactly the longest run at the head that is at least timeout_ns old.
        assert [r.waiter for r in expected[:n_expired]] == batch.expired
        assert all(self.now - r.enqueued_ns >= q.timeout_ns for r in expected[:n_expired])
        rest = expected[n_expired:]
        assert not rest or self.now - rest[0].enqueued_ns < q.timeout_ns
        # Live: the next requests in FIFO order, as one run of rows.
        live = rest[: len(batch.waiters)]
        assert [r.waiter for r in live] == batch.waiters
        assert batch.sizes == [len(r.data) for r in live]
        assert batch.n_rows == sum(batch.sizes)
        assert batch.n_slots == n_expired + len(live)
        if batch.expired:
            self.seen.add("expired requests cut out" if live else "only expired requests")
        if not live:
            assert (batch.rows, batch.start, batch.n_rows) == (None, 0, 0)
            assert not rest  # nothing fresh was left behind
            return
        if batch.n_rows > q.max_batch_rows:
            assert len(live) == 1
            self.seen.add("one request larger than a batch")
        assert batch.start == start_row(q, batch.rows)
        assert np.array_equal(batch.rows, np.concatenate([r.data for r in live]))
        if len(rest) > len(live):
            following = rest[len(live)]
            # The run stopped at the batch limit, or at the seam.
            if batch.n_rows + len(following.data) <= q.max_batch_rows:
                assert start_row(q, q.rows(following.slot)) != batch.start + batch.n_rows
                self.seen.add("batch stopped at the seam")

    def release(self, rng: np.random.Generator) -> None:
        """The oldest batch is through predict."""
        if not self.outstanding:
            return
        oldest = self.outstanding.popleft()
        self.py.release(oldest.py)
        self.c.release(oldest.c)
        self.released = oldest

    def release_out_of_order(self, rng: np.random.Generator) -> None:
        """Release a batch that is not the oldest, or one released already: both refuse."""
        candidates = list(self.outstanding)[1:] + ([self.released] if self.released else [])
        if not candidates:
            return
        wrong = candidates[rng.integers(len(candidates))]
        for q, batch in ((self.py, wrong.py), (self.c, wrong.c)):
            with pytest.raises(ValueError, match="batches are released in the order they were drained"):
                q.release(batch)

    # -- after every operation -----------------------------------------------------------------

    def check(self) -> None:
        assert self.py.queued_rows == self.c.queued_rows == sum(len(r.data) for r in self.waiting)
        oldest = self.waiting[0].enqueued_ns if self.waiting else -1
        assert self.py.oldest_enqueued_ns() == self.c.oldest_enqueued_ns() == oldest
        assert np.array_equal(self.py.buffer, self.c.buffer, equal_nan=True)
        # No request's rows are handed out again before its batch is released.
        for q in (self.py, self.c):
            for request in self.waiting:
                assert np.array_equal(q.rows(request.slot), request.data)
        for batch in self.outstanding:
            if batch.requests:
                expected = np.concatenate([r.data for r in batch.requests])
                assert np.array_equal(batch.py.rows, expected)
                assert np.array_equal(batch.c.rows, expected)

    def finish(self) -> None:
        """Release and drain everything: each committed request came out once, in order."""
        rng = np.random.default_rng(0)
        while self.outstanding:
            self.release(rng)
        while self.waiting:
            self.drain(rng)
            self.release(rng)
            self.check()
        assert self.answered == self.committed
        assert self.py.queued_rows == self.c.queued_rows == 0


CONFIGS = st.fixed_dictionaries(
    {
        "n_features": st.integers(1, 3),
        "max_batch_rows": st.integers(1, 6),
        "max_queue_depth": st.integers(1, 12),
        "timeout_ns": st.integers(1, 40),
        # None: the default capacity; else a small one, to force wraps and refusals for room.
        "spare_rows": st.one_of(st.none(), st.integers(0, 8), st.integers(0, 3)),
    }
)
# Weighted by repetition: requests and drains keep the ring turning.
OPERATIONS = ["requests"] * 4 + ["drain"] * 3 + ["release"] * 3 + ["release_out_of_order"]
HISTORIES = st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2**16)), min_size=20, max_size=100)
EDGE_CASES_SEEN: set[str] = set()


@pytest.mark.skipif("c" not in IMPLEMENTATIONS, reason="compiled queue not built")
@settings(max_examples=500, deadline=None)
@given(config=CONFIGS, history=HISTORIES)
def test_python_and_compiled_queues_agree(config: dict[str, Any], history: list[tuple[str, int]]) -> None:
    spare_rows = config.pop("spare_rows")
    depth = config["max_queue_depth"]
    twins = Twins(
        config.pop("n_features"),
        default_capacity=spare_rows is None,
        capacity_rows=0 if spare_rows is None else depth + spare_rows,
        **config,
    )
    for operation, seed in history:
        getattr(twins, operation)(np.random.default_rng(seed))
        twins.check()
    twins.finish()
    for case in twins.seen:
        event(case)
    EDGE_CASES_SEEN.update(twins.seen)


def test_the_property_test_reaches_the_edge_cases() -> None:
    # Runs after the property test (file order): a history generator that never wraps the
    # ring or refuses for room would make that test pass without testing much.
    if not EDGE_CASES_SEEN:
        pytest.skip("the property test did not run")
    assert EDGE_CASES_SEEN >= {
        "refused: depth",
        "refused: no room",
        "wrapped to row 0",
        "batch stopped at the seam",
        "expired requests cut out",
        "only expired requests",
        "one request larger than a batch",
    }
