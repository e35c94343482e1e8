"""Prometheus metrics: tallied in plain Python on the hot path, exposed for every worker process.

prometheus_client's multiprocess mode keeps each value in a memory-mapped file per process and
takes a lock for every write: here one ``inc()`` costs about 1.3 µs and one ``observe()`` about
2.8 µs, against 0.12 µs for a dict increment and 0.14 µs for a bisect into a list of bucket
counts. So the hot path only adds to this process's tallies, and the tallies are flushed into
prometheus_client's values every ``FLUSH_S`` and right before this process renders /metrics.
A scrape answered by another worker sees this one's counts at most one flush late; counts are
never lost or counted twice, and a counter never goes backwards.

What is recorded where:

- per request (the predict endpoint): ``requests_total`` by status code, ``shed_total`` (a 429
  is ``queue_full``, a 504 ``queue_timeout``), and ``request_duration_seconds`` of the successful
  answers, so that a latency quantile is the latency of predictions, not of fast refusals;
  the batcher counts ``shed_total{reason="client_gone"}``: requests cut out before predict
  because their client left, which get no answer and so no ``requests_total``;
- per batch (the batcher): ``batch_rows``, ``predict_duration_seconds``, and ``queue_wait_seconds``
  of each request in the batch (from its commit to the moment its batch leaves the queue; a
  shadow copy waits in the candidate's queue like any request and is counted there);
- per flush: ``queue_depth_rows`` (sampled), and ``routed_total`` and ``shadow_total`` from the
  router's own per-process counts;
- per scrape, from the shared deployment state rather than any process's memory:
  ``model_info`` and ``deploy_actions_total`` (so actions taken with the CLI count too).

Across processes: ``fastserve serve`` gives its workers a fresh ``PROMETHEUS_MULTIPROC_DIR``
(see cli.py), which must be set before prometheus_client is imported. Without it (``granian
fastserve.app:app`` run by hand) each worker exposes its own metrics only, and says so.
"""

from __future__ import annotations

import asyncio
import glob
import os
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from fastserve.state import process_alive

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_S = 0.1
# Request, queue and predict times: half a millisecond to ten seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Rows in a batch: 1 to 1024, powers of two (max_batch_rows is usually one of them).
ROW_BUCKETS = tuple(float(2**i) for i in range(11))
SHED_REASONS = {429: "queue_full", 504: "queue_timeout"}
CLIENT_GONE = "client_gone"
ALIASES = ("stable", "candidate")

_Labels = tuple[str, ...]


def multiprocess_dir() -> str | None:
    """The shared directory of this process's values, or None when metrics are per process.

    prometheus_client chose its value class when it was imported; that choice, not today's
    environment, decides where the values go.
    """
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class _QueueLike(Protocol):
    @property
    def queued_rows(self) -> int: ...


_Counts = Mapping[str, Mapping[tuple[str, str], int]]  # model -> (version, label) -> n


class _ShadowCounts(Protocol):
    @property
    def outcomes(self) -> _Counts: ...


class RouteCounts(Protocol):
    """What the router counts in this process, read at each flush (the router is one): per
    model, ``(version, role) -> requests`` routed and ``(version, outcome) -> copies`` shadowed.
    The counts only grow; each flush adds what they grew by since the one before."""

    @property
    def routed(self) -> _Counts: ...

    @property
    def shadow(self) -> _ShadowCounts: ...


class _Buckets:
    """Observations not flushed yet: a count per bucket (+Inf last), then the sum."""

    __slots__ = ("bounds", "counts")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * (len(bounds) + 2)

    def observe(self, value: float) -> None:
        counts = self.counts
        # Prometheus buckets are "less than or equal": the first bound >= value.
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def flush_into(self, child: Any) -> None:
        counts = self.counts
        if not any(counts[:-1]):
            return
        self.counts = [0.0] * len(counts)
        # prometheus_client has no bulk observe: add to the child's bucket and sum values,
        # which is what ``observe`` does one at a time (tests/test_metrics.py checks it).
        for bucket, n in zip(child._buckets, counts, strict=False):
            if n:
                bucket.inc(n)
        child._sum.inc(counts[-1])


