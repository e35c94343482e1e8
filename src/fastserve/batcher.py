"""One batcher per loaded (model, version): admit -> drain -> predict -> resolve.

Everything but ``predict`` runs on the event loop, driven by callbacks rather than a task:
a commit wakes the batcher, the batcher drains the ring queue into one batch and hands it
to its own predict thread, and the thread hands the whole batch back with one
``call_soon_threadsafe``. At most one batch per version is in predict at a time, so the
rows of the next batch pile up in the queue while the model works: under load, batches
fill by themselves and no time is spent waiting for them.

A batch computes, once, every output its requests asked for (``outputs.py``); a version
that needs a DataFrame gets one per batch (``inputs.Inputs.frame``). When the model raises
on a batch, the batch is split, and split again, until the requests it raises on stand
alone: only those fail (422 ``model_rejected_input``), the others get their answers. A
batch whose every request fails is the model's fault (500 ``model_error``) if the model
also fails on the rows it predicted when it loaded, and the inputs' fault otherwise.

A batch goes to predict as soon as it is full. A smaller one waits for more requests while
they keep coming: it goes once ``batch_window_ms`` pass with no new request, and at the
latest ``max_batch_delay_ms`` after the model became free. At low load a lone request pays
one window for batching; under load the batch fills, because a full batch costs the model
no more than a small one and the event loop needs time to take in a batch's worth of
requests. The window never outlasts the model's own predict: a model that answers in less
time than the window would have predicted the batch already, with the newcomers queuing for
the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from fastserve.body import ClientGone, DisconnectWatch
from fastserve.codec import PredictRequest, TabularRequest
from fastserve.config import BatchSettings
from fastserve.errors import (
    BadFeatures,
    ModelError,
    ModelRejectedInput,
    QueueFull,
    QueueTimeout,
    UnknownOutput,
    UnknownVersion,
)
from fastserve.inputs import Inputs, Side
from fastserve.outputs import PREDICT_ONLY, Outputs
from fastserve.predict_process import PredictProcessDied
from fastserve.queue import FULL, Batch, RingQueue
from fastserve.registry import Predict
from fastserve.schema import InputSchema

if TYPE_CHECKING:
    from fastserve.metrics import Metrics, VersionMeter

logger = logging.getLogger("fastserve.batcher")

# Smoothing of the measured drain rate used for Retry-After: about the last ten batches.
_RATE_SMOOTHING = 0.1
# A predict that spends at least this share of its time on the CPU computes (see Turns);
# below it, it mostly waits, and other versions need not give way to it.
_COMPUTING = 0.5
# A request is watched for its client's disconnect once it has waited this long (see waiting).
_WATCH_AFTER_S = 0.05
# A predict running this many times its usual time (and past the queue deadline) is overdue.
_OVERDUE = 10
# The model's message, as a 422 carries it: cut to this length, with no paths.
_MESSAGE_CHARS = 300
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/][^\s'\",;)\]]+")

# What one request's future resolves to: its predictions, or its outputs by name.
Answer = list[Any] | dict[str, list[Any]]


class _Pending:
    """A queued request that asked for more than predictions, or whose columns are not all in
    the ring buffer: what its batch needs of it beside its rows. (A plain request's waiter
    is its future alone.)"""

    __slots__ = ("future", "names", "side")

    def __init__(self, future: asyncio.Future[Answer], names: frozenset[str], side: Side | None) -> None:
        self.future = future
        self.names = names
        self.side = side


class Waiting:
    """An admitted request, for the disconnect watch it gets if it waits long (Batcher.waiting)."""

    __slots__ = ("receive", "future", "since", "watch")

    def __init__(self, receive: Any, future: asyncio.Future[Answer], since: float) -> None:
        self.receive = receive
        self.future = future
        self.since = since
        self.watch: DisconnectWatch | None = None


@dataclass
class BatchStats:
    """Running totals for /status; updated once per batch on the event loop."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    expired: int = 0
    gone: int = 0  # cut out before predict: the client disconnected while it waited
    shed: int = 0
    errors: int = 0
    predict_seconds: float = 0.0

    @property
    def mean_batch_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class Turns:
    """The versions of one process take turns on its core.

    Each version predicts in its own thread, so a slow model that waits (I/O, a sleep, a
    GIL-free kernel on another core) never holds the others up. But two predicts that both
    compute share one core and the GIL with the event loop: each gets slower, the loop takes
    in fewer requests, and both versions' batches shrink (a 20% canary of v2 next to v1 ran
    at batches of 31 and 4.5 rows). So a version with a batch that is not full waits while
    another version's computing predict runs, and goes the moment it ends, with everything
    that queued meanwhile; a full batch never waits.
    """

    def __init__(self) -> None:
        self.busy: set[Batcher] = set()
        self.waiting: list[Batcher] = []

    def someone_else_computing(self, batcher: Batcher) -> Batcher | None:
        for other in self.busy:
            if other is not batcher and other.cpu_share >= _COMPUTING:
                return other
        return None

    def wake_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for batcher in waiting:
            batcher.take_turn()


