"""The ring queue in pure Python: the reference for ``_queue.pyx`` and its fallback.

One queue serves one loaded (model, version). It owns a preallocated
``capacity_rows x n_features`` float64 buffer; every request gets a contiguous run of rows
in it, written once by the codec and read in place by predict.

Life of a request: ``reserve`` (admission) -> ``write*`` into its rows -> ``commit`` (or
``abort`` on bad input) -> ``drain`` puts it in a batch -> ``release`` frees the batch's rows.

Slots are numbered by three ever-growing counters, ``head <= drained <= tail``:
``[head, drained)`` are in batches not yet released, ``[drained, tail)`` wait in the queue.
A slot's index in the per-slot arrays is its counter modulo ``capacity_rows`` (a request has
at least one row, so there are never more live slots than rows).

Rows are a FIFO ring too: ``row_head`` is the first row of slot ``head``, ``row_tail`` the
next row to hand out. When a request does not fit before the buffer's end it starts again
at row 0 (``wrapped``) and the rows it skipped stay unused until the head passes them. A
batch never crosses that seam, so a batch is always a view of the buffer, never a copy.

Only the newest reservation can be aborted, and only right after it was made: the hot path
reserves, writes and commits (or aborts) without yielding to the event loop, so no other
reservation can come in between, and one undo record is all the queue keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FULL = -1
"""``reserve`` refused: the queued rows would pass ``max_queue_depth``, or no room is left."""


def default_capacity_rows(max_batch_rows: int, max_queue_depth: int) -> int:
    """Rows that the queue can never run out of while its depth limit holds.

    Worst case: a batch in predict holding an expired prefix (``max_queue_depth``) and its
    live rows (up to the larger of a batch and one request), a full queue behind it
    (``max_queue_depth``) and the rows skipped at the seam (less than one request).
    """
    return 4 * max_queue_depth + max_batch_rows


class Batch:
    """What one ``drain`` hands out: live requests for one predict, and expired ones to refuse."""

    __slots__ = ("start", "n_rows", "rows", "waiters", "sizes", "expired", "first_slot", "n_slots")

    def __init__(
        self,
        start: int,
        n_rows: int,
        rows: np.ndarray[Any, Any] | None,
        waiters: list[object],
        sizes: list[int],
        expired: list[object],
        first_slot: int,
        n_slots: int,
    ) -> None:
        self.start = start
        self.n_rows = n_rows
        self.rows = rows  # a view of the queue's buffer; None when every request expired
        self.waiters = waiters
        self.sizes = sizes
        self.expired = expired
        self.first_slot = first_slot
        self.n_slots = n_slots


class RingQueue:
    """Admission, row storage and greedy batch draining for one (model, version)."""

    def __init__(
        self,
        n_features: int,
        *,
        max_batch_rows: int,
        max_queue_depth: int,
        timeout_ns: int,
        capacity_rows: int = 0,
    ) -> None:
        if n_features < 1 or max_batch_rows < 1 or max_queue_depth < 1 or timeout_ns < 1:
            raise ValueError("n_features, max_batch_rows, max_queue_depth and timeout_ns must be positive")
        if capacity_rows <= 0:
            capacity_rows = default_capacity_rows(max_batch_rows, max_queue_depth)
        if capacity_rows < max_queue_depth:
            raise ValueError("capacity_rows must hold at least max_queue_depth rows")
        self.n_features = n_features
        self.max_batch_rows = max_batch_rows
        self.max_queue_depth = max_queue_depth
        self.timeout_ns = timeout_ns
        self.capacity_rows = capacity_rows
        self.buffer = np.zeros((capacity_rows, n_features), dtype=np.float64)

        # Per-slot records, indexed by slot counter % capacity_rows.
        self._start = [0] * capacity_rows
        self._rows = [0] * capacity_rows
        self._enqueued_ns = [0] * capacity_rows
        self._committed = [False] * capacity_rows
        self._waiter: list[object] = [None] * capacity_rows

        self._head = 0  # oldest slot not yet released
        self._drained = 0  # oldest slot still waiting in the queue
        self._tail = 0  # next slot to reserve
        self._row_head = 0
        self._row_tail = 0
        self._wrapped = False  # live rows run [row_head, capacity) then [0, row_tail)
        self._undo_row_tail = 0  # how to take back the newest reservation
        self._undo_wrapped = False
        self._undo_tail = -1  # the tail right after the reservation the undo is for
        self.queued_rows = 0  # rows reserved or committed, not yet drained

    # -- admission -------------------------------------------------------------------------

    def reserve(self, n_rows: int) -> int:
        """Rows for one request: the slot index, or ``FULL`` when admission is refused."""
        if n_rows < 1:
            raise ValueError("a request has at least one row")
        if self.queued_rows + n_rows > self.max_queue_depth:
            return FULL
        if self._tail == self._head:
            # Empty: start over at row 0 so the whole buffer is one free run.
            self._row_head = self._row_tail = 0
            self._wrapped = False
        start = self._place(n_rows)
        if start < 0:
            return FULL
        self._undo_row_tail = self._row_tail
        self._undo_wrapped = self._wrapped
        if start == 0 and self._row_tail != 0:
            self._wrapped = True
        self._row_tail = start + n_rows
        slot = self._tail % self.capacity_rows
        self._start[slot] = start
        self._rows[slot] = n_rows
        self._committed[slot] = False
        self._tail += 1
        self._undo_tail = self._tail
        self.queued_rows += n_rows
        return slot

    def _place(self, n_rows: int) -> int:
        """First row of a free contiguous run of ``n_rows``, or -1."""
        if self._wrapped:
            return self._row_tail if self._row_head - self._row_tail >= n_rows else -1
        if self.capacity_rows - self._row_tail >= n_rows:
            return self._row_tail
        return 0 if self._row_head >= n_rows else -1

    def rows(self, slot: int) -> np.ndarray[Any, Any]:
        """The slot's rows: a writable view of the buffer."""
        start = self._start[slot]
        return self.buffer[start : start + self._rows[slot]]

    def write(self, slot: int, instances: Sequence[Sequence[float]]) -> None:
        """Copy rows of numbers into the slot; ``ValueError`` names the first bad row."""
        if len(instances) != self._rows[slot]:
            raise ValueError(f"expected {self._rows[slot]} rows, got {len(instances)}")
        view = self.rows(slot)
        for i, row in enumerate(instances):
            if len(row) != self.n_features:
                raise ValueError(f"row {i} has {len(row)} features, expected {self.n_features}")
            view[i] = row
        self._check_finite(view)

    def write_one(self, slot: int, features: Sequence[float]) -> None:
        """Copy one row of numbers into a one-row slot."""
        if self._rows[slot] != 1:
            raise ValueError(f"expected {self._rows[slot]} rows, got 1")
        if len(features) != self.n_features:
            raise ValueError(f"row 0 has {len(features)} features, expected {self.n_features}")
        view = self.rows(slot)
        view[0] = features
        self._check_finite(view)

    def write_bytes(self, slot: int, data: bytes) -> None:
        """Copy little-endian float64 rows, row-major, into the slot."""
        view = self.rows(slot)
        if len(data) != view.size * 8:
            raise ValueError(f"expected {view.size * 8} bytes of float64, got {len(data)}")
        view.reshape(-1)[:] = np.frombuffer(data, dtype="<f8")
        self._check_finite(view)

    @staticmethod
    def _check_finite(view: np.ndarray[Any, Any]) -> None:
        if not np.isfinite(view).all():
            bad = int(np.argwhere(~np.isfinite(view))[0][0])
            raise ValueError(f"row {bad} holds NaN or infinity")

    def commit(self, slot: int, waiter: object, now_ns: int) -> None:
        """Make the slot visible to ``drain``; ``waiter`` comes back in its batch."""
        self._waiter[slot] = waiter
        self._enqueued_ns[slot] = now_ns
        self._committed[slot] = True

    def abort(self, slot: int) -> None:
        """Take back the newest reservation (its rows held bad input)."""
        newest = (self._tail - 1) % self.capacity_rows
        if self._undo_tail != self._tail or self._tail == self._drained or slot != newest:
            raise ValueError("only the newest reservation can be aborted")
        if self._committed[slot]:
            raise ValueError("a committed slot cannot be aborted")
        self._tail -= 1
        self.queued_rows -= self._rows[slot]
        self._row_tail = self._undo_row_tail
        self._wrapped = self._undo_wrapped
        self._undo_tail = -1

    # -- draining --------------------------------------------------------------------------

    def oldest_enqueued_ns(self) -> int:
        """Enqueue time of the first waiting request, or -1 when none is committed."""
        if self._drained == self._tail:
            return -1
        slot = self._drained % self.capacity_rows
        return self._enqueued_ns[slot] if self._committed[slot] else -1

    def expire(self, now_ns: int) -> Batch | None:
        """Only the expired requests cut from the head, as a batch with no rows; or ``None``.

        For a batcher whose model is busy: its queued requests must still meet their
        deadlines. The batch is released like any other, in the order it was drained.
        """
        first_slot = self._drained
        expired: list[object] = []
        while self._drained < self._tail:
            slot = self._drained % self.capacity_rows
            if not self._committed[slot] or now_ns - self._enqueued_ns[slot] < self.timeout_ns:
                break
            expired.append(self._waiter[slot])
            self._drained += 1
            self.queued_rows -= self._rows[slot]
        if not expired:
            return None
        return Batch(0, 0, None, [], [], expired, first_slot, len(expired))

    def drain(self, now_ns: int) -> Batch | None:
        """The next batch: expired requests cut from the head, then the longest committed run.

        The run stops before ``max_batch_rows`` would be passed (a single request larger than
        that is a batch of its own), before an uncommitted slot, and at the buffer's seam.
        """
        n_slots_total = self.capacity_rows
        first_slot = self._drained
        expired: list[object] = []
        while self._drained < self._tail:
            slot = self._drained % n_slots_total
            if not self._committed[slot] or now_ns - self._enqueued_ns[slot] < self.timeout_ns:
                break
            expired.append(self._waiter[slot])
            self._drained += 1
            self.queued_rows -= self._rows[slot]

        start = -1
        n_rows = 0
        waiters: list[object] = []
        sizes: list[int] = []
        while self._drained < self._tail:
            slot = self._drained % n_slots_total
            size = self._rows[slot]
            if not self._committed[slot]:
                break
            if start < 0:
                start = self._start[slot]
            elif n_rows + size > self.max_batch_rows or self._start[slot] != start + n_rows:
                break
            waiters.append(self._waiter[slot])
            sizes.append(size)
            n_rows += size
            self._drained += 1
            self.queued_rows -= size

        n_slots = self._drained - first_slot
        if n_slots == 0:
            return None
        if start < 0:
            start = 0
        rows = self.buffer[start : start + n_rows] if n_rows else None
        return Batch(start, n_rows, rows, waiters, sizes, expired, first_slot, n_slots)

    def release(self, batch: Batch) -> None:
        """Give a batch's rows back; batches are released in the order they were drained."""
        if batch.first_slot != self._head or batch.n_slots > self._drained - self._head:
            raise ValueError("batches are released in the order they were drained")
        for counter in range(self._head, self._head + batch.n_slots):
            self._waiter[counter % self.capacity_rows] = None
        self._head += batch.n_slots
        if self._head == self._tail:
            self._row_head = self._row_tail = 0
            self._wrapped = False
            return
        new_head = self._start[self._head % self.capacity_rows]
        if self._wrapped and new_head < self._row_head:
            self._wrapped = False
        self._row_head = new_head