class VersionMeter:
    """What one loaded (model, version) records on the event loop, with no lookups.

    ``answered`` is called per successful request, ``drained`` and ``predicted`` once per
    batch. ``enqueued`` holds the commit time (monotonic ns) of each request still in the
    queue, in queue order: requests are committed in the order they are reserved (nothing
    awaits in between) and a drain takes slots from the head, so a drained batch's slots
    are the first ``len(expired) + len(waiters)`` entries.
    """

    __slots__ = ("labels", "queue", "enqueued", "ok", "gone", "duration", "queue_wait", "predict", "rows")

    def __init__(self, labels: _Labels, queue: _QueueLike) -> None:
        self.labels = labels
        self.queue = queue
        self.enqueued: deque[int] = deque()
        self.ok = 0
        self.gone = 0  # requests cut out before predict: their client left
        self.duration = _Buckets(DURATION_BUCKETS)
        self.queue_wait = _Buckets(DURATION_BUCKETS)
        self.predict = _Buckets(DURATION_BUCKETS)
        self.rows = _Buckets(ROW_BUCKETS)

    def answered(self, seconds: float) -> None:
        """A request this version answered with its predictions (200)."""
        self.ok += 1
        counts = self.duration.counts
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def drained(self, n_expired: int, n_waiters: int, now_ns: int) -> None:
        popleft = self.enqueued.popleft
        for _ in range(n_expired):  # answered 504: counted as shed, not as a queue wait
            popleft()
        counts = self.queue_wait.counts
        waited = 0.0
        for _ in range(n_waiters):
            wait = (now_ns - popleft()) / 1e9
            counts[bisect_left(DURATION_BUCKETS, wait)] += 1
            waited += wait
        counts[-1] += waited

    def predicted(self, n_rows: int, seconds: float) -> None:
        self.rows.observe(n_rows)
        self.predict.observe(seconds)