class Batcher:
    """Admission and batched predict for one (model, version) on one event loop."""

    def __init__(
        self,
        model: str,
        version: str,
        predict: Predict,
        n_features: int,
        settings: BatchSettings,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics | None = None,
        turns: Turns | None = None,
        *,
        inputs: Inputs | None = None,
        outputs: Outputs | None = None,
        probe: Any = None,
    ) -> None:
        """``predict`` answers a batch of ``n_features`` positional values a row, unless the
        version has ``inputs`` (its schema) and ``outputs``; ``probe`` is an input the model
        predicted when it loaded, to tell a broken model from bad input (see the module)."""
        self.model = model
        self.version = version
        self.settings = settings
        self.inputs = inputs or Inputs(InputSchema(n_features))
        self.outputs = outputs or Outputs(("predict",), lambda X, _: {"predict": predict(X)})
        self._probe = probe
        self.queue = RingQueue(
            self.inputs.width,
            max_batch_rows=settings.max_batch_rows,
            max_queue_depth=settings.max_queue_depth,
            timeout_ns=max(1, int(settings.queue_timeout_ms * 1e6)),
        )
        self.stats = BatchStats()
        self.meter: VersionMeter | None = None
        self._enqueued: deque[int] | None = None  # commit times, for the queue-wait metric
        if metrics is not None:
            self.meter = metrics.meter(model, version, self.queue)
            self._enqueued = self.meter.enqueued
        self._loop = loop
        self._max_batch_rows = settings.max_batch_rows
        self._window_s = settings.batch_window_ms / 1000
        self._max_delay_s = max(settings.max_batch_delay_ms / 1000, self._window_s)
        self._window_ends = 0.0
        self._last_commit_s = 0.0
        self._timeout_s = settings.queue_timeout_ms / 1000
        self._busy = False  # a batch is in predict
        # Set once the version is being unloaded: it left the routes, and a request that was
        # routed to it before (its body still arriving) must not join a queue nobody drains.
        self.stopping = False
        self._predict_started = 0.0  # perf_counter when the batch in predict went
        self._left = 0  # requests whose client left, not yet found in a batch or answered
        # While a predict runs, the queue's deadlines are kept by a timer (see _on_deadline);
        # the requests it expires are drained and held until the batch in predict is released.
        self._deadline: asyncio.TimerHandle | None = None
        self._held: list[Batch] = []
        # Admitted requests not yet watched for their client's disconnect, oldest first.
        self._unwatched: deque[Waiting] = deque()
        self._watch_timer: asyncio.TimerHandle | None = None
        self._turns = turns
        # Smoothed CPU time over wall time of this version's predicts (1: pure compute);
        # assumed to compute until its first predict says otherwise.
        self.cpu_share = 1.0
        self._predict_s = 0.0  # smoothed wall time of one predict
        self._timer: asyncio.TimerHandle | None = None
        self._rows_per_s = 0.0
        self._idle: asyncio.Future[None] | None = None
        self._jobs: SimpleQueue[Batch | None] = SimpleQueue()
        self._thread = threading.Thread(
            target=self._predict_loop, name=f"predict-{model}-{version}", daemon=True
        )
        self._thread.start()

    # -- admission (event loop, per request) ------------------------------------------------

    def admit(self, request: PredictRequest | TabularRequest) -> asyncio.Future[Answer]:
        """Queue a decoded request; its future resolves to its predictions (a list), or to its
        outputs by name when it named some.

        Raises ``QueueFull`` when admission is refused, ``BadFeatures`` when its rows are
        wrong and ``UnknownOutput`` for an output the version lacks; such a request never
        reaches a batch.
        """
        if self.stopping:
            raise UnknownVersion(f"model {self.model!r} version {self.version!r} was unloaded")
        future = self._enqueue(request)
        if future is None:
            raise self.shed()
        return future

    def offer(self, request: PredictRequest | TabularRequest) -> asyncio.Future[Answer] | None:
        """Queue a shadow copy if there is room, else ``None``: a copy is the first thing dropped,
        and dropping it is not a refusal anybody sees. Copies take at most half the queue, so
        they never crowd out the candidate's own (canary) requests."""
        if self.stopping or self.queue.queued_rows + request.n_rows > self.queue.max_queue_depth // 2:
            return None
        try:
            return self._enqueue(request)
        except (BadFeatures, UnknownOutput):
            return None

    def _enqueue(self, request: PredictRequest | TabularRequest) -> asyncio.Future[Answer] | None:
        names = self.outputs.check(request.outputs)
        queue = self.queue
        slot = queue.reserve(request.n_rows)
        if slot == FULL:
            return None
        try:
            side = self.inputs.write(queue, slot, request)
        except BadFeatures:
            queue.abort(slot)
            raise
        future: asyncio.Future[Answer] = self._loop.create_future()
        now_ns = time.monotonic_ns()
        if side is None and names is PREDICT_ONLY:
            queue.commit(slot, future, now_ns)
        else:
            queue.commit(slot, _Pending(future, names, side), now_ns)
        if self._enqueued is not None:
            self._enqueued.append(now_ns)
        self._last_commit_s = now_ns / 1e9
        if not self._busy:
            self._schedule()
        elif self._deadline is None:
            self._deadline = self._loop.call_later(self._timeout_s, self._on_deadline)
        return future

    def waiting(self, receive: Any, future: asyncio.Future[Answer]) -> Waiting:
        """Watch an admitted request's client (``receive`` is its ASGI receive) once the request
        has waited ``_WATCH_AFTER_S``: if the client disconnects, ``client_left``.

        A watch costs a worker about 25 us of CPU a request (Granian's receive future, and the
        GIL taken back from its thread when it ends: +10% for a trivial model), so a request
        answered within ``_WATCH_AFTER_S`` is never watched; one that waits longer (a deep
        queue, a slow or hung predict) is. The caller stops the watch once it has its answer.
        """
        entry = Waiting(receive, future, self._loop.time())
        self._unwatched.append(entry)
        if self._watch_timer is None:
            self._watch_timer = self._loop.call_at(entry.since + _WATCH_AFTER_S, self._watch_long_waits)
        return entry

    def _watch_long_waits(self) -> None:
        self._watch_timer = None
        unwatched = self._unwatched
        started_before = self._loop.time() - _WATCH_AFTER_S
        while unwatched:
            entry = unwatched[0]
            if entry.future.done():  # answered already: never watched
                unwatched.popleft()
                continue
            if entry.since > started_before:
                break
            unwatched.popleft()
            entry.watch = DisconnectWatch(entry.receive, self.client_left, entry.future)
        if unwatched:
            self._watch_timer = self._loop.call_at(
                unwatched[0].since + _WATCH_AFTER_S, self._watch_long_waits
            )

    def client_left(self, future: asyncio.Future[Answer]) -> None:
        """The client of a queued request disconnected: it is cut out before predict (its
        batch goes without it), or, if it is in predict already, its answer is dropped."""
        if not future.done():
            future.set_exception(ClientGone())
            self._left += 1

    @property
    def full(self) -> bool:
        """No room for another row. Checked before a request's body is read and decoded,
        so that a refused request costs the event loop (and so the model) the least."""
        return self.queue.queued_rows >= self.queue.max_queue_depth

    def shed(self) -> QueueFull:
        """Count one request refused for want of room, and the error that answers it."""
        self.stats.shed += 1
        return QueueFull(
            f"{self.model} {self.version}: queue is full ({self.queue.queued_rows} rows waiting)",
            retry_after_s=self.retry_after_s(),
        )

    def retry_after_s(self) -> int:
        """Whole seconds until the rows queued now are likely through predict."""
        if self._rows_per_s <= 0:
            return 1
        return max(1, math.ceil(self.queue.queued_rows / self._rows_per_s))

    # -- scheduling (event loop) -----------------------------------------------------------

    def _schedule(self) -> None:
        # Called with no batch in predict: go now if a batch is full, else let it fill while
        # requests keep arriving. The window starts when the model becomes free, not when the
        # oldest request arrived: requests that queued during a predict were mostly still in
        # the server's sockets then, and a full batch costs the model no more than a small one.
        queued = self.queue.queued_rows
        if queued >= self._max_batch_rows or (queued and self._window_s == 0):
            self._dispatch()
        elif queued and not self._wait_for_turn() and self._timer is None:
            self._window_ends = time.monotonic() + self._max_delay_s
            self._timer = self._loop.call_later(self.window_s(), self._on_timer)

    def window_s(self) -> float:
        """How long a partial batch waits for the next request: ``batch_window_ms``, but never
        longer than this version's usual predict. Waiting longer than a predict takes cannot
        pay: the batch could have been predicted in that time, and the requests that came
        meanwhile would make up the next batch. For RF-300 on scikit-learn (27 ms a call) the
        2 ms window holds; for a compiled forest or a linear model (well under a millisecond)
        it shrinks to the predict, and a closed loop of 16 clients no longer idles the core
        for 2 ms after its 16th request."""
        if self._predict_s:
            return min(self._window_s, self._predict_s)
        return self._window_s  # no predict measured yet

    def _wait_for_turn(self) -> bool:
        """Whether this partial batch waits for another version's computing predict (see Turns)."""
        turns = self._turns
        other = turns.someone_else_computing(self) if turns is not None else None
        if turns is None or other is None:
            return False
        if self not in turns.waiting:
            turns.waiting.append(self)
        if self._timer is not None:
            self._timer.cancel()
        # Bounded: a predict that hangs or runs far past its usual time does not hold this
        # version's requests; after twice the other's usual predict (at least the longest
        # batch delay) the batch goes anyway.
        limit = max(self._max_delay_s, 2 * other._predict_s)
        self._timer = self._loop.call_later(limit, self.take_turn)
        return True

    def take_turn(self) -> None:
        """Go now with whatever is queued: this version waited its turn on the core."""
        self._timer = None
        if not self._busy and self.queue.queued_rows:
            self._dispatch()

    def _on_timer(self) -> None:
        # A batch goes once no request has joined it for a whole window, or when the longest
        # delay is up: under load requests keep arriving and the batch fills; a lone request
        # at low load waits one window.
        self._timer = None
        if self._busy:
            return
        now = time.monotonic()
        next_check = min(self._last_commit_s + self.window_s(), self._window_ends)
        if next_check > now:
            self._timer = self._loop.call_later(next_check - now, self._on_timer)
        elif not self._wait_for_turn():
            self._dispatch()

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self.queue
        while True:
            now_ns = time.monotonic_ns()
            batch = queue.drain(now_ns)
            if batch is None:
                self._notify_idle()
                return
            if self.meter is not None:
                self.meter.drained(len(batch.expired), len(batch.waiters), now_ns)
            if batch.expired:
                self._expire(batch.expired)
            if self._left and batch.n_rows:
                batch = self._without_gone(batch)
            if batch.n_rows:
                self._busy = True
                self._predict_started = time.perf_counter()
                if self._turns is not None:
                    self._turns.busy.add(self)
                self._jobs.put(batch)
                return
            queue.release(batch)

    def _expire(self, waiters: list[Any]) -> None:
        self.stats.expired += len(waiters)
        timeout_ms = self.settings.queue_timeout_ms
        for waiter in waiters:
            future = waiter.future if type(waiter) is _Pending else waiter
            if not future.done():
                future.set_exception(QueueTimeout(f"waited in the queue past {timeout_ms:g} ms"))
            else:  # its client left first
                self._left -= 1

    def _without_gone(self, batch: Batch) -> Batch:
        """The batch without the requests whose client left: their rows are never predicted.

        The live requests' rows move down over the gone ones', in the buffer (every row of the
        run belongs to this batch), so the batch stays a view; its slots are released as drained.
        """
        waiters, sizes = batch.waiters, batch.sizes
        keep = [k for k, waiter in enumerate(waiters) if not _future(waiter).done()]
        n_gone = len(waiters) - len(keep)
        if not n_gone:
            return batch
        self._left -= n_gone
        self.stats.gone += n_gone
        if self.meter is not None:
            self.meter.gone += n_gone
        rows = batch.rows
        assert rows is not None
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        n_rows = 0
        for k in keep:
            start, size = starts[k], sizes[k]
            if start != n_rows:
                rows[n_rows : n_rows + size] = rows[start : start + size]
            n_rows += size
        return Batch(
            batch.start,
            n_rows,
            rows[:n_rows] if n_rows else None,
            [waiters[k] for k in keep],
            [sizes[k] for k in keep],
            batch.expired,
            batch.first_slot,
            batch.n_slots,
        )

    def _on_deadline(self) -> None:
        """While a predict runs, the requests queued behind it that pass their deadline get
        their 504 now, not when the predict returns: a predict that hangs holds no one past
        ``queue_timeout_ms``. (With the model free, each drain cuts them out.)"""
        self._deadline = None
        if not self._busy:
            return
        now_ns = time.monotonic_ns()
        expired = self.queue.expire(now_ns)
        if expired is not None:
            if self.meter is not None:
                self.meter.drained(len(expired.expired), 0, now_ns)
            self._expire(expired.expired)
            self._held.append(expired)  # released after the batch in predict (drain order)
        oldest = self.queue.oldest_enqueued_ns()
        if oldest >= 0:
            delay = max(0.0, (oldest + self.queue.timeout_ns - now_ns) / 1e9)
            self._deadline = self._loop.call_later(delay, self._on_deadline)

    def predict_running_s(self) -> float | None:
        """How long the batch in predict has run, or None when the model is free."""
        return time.perf_counter() - self._predict_started if self._busy else None

    def predict_overdue(self) -> bool:
        """Whether the batch in predict has run past what is expected of it: longer than the
        queue deadline (the requests behind it are failing) and than ``_OVERDUE`` usual predicts."""
        running = self.predict_running_s()
        return running is not None and running > max(self._timeout_s, _OVERDUE * self._predict_s)

    # -- predict (worker thread) -----------------------------------------------------------

    def _predict_loop(self) -> None:
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            started, cpu_started = time.perf_counter(), time.thread_time()
            outcome = self._predict_batch(batch)
            elapsed = time.perf_counter() - started
            cpu = time.thread_time() - cpu_started
            try:
                self._loop.call_soon_threadsafe(self._finish, batch, outcome, elapsed, cpu)
            except RuntimeError:  # loop closed during shutdown: nobody is waiting any more
                return

    def _predict_batch(self, batch: Batch) -> dict[str, list[Any]] | list[Answer | Exception]:
        """The batch's outputs by name; or, where the model raised, each request's own answer
        or error (``_isolate``)."""
        waiters = batch.waiters
        rows = batch.rows
        assert rows is not None  # only batches with rows are sent here
        names = PREDICT_ONLY
        for waiter in waiters:
            if type(waiter) is _Pending and waiter.names is not PREDICT_ONLY:
                names = names | waiter.names
        try:
            return self._compute(rows, waiters, names)
        except PredictProcessDied as died:  # a child that died takes its batch: no retries
            logger.error("predict failed for %s %s: %s", self.model, self.version, died)
            return [ModelError(f"{self.model} {self.version} failed to predict")] * len(waiters)
        except Exception as error:  # the model's failure is the batch's, not the server's
            return self._isolate(batch, names, error)

    def _compute(self, rows: Any, waiters: list[Any], names: frozenset[str]) -> dict[str, list[Any]]:
        if self.inputs.schema.needs_frame:
            # Every request has a Side where the version has columns beside the buffer.
            sides = [w.side for w in waiters if type(w) is _Pending and w.side is not None]
            rows = self.inputs.frame(rows, sides)
        return self.outputs(rows, names)

    def _isolate(self, batch: Batch, names: frozenset[str], error: Exception) -> list[Answer | Exception]:
        """Split the failed batch, and split again, until the requests the model raises on stand
        alone; the others get their answers. At most ``2n - 1`` predicts for ``n`` requests."""
        waiters, sizes = batch.waiters, batch.sizes
        rows = batch.rows
        assert rows is not None
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        answers: list[Answer | Exception] = [error] * len(waiters)

        def run(lo: int, hi: int, known: Exception | None = None) -> None:
            try:
                if known is not None:
                    raise known
                out = self._compute(rows[starts[lo] : starts[hi]], waiters[lo:hi], names)
            except Exception as failure:
                if hi - lo == 1:
                    answers[lo] = failure
                    return
                middle = (lo + hi) // 2
                run(lo, middle)
                run(middle, hi)
                return
            for k in range(lo, hi):
                answers[k] = _answer(waiters[k], out, starts[k] - starts[lo], sizes[k])

        run(0, len(waiters), error)
        failed = [k for k, answer in enumerate(answers) if isinstance(answer, Exception)]
        if len(failed) == len(waiters) and not self._model_works():
            logger.error("predict failed for %s %s", self.model, self.version, exc_info=error)
            return [ModelError(f"{self.model} {self.version} failed to predict")] * len(waiters)
        for k in failed:
            failure = answers[k]
            assert isinstance(failure, Exception)
            logger.info("%s %s: the model rejected a request: %r", self.model, self.version, failure)
            answers[k] = ModelRejectedInput(f"the model rejected this request's rows: {_safe(failure)}")
        return answers

    def _model_works(self) -> bool:
        """Whether the model still predicts the input it predicted when it loaded."""
        if self._probe is None:
            return False
        try:
            self.outputs(self._probe, PREDICT_ONLY)
        except Exception:
            return False
        return True

    # -- resolution (event loop, once per batch) -------------------------------------------

    def _finish(
        self,
        batch: Batch,
        outcome: dict[str, list[Any]] | list[Answer | Exception],
        elapsed: float,
        cpu: float,
    ) -> None:
        waiters: list[Any] = batch.waiters
        stats = self.stats
        stats.batches += 1
        stats.rows += batch.n_rows
        stats.requests += len(waiters)
        stats.predict_seconds += elapsed
        if self.meter is not None:
            self.meter.predicted(batch.n_rows, elapsed)
        if isinstance(outcome, list):  # the model raised: each request has its own answer
            for waiter, answer in zip(waiters, outcome, strict=True):
                future = waiter.future if type(waiter) is _Pending else waiter
                if future.done():  # its client left during the predict
                    self._left -= 1
                elif isinstance(answer, Exception):
                    stats.errors += 1
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        else:
            if elapsed > 0:
                rate = batch.n_rows / elapsed
                self._rows_per_s += _RATE_SMOOTHING * (rate - self._rows_per_s) if self._rows_per_s else rate
            predictions = outcome["predict"] if "predict" in outcome else None
            offset = 0
            for waiter, size in zip(waiters, batch.sizes, strict=True):
                if type(waiter) is _Pending:
                    if not waiter.future.done():
                        waiter.future.set_result(_answer(waiter, outcome, offset, size))
                    else:  # its client left during the predict
                        self._left -= 1
                elif not waiter.done():
                    assert predictions is not None
                    waiter.set_result(predictions[offset : offset + size])
                else:
                    self._left -= 1
                offset += size
        if elapsed > 0:
            share = min(1.0, cpu / elapsed)
            if self._predict_s:
                self.cpu_share += _RATE_SMOOTHING * (share - self.cpu_share)
                self._predict_s += _RATE_SMOOTHING * (elapsed - self._predict_s)
            else:  # the first predict sets both: a model that waits is known as one at once
                self.cpu_share, self._predict_s = share, elapsed
        self.queue.release(batch)
        if self._held:
            for held in self._held:
                self.queue.release(held)
            self._held.clear()
        self._busy = False
        if self._turns is not None:
            # The versions that waited go first, with all they queued; then this one.
            self._turns.busy.discard(self)
            self._turns.wake_waiting()
        self._schedule()
        if not self.queue.queued_rows and not self._busy:
            self._notify_idle()

    # -- shutdown --------------------------------------------------------------------------

    def _notify_idle(self) -> None:
        if self._idle is not None and not self._idle.done() and not self._busy:
            self._idle.set_result(None)

    async def drain_and_stop(self, timeout_s: float) -> None:
        """Let queued and running batches finish (bounded), then stop the predict thread."""
        self.stopping = True
        if self._busy or self.queue.queued_rows:
            self._idle = self._loop.create_future()
            try:
                await asyncio.wait_for(self._idle, timeout_s)
            except TimeoutError:
                logger.warning("%s %s: stopped with requests still queued", self.model, self.version)
        for timer in (self._deadline, self._watch_timer):  # nothing left for them to keep
            if timer is not None:
                timer.cancel()
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)


def _future(waiter: Any) -> asyncio.Future[Answer]:
    return waiter.future if type(waiter) is _Pending else waiter


def _answer(waiter: Any, outcome: dict[str, list[Any]], offset: int, size: int) -> Answer:
    """One request's part of a batch's outputs: its predictions, or the outputs it named."""
    if type(waiter) is _Pending and waiter.names is not PREDICT_ONLY:
        return {name: outcome[name][offset : offset + size] for name in waiter.names}
    return outcome["predict"][offset : offset + size]


def _safe(error: BaseException) -> str:
    """The model's message fit for a client: no paths, at most ``_MESSAGE_CHARS``."""
    text = _PATH.sub("<path>", f"{type(error).__name__}: {error}")
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."
