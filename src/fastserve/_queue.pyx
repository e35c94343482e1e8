# cython: language_level=3, boundscheck=False, wraparound=False
"""The ring queue, compiled: the same public behaviour as ``_queue_py.py``, the reference.

``_queue_py.py`` explains the design (the head/drained/tail counters, the row ring, the seam
and why only the newest reservation can be aborted); this module keeps its structure
line by line so that the two can be read side by side, and differs only in where the data
lives: per-slot records in C arrays, rows copied straight from the decoded message into the
buffer in one pass per value, with the finiteness check in the same pass.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.math cimport isfinite
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

import sys

import numpy as np

cdef extern from "Python.h":
    # Declared without an exception clause: a failed conversion is not an error here but
    # the cue to hand the row to numpy, exactly as the reference converts it.
    double _float_as_double "PyFloat_AsDouble"(object value)

FULL = -1
"""``reserve`` refused: the queued rows would pass ``max_queue_depth``, or no room is left."""

cdef enum:
    _FULL = -1

# memcpy of "<f8" data is only right on a little-endian host; elsewhere numpy swaps bytes.
cdef bint _LITTLE_ENDIAN = sys.byteorder == "little"


def default_capacity_rows(Py_ssize_t max_batch_rows, Py_ssize_t max_queue_depth):
    """Rows that the queue can never run out of while its depth limit holds.

    Worst case: a batch in predict holding an expired prefix (``max_queue_depth``) and its
    live rows (up to the larger of a batch and one request), a full queue behind it
    (``max_queue_depth``) and the rows skipped at the seam (less than one request).
    """
    return 4 * max_queue_depth + max_batch_rows


@cython.cdivision(True)
cdef inline Py_ssize_t _index(int64_t counter, Py_ssize_t capacity) noexcept nogil:
    # Counters never go negative, so C's remainder is Python's modulo.
    return <Py_ssize_t>(counter % capacity)


cdef Py_ssize_t _first_non_finite(const double* values, Py_ssize_t n) noexcept nogil:
    """Index of the first value that is NaN or infinite, or -1 (a plain C scan: cannot fail)."""
    cdef Py_ssize_t k
    for k in range(n):
        if not isfinite(values[k]):
            return k
    return -1


@cython.final
cdef class Batch:
    """What one ``drain`` hands out: live requests for one predict, and expired ones to refuse."""

    cdef readonly Py_ssize_t start
    cdef readonly Py_ssize_t n_rows
    cdef readonly object rows  # a view of the queue's buffer; None when every request expired
    cdef readonly list waiters
    cdef readonly list sizes
    cdef readonly list expired
    cdef readonly int64_t first_slot
    cdef readonly Py_ssize_t n_slots

    def __init__(
        self,
        Py_ssize_t start,
        Py_ssize_t n_rows,
        object rows,
        list waiters,
        list sizes,
        list expired,
        int64_t first_slot,
        Py_ssize_t n_slots,
    ):
        self.start = start
        self.n_rows = n_rows
        self.rows = rows
        self.waiters = waiters
        self.sizes = sizes
        self.expired = expired
        self.first_slot = first_slot
        self.n_slots = n_slots


@cython.final
cdef class RingQueue:
    """Admission, row storage and greedy batch draining for one (model, version)."""

    # Fixed at creation.
    cdef readonly Py_ssize_t n_features
    cdef readonly Py_ssize_t max_batch_rows
    cdef readonly Py_ssize_t max_queue_depth
    cdef readonly int64_t timeout_ns
    cdef readonly Py_ssize_t capacity_rows

    # Row storage: the numpy array owns the memory (it is what batches and ``rows`` hand
    # out views of); ``_buf`` is a typed view of the same memory, for the C copy loops.
    cdef readonly object buffer
    cdef double[:, ::1] _buf

    # Per-slot records, indexed by slot counter % capacity_rows: owned by this object
    # (PyMem_Malloc in __cinit__, PyMem_Free in __dealloc__), ``capacity_rows`` entries each.
    cdef Py_ssize_t* _start  # first row of the slot's rows
    cdef Py_ssize_t* _rows  # how many rows the slot holds (at least one)
    cdef int64_t* _enqueued_ns  # monotonic time of commit
    cdef unsigned char* _committed  # 1 once written and visible to drain
    # The waiters are Python objects, so they live in a Python list (owned here, same
    # indexing); a slot's waiter is dropped on release so that no future outlives its batch.
    cdef list _waiter

    # Slot counters, ever growing, head <= drained <= tail: [head, drained) are in batches
    # not yet released, [drained, tail) wait in the queue (reserved or committed).
    cdef int64_t _head
    cdef int64_t _drained
    cdef int64_t _tail
    # The row ring: row_head is the first row of slot head, row_tail the next row to hand
    # out; when wrapped, live rows run [row_head, capacity) then [0, row_tail).
    cdef Py_ssize_t _row_head
    cdef Py_ssize_t _row_tail
    cdef bint _wrapped
    # How to take back the newest reservation.
    cdef Py_ssize_t _undo_row_tail
    cdef bint _undo_wrapped
    cdef int64_t _undo_tail  # the tail right after the reservation the undo is for; -1 once used
    # Rows reserved or committed, not yet drained: what max_queue_depth limits.
    cdef readonly Py_ssize_t queued_rows

    def __cinit__(
        self,
        Py_ssize_t n_features,
        *,
        Py_ssize_t max_batch_rows,
        Py_ssize_t max_queue_depth,
        int64_t timeout_ns,
        Py_ssize_t capacity_rows=0,
    ):
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
        self._buf = self.buffer

        self._start = <Py_ssize_t*>PyMem_Malloc(capacity_rows * sizeof(Py_ssize_t))
        self._rows = <Py_ssize_t*>PyMem_Malloc(capacity_rows * sizeof(Py_ssize_t))
        self._enqueued_ns = <int64_t*>PyMem_Malloc(capacity_rows * sizeof(int64_t))
        self._committed = <unsigned char*>PyMem_Malloc(capacity_rows * sizeof(unsigned char))
        if self._start == NULL or self._rows == NULL or self._enqueued_ns == NULL or self._committed == NULL:
            raise MemoryError()  # __dealloc__ frees whichever did succeed
        memset(self._start, 0, capacity_rows * sizeof(Py_ssize_t))
        memset(self._rows, 0, capacity_rows * sizeof(Py_ssize_t))
        memset(self._enqueued_ns, 0, capacity_rows * sizeof(int64_t))
        memset(self._committed, 0, capacity_rows * sizeof(unsigned char))
        self._waiter = [None] * capacity_rows

        self._head = 0
        self._drained = 0
        self._tail = 0
        self._row_head = 0
        self._row_tail = 0
        self._wrapped = False
        self._undo_row_tail = 0
        self._undo_wrapped = False
        self._undo_tail = -1
        self.queued_rows = 0

    def __dealloc__(self):
        PyMem_Free(self._start)
        PyMem_Free(self._rows)
        PyMem_Free(self._enqueued_ns)
        PyMem_Free(self._committed)

    # -- admission -------------------------------------------------------------------------

    def reserve(self, Py_ssize_t n_rows):
        """Rows for one request: the slot index, or ``FULL`` when admission is refused."""
        cdef Py_ssize_t start, slot
        if n_rows < 1:
            raise ValueError("a request has at least one row")
        # queued_rows <= max_queue_depth, so this cannot overflow where the sum could.
        if n_rows > self.max_queue_depth - self.queued_rows:
            return _FULL
        if self._tail == self._head:
            # Empty: start over at row 0 so the whole buffer is one free run.
            self._row_head = 0
            self._row_tail = 0
            self._wrapped = False
        start = self._place(n_rows)
        if start < 0:
            return _FULL
        self._undo_row_tail = self._row_tail
        self._undo_wrapped = self._wrapped
        if start == 0 and self._row_tail != 0:
            self._wrapped = True
        self._row_tail = start + n_rows
        slot = _index(self._tail, self.capacity_rows)
        self._start[slot] = start
        self._rows[slot] = n_rows
        self._committed[slot] = 0
        self._tail += 1
        self._undo_tail = self._tail
        self.queued_rows += n_rows
        return slot

    cdef inline Py_ssize_t _place(self, Py_ssize_t n_rows) noexcept nogil:
        """First row of a free contiguous run of ``n_rows``, or -1."""
        if self._wrapped:
            return self._row_tail if self._row_head - self._row_tail >= n_rows else -1
        if self.capacity_rows - self._row_tail >= n_rows:
            return self._row_tail
        return 0 if self._row_head >= n_rows else -1

    cdef Py_ssize_t _slot(self, Py_ssize_t slot, bint assign) except -1:
        """A valid index into the per-slot arrays: the C arrays are not bounds-checked.

        Indexes like the reference's Python lists do (a negative slot counts from the end),
        and raises the same ``IndexError`` where those lists would.
        """
        if slot < 0:
            slot += self.capacity_rows
        if slot < 0 or slot >= self.capacity_rows:
            raise IndexError("list assignment index out of range" if assign else "list index out of range")
        return slot

    def rows(self, Py_ssize_t slot):
        """The slot's rows: a writable view of the buffer."""
        slot = self._slot(slot, False)
        cdef Py_ssize_t start = self._start[slot]
        return self.buffer[start : start + self._rows[slot]]

    def write(self, Py_ssize_t slot, instances):
        """Copy rows of numbers into the slot; ``ValueError`` names the first bad row."""
        slot = self._slot(slot, False)
        cdef Py_ssize_t n = self._rows[slot]
        cdef Py_ssize_t start = self._start[slot]
        cdef Py_ssize_t n_given = len(instances)
        cdef Py_ssize_t i
        cdef Py_ssize_t bad = -1
        if n_given != n:
            raise ValueError(f"expected {n} rows, got {n_given}")
        if PyList_CheckExact(instances):
            for i in range(n):
                # Re-read the size: converting a value may run Python code that edits the list.
                if i >= PyList_GET_SIZE(instances):
                    raise RuntimeError("instances changed size while they were written")
                row = <object>PyList_GET_ITEM(instances, i)  # owned for the same reason
                if self._write_row(start + i, row, i) and bad < 0:
                    bad = i
        else:
            i = 0
            for row in instances:
                if i >= n:
                    raise IndexError(f"index {i} is out of bounds for axis 0 with size {n}")
                if self._write_row(start + i, row, i) and bad < 0:
                    bad = i
                i += 1
        # Reported after every row is copied, as the reference checks the whole slot at the end.
        if bad >= 0:
            raise ValueError(f"row {bad} holds NaN or infinity")

    def write_one(self, Py_ssize_t slot, features):
        """Copy one row of numbers into a one-row slot."""
        slot = self._slot(slot, False)
        if self._rows[slot] != 1:
            raise ValueError(f"expected {self._rows[slot]} rows, got 1")
        if self._write_row(self._start[slot], features, 0):
            raise ValueError("row 0 holds NaN or infinity")

    cdef int _write_row(self, Py_ssize_t r, object row, Py_ssize_t i) except -1:
        """Copy ``row`` (row ``i`` of the request) into buffer row ``r``: 1 if it is not all finite.

        A list of floats is read in place; any other value goes through ``PyFloat_AsDouble``,
        and whatever that refuses (or any row that is not a list) is handed to numpy, so that
        odd input is converted, or refused, exactly as the reference does it.
        """
        cdef Py_ssize_t nf = self.n_features
        cdef Py_ssize_t n_given, j
        cdef double* out = &self._buf[r, 0]
        cdef PyObject* item
        cdef object value
        cdef double v
        cdef bint finite = True
        if not PyList_CheckExact(row):
            n_given = len(row)
            if n_given != nf:
                raise ValueError(f"row {i} has {n_given} features, expected {nf}")
            return self._write_row_numpy(r, row)
        n_given = PyList_GET_SIZE(row)
        if n_given != nf:
            raise ValueError(f"row {i} has {n_given} features, expected {nf}")
        for j in range(nf):
            item = PyList_GET_ITEM(row, j)
            if PyFloat_CheckExact(<object>item):
                v = PyFloat_AS_DOUBLE(<object>item)
            else:
                value = <object>item  # owned: a __float__ may drop the list's reference
                v = _float_as_double(value)
                if v == -1.0 and PyErr_Occurred() != NULL:
                    PyErr_Clear()
                    return self._write_row_numpy(r, row)
                if PyList_GET_SIZE(row) != nf:
                    raise RuntimeError(f"row {i} changed size while it was written")
            out[j] = v
            finite &= isfinite(v)
        return 0 if finite else 1

    cdef int _write_row_numpy(self, Py_ssize_t r, object row) except -1:
        """The reference's own conversion (strings, None, nested rows...), then the check."""
        self.buffer[r] = row
        return 0 if _first_non_finite(&self._buf[r, 0], self.n_features) < 0 else 1

    def write_bytes(self, Py_ssize_t slot, data):
        """Copy little-endian float64 rows, row-major, into the slot."""
        slot = self._slot(slot, False)
        cdef Py_ssize_t start = self._start[slot]
        cdef Py_ssize_t n_values = self._rows[slot] * self.n_features
        cdef Py_ssize_t n_bytes = n_values * 8
        cdef Py_ssize_t n_given = len(data)
        cdef Py_buffer view
        cdef Py_ssize_t bad
        if n_given != n_bytes:
            raise ValueError(f"expected {n_bytes} bytes of float64, got {n_given}")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == n_bytes and _LITTLE_ENDIAN:
                memcpy(&self._buf[start, 0], view.buf, n_bytes)
            else:
                # len() counted items, not bytes, or the host is big-endian: numpy's way.
                self.buffer[start : start + self._rows[slot]].reshape(-1)[:] = np.frombuffer(data, dtype="<f8")
        finally:
            PyBuffer_Release(&view)
        bad = _first_non_finite(&self._buf[start, 0], n_values)
        if bad >= 0:
            raise ValueError(f"row {bad // self.n_features} holds NaN or infinity")

    def commit(self, Py_ssize_t slot, waiter, int64_t now_ns):
        """Make the slot visible to ``drain``; ``waiter`` comes back in its batch."""
        slot = self._slot(slot, True)
        self._waiter[slot] = waiter
        self._enqueued_ns[slot] = now_ns
        self._committed[slot] = 1

    def abort(self, Py_ssize_t slot):
        """Take back the newest reservation (its rows held bad input)."""
        cdef Py_ssize_t newest = _index(self._tail - 1, self.capacity_rows)
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

    def oldest_enqueued_ns(self):
        """Enqueue time of the first waiting request, or -1 when none is committed."""
        if self._drained == self._tail:
            return -1
        cdef Py_ssize_t slot = _index(self._drained, self.capacity_rows)
        return self._enqueued_ns[slot] if self._committed[slot] else -1

    def expire(self, int64_t now_ns):
        """Only the expired requests cut from the head, as a batch with no rows; or ``None``."""
        cdef Py_ssize_t capacity = self.capacity_rows
        cdef int64_t first_slot = self._drained
        cdef Py_ssize_t slot
        cdef list expired = []
        while self._drained < self._tail:
            slot = _index(self._drained, capacity)
            if not self._committed[slot] or now_ns - self._enqueued_ns[slot] < self.timeout_ns:
                break
            expired.append(self._waiter[slot])
            self._drained += 1
            self.queued_rows -= self._rows[slot]
        if not expired:
            return None
        cdef Batch batch = Batch.__new__(Batch)
        batch.start = 0
        batch.n_rows = 0
        batch.rows = None
        batch.waiters = []
        batch.sizes = []
        batch.expired = expired
        batch.first_slot = first_slot
        batch.n_slots = len(expired)
        return batch

    def drain(self, int64_t now_ns):
        """The next batch: expired requests cut from the head, then the longest committed run.

        The run stops before ``max_batch_rows`` would be passed (a single request larger than
        that is a batch of its own), before an uncommitted slot, and at the buffer's seam.
        """
        cdef Py_ssize_t capacity = self.capacity_rows
        cdef int64_t first_slot = self._drained
        cdef Py_ssize_t slot, size
        cdef list expired = []
        while self._drained < self._tail:
            slot = _index(self._drained, capacity)
            if not self._committed[slot] or now_ns - self._enqueued_ns[slot] < self.timeout_ns:
                break
            expired.append(self._waiter[slot])
            self._drained += 1
            self.queued_rows -= self._rows[slot]

        cdef Py_ssize_t start = -1
        cdef Py_ssize_t n_rows = 0
        cdef list waiters = []
        cdef list sizes = []
        while self._drained < self._tail:
            slot = _index(self._drained, capacity)
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

        cdef Py_ssize_t n_slots = <Py_ssize_t>(self._drained - first_slot)
        if n_slots == 0:
            return None
        if start < 0:
            start = 0
        cdef Batch batch = Batch.__new__(Batch)
        batch.start = start
        batch.n_rows = n_rows
        batch.rows = self.buffer[start : start + n_rows] if n_rows else None
        batch.waiters = waiters
        batch.sizes = sizes
        batch.expired = expired
        batch.first_slot = first_slot
        batch.n_slots = n_slots
        return batch

    def release(self, batch):
        """Give a batch's rows back; batches are released in the order they were drained."""
        cdef int64_t first_slot, counter
        cdef Py_ssize_t n_slots
        if type(batch) is Batch:
            first_slot = (<Batch>batch).first_slot
            n_slots = (<Batch>batch).n_slots
        else:  # duck-typed, as the reference accepts it
            first_slot = batch.first_slot
            n_slots = batch.n_slots
        # n_slots < 0 would index before head: refused here, where the reference's lists wrap.
        if first_slot != self._head or n_slots < 0 or n_slots > self._drained - self._head:
            raise ValueError("batches are released in the order they were drained")
        for counter in range(self._head, self._head + n_slots):
            self._waiter[_index(counter, self.capacity_rows)] = None
        self._head += n_slots
        if self._head == self._tail:
            self._row_head = 0
            self._row_tail = 0
            self._wrapped = False
            return
        cdef Py_ssize_t new_head = self._start[_index(self._head, self.capacity_rows)]
        if self._wrapped and new_head < self._row_head:
            self._wrapped = False
        self._row_head = new_head