class Metrics:
    """One worker process's metrics: tallies for the hot path, prometheus_client values behind."""

    def __init__(self) -> None:
        self.directory = multiprocess_dir()
        # Per process, the values are registered here; across processes they live in files
        # and a scrape reads them all through a fresh MultiProcessCollector.
        self._registry = CollectorRegistry(auto_describe=False)
        reg = self._registry
        model_version = ["model", "version"]
        self._requests = Counter(
            "fastserve_requests",
            "Predict requests answered, by status code",
            [*model_version, "code"],
            registry=reg,
        )
        self._request_duration = Histogram(
            "fastserve_request_duration_seconds",
            "Time to answer a successful predict request, from its headers to its response",
            model_version,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._queue_wait = Histogram(
            "fastserve_queue_wait_seconds",
            "Time a request waited in its version's queue before its batch went to predict",
            model_version,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._predict_duration = Histogram(
            "fastserve_predict_duration_seconds",
            "Time of one batch's predict call",
            model_version,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._batch_rows = Histogram(
            "fastserve_batch_rows",
            "Rows in one predict batch",
            model_version,
            buckets=ROW_BUCKETS,
            registry=reg,
        )
        self._queue_depth = Gauge(
            "fastserve_queue_depth_rows",
            "Rows waiting in the queue (sampled every 100 ms)",
            model_version,
            multiprocess_mode="livesum",
            registry=reg,
        )
        self._shed = Counter(
            "fastserve_shed",
            "Predict requests shed: queue_full (429), queue_timeout (504), client_gone (cut out, no answer)",
            ["model", "reason"],
            registry=reg,
        )
        self._routed = Counter(
            "fastserve_routed",
            "Predict requests routed, by version and role (stable, candidate, pinned)",
            [*model_version, "role"],
            registry=reg,
        )
        self._shadow = Counter(
            "fastserve_shadow",
            "Shadow copies by outcome (agree, disagree, dropped, error)",
            [*model_version, "outcome"],
            registry=reg,
        )

        self.requests: dict[tuple[str, str, int], int] = {}  # answers other than 200
        self._meters: list[VersionMeter] = []
        self._routes: RouteCounts | None = None
        self._flushed_routed: dict[_Labels, int] = {}
        self._flushed_shadow: dict[_Labels, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- hot path ------------------------------------------------------------------------------

    def refused(self, model: str, version: str, code: int) -> None:
        """A predict request answered with an error; ``model`` must come from the repository.
        (Successful answers go to their version's meter.)"""
        key = (model, version, code)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def meter(self, model: str, version: str, queue: _QueueLike) -> VersionMeter:
        """The meter of one loaded version; its queue depth is sampled at each flush."""
        meter = VersionMeter((model, version), queue)
        self._meters.append(meter)
        return meter

    def retire(self, meter: VersionMeter) -> None:
        """Flush what an unloaded version's meter holds, and stop sampling its queue (which it
        would keep alive); its counts stay in the totals."""
        self.flush()
        self._meters.remove(meter)

    def follow(self, routes: RouteCounts) -> None:
        """Flush the router's routed and shadow counts too."""
        self._routes = routes

    # -- flushing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Move the tallies into prometheus_client's values (into this process's files)."""
        requests, self.requests = self.requests, {}
        for (model, version, code), n in requests.items():
            self._requests.labels(model, version, str(code)).inc(n)
            reason = SHED_REASONS.get(code)
            if reason is not None:
                self._shed.labels(model, reason).inc(n)
        for meter in self._meters:
            labels = meter.labels
            ok, meter.ok = meter.ok, 0
            if ok:
                self._requests.labels(*labels, "200").inc(ok)
            gone, meter.gone = meter.gone, 0
            if gone:
                self._shed.labels(labels[0], CLIENT_GONE).inc(gone)
            meter.duration.flush_into(self._request_duration.labels(*labels))
            meter.queue_wait.flush_into(self._queue_wait.labels(*labels))
            meter.predict.flush_into(self._predict_duration.labels(*labels))
            meter.rows.flush_into(self._batch_rows.labels(*labels))
            self._queue_depth.labels(*labels).set(meter.queue.queued_rows)
        if self._routes is not None:
            for model, routed in self._routes.routed.items():
                _add_deltas(self._routed, model, routed, self._flushed_routed)
            for model, outcomes in self._routes.shadow.outcomes.items():
                _add_deltas(self._shadow, model, outcomes, self._flushed_shadow)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every ``FLUSH_S`` on ``loop`` until ``stop``."""

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(FLUSH_S, tick)

        self._timer = loop.call_later(FLUSH_S, tick)

    def stop(self) -> None:
        """Last flush as this process ends; its live gauges leave the aggregate, its counts stay."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self.directory is not None:
            mark_process_dead(os.getpid(), self.directory)  # type: ignore[no-untyped-call]

    # -- exposition ----------------------------------------------------------------------------

    def render(
        self,
        info: Iterable[tuple[str, str, str, bool]],
        actions: Mapping[tuple[str, str], int],
    ) -> bytes:
        """The text exposition: every process's values, plus ``model_info`` and
        ``deploy_actions_total`` from the deployment state (``info``: model, version, alias,
        current; ``actions``: (model, action) -> count)."""
        self.flush()
        state = _StateCollector(list(info), dict(actions))
        if self.directory is None:
            note = (
                f"# fastserve: PROMETHEUS_MULTIPROC_DIR is not set: metrics of process {os.getpid()} only\n"
            )
            scrape = CollectorRegistry(auto_describe=False)
            scrape.register(state)
            return note.encode() + generate_latest(self._registry) + generate_latest(scrape)
        _forget_killed_processes(self.directory)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, self.directory)  # type: ignore[no-untyped-call]
        registry.register(state)
        return generate_latest(registry)


def _forget_killed_processes(directory: str) -> None:
    """Drop the live gauges of workers that died without their shutdown (SIGKILL, OOM killer).

    A worker that stops normally does this itself (``Metrics.stop``); one killed outright
    leaves its queue depth in the sum until someone notices that its pid is gone.
    """
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path.rsplit("_", 1)[1].removesuffix(".db")
        if pid.isdigit() and not process_alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _add_deltas(
    counter: Counter, model: str, counts: Mapping[tuple[str, str], int], flushed: dict[_Labels, int]
) -> None:
    for (version, label), total in counts.items():
        key = (model, version, label)
        delta = total - flushed.get(key, 0)
        if delta > 0:
            counter.labels(model, version, label).inc(delta)
            flushed[key] = total


class _StateCollector:
    """``model_info`` and ``deploy_actions_total``, from the shared deployment state.

    Not per-process gauges: the state is the same for every worker, so whichever worker
    answers reads it. A gauge per worker would need a multiprocess mode, and none is right
    here: ``livemax`` keeps a killed worker's stale 1 for an old stable forever, and
    ``mostrecent`` depends on which worker last wrote.
    """

    def __init__(self, info: list[tuple[str, str, str, bool]], actions: dict[tuple[str, str], int]) -> None:
        self._info = info
        self._actions = actions

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fastserve_model_info",
            "1 for the version each alias (stable, candidate) points at, 0 for the other loaded versions",
            labels=["model", "version", "alias"],
        )
        for model, version, alias, current in self._info:
            info.add_metric([model, version, alias], 1.0 if current else 0.0)
        yield info
        actions = CounterMetricFamily(
            "fastserve_deploy_actions",
            "Deployment actions taken (HTTP or CLI), from the audit log of the deployment state",
            labels=["model", "action"],
        )
        for (model, action), n in sorted(self._actions.items()):
            actions.add_metric([model, action], float(n))
        yield actions
