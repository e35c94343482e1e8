"""Deployment state in Redis, for replicas on many hosts: the same state as ``state.DeploymentStore``'s.

The rules are the same functions (``actions.decide``, ``state.readiness``); only the storage
differs. Keys, all under ``fastserve:``:

- ``deployment``: hash, model -> its ``Deployment`` (JSON); ``loaded``: hash, model ->
  {version: when its load was asked for};
- ``workers``: hash, worker -> {host, pid, server, ready_at}, the ready workers of every
  replica; ``alive:<worker>``: a key with a TTL that the worker's store refreshes every
  second, so that a replica that dies (its host gone, its pod killed) drops out by itself;
- ``records``: hash, [worker, model, version] -> that worker's ``VersionState``;
- ``audit``: list, newest first; ``counts``: hash, model and action -> how many;
- ``changes``: a counter every write increments (and publishes on the channel of the same
  name); ``epoch``: a random id written with the first write. A different or missing epoch
  says the state was lost (Redis restarted without persistence, a FLUSHALL): the workers
  write it again from what they serve, as they do for a deleted SQLite file.

A worker is named ``<hostname>:<pid>``: a pid alone repeats across hosts and pods. A worker on
this host is also checked directly (``process_alive``), so one killed outright drops out at
once rather than when its TTL runs out.

Each action is one WATCH/MULTI/EXEC over the keys it reads (deployments, loaded versions,
workers and their records), retried when another writer got in between: two replicas acting
at once take turns, and of two racing promotes exactly one wins.

A worker's store *follows* the state (``follow=True``): a thread of its own wakes on the
channel (or every 50 ms at the latest), reads the whole state in one round trip when the
counter moved, and keeps it as a snapshot. The event loop's reads (``changed``,
``deployments``, ``serving_everywhere``, ``ready_workers`` ...) read that snapshot and never
wait on the network: a Redis that does not answer costs its socket timeout in that thread,
not in the loop, and ``/readyz`` and ``/status`` answer from the last state meanwhile. Writes
run where the caller runs them (the worker: in a thread), with the same short timeouts.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fastserve.actions import Action, AuditEntry, Deployment, Load, Unload, decide
from fastserve.errors import ConfigError, StateUnavailable
from fastserve.state import VersionState, process_alive, readiness

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the message is the point
    redis = None  # type: ignore[assignment]

_PREFIX = "fastserve:"
_DEPLOYMENT, _LOADED, _WORKERS, _RECORDS = (
    _PREFIX + k for k in ("deployment", "loaded", "workers", "records")
)
_AUDIT, _COUNTS, _CHANGES, _EPOCH = (_PREFIX + k for k in ("audit", "counts", "changes", "epoch"))
_ALIVE = _PREFIX + "alive:"

# A Redis that does not answer costs a call this long, never more (no retries: the caller,
# the worker's poll or an action's 503, decides what to do next).
TIMEOUT_S = 0.5
# A worker's liveness key lives this long unless refreshed (every HEARTBEAT_S).
TTL_S = 5.0
HEARTBEAT_S = 1.0
# The follower's fallback poll, when no message on the channel wakes it.
_POLL_S = 0.05
# The audit entries a snapshot keeps (/status shows 20); a longer history is read from Redis.
_HISTORY_KEPT = 100
# An action retried this many times because others kept writing gives up with a 503.
_ATTEMPTS = 100

_json = msgspec.json.encode


@dataclass(frozen=True)
class _Worker:
    host: str
    pid: int
    server: int
    ready_at: float


@dataclass(frozen=True)
class _Snapshot:
    """The whole state as one read saw it (the audit log: its latest entries only)."""

    changes: int = 0
    epoch: str | None = None
    deployments: dict[str, Deployment] = field(default_factory=dict)
    loaded: dict[str, dict[str, float]] = field(default_factory=dict)
    workers: dict[str, _Worker] = field(default_factory=dict)
    live: frozenset[str] = frozenset()
    records: dict[tuple[str, str, str], VersionState] = field(default_factory=dict)
    history: tuple[AuditEntry, ...] = ()
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def same_state(self, other: _Snapshot) -> bool:
        return _fields(self) == _fields(other)


def _fields(snapshot: _Snapshot) -> tuple[Any, ...]:
    s = snapshot
    return (s.epoch, s.deployments, s.loaded, s.workers, s.live, s.records, s.history, s.counts)


def _reason(exc: Exception) -> str:
    """What went wrong, without the server's address (it reaches /deploy's answers)."""
    assert redis is not None
    if isinstance(exc, redis.AuthenticationError):
        return "Redis refused the credentials"
    if isinstance(exc, redis.TimeoutError):
        return f"Redis did not answer within {TIMEOUT_S} s"
    if isinstance(exc, redis.ConnectionError):
        return "Redis is unreachable"
    return f"Redis: {exc}"


class RedisStore:
    """The deployment state in Redis (see the module); the same methods as ``DeploymentStore``."""

    def __init__(self, url: str, follow: bool = False, host: str | None = None, ttl_s: float = TTL_S) -> None:
        if redis is None:
            raise ConfigError(
                "FASTSERVE_STATE_URL: a Redis state needs redis-py: pip install 'fastserve[redis]'"
            )
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except ValueError:  # the URL itself is not in the message: it may hold a password
            raise ConfigError("FASTSERVE_STATE_URL: not a redis:// or rediss:// URL") from None
        self.url = url  # holds the password, if any: never shown
        self.host = host or socket.gethostname()
        self._follow, self._ttl_ms = follow, int(ttl_s * 1000)
        self._lock = threading.Lock()
        self._last: _Snapshot | None = None  # the last state read; the last truth once lost
        self._epoch: str | None = None  # the state's epoch as this store knows it
        self._lost = False  # the state was lost (a new or missing epoch)
        self._beat_lost = False  # this store's workers were dropped (their TTL ran out)
        self._seq = 0  # snapshots taken that differ from the one before
        self._seen_seq = -1  # changed()'s
        self._seen_marks: tuple[Any, ...] | None = None  # changed()'s, when not following
        self._beating: set[int] = set()  # the pids whose liveness this store refreshes
        self._problem: str | None = None  # why the follower's last read failed
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- names ----------------------------------------------------------------------------------

    def worker_name(self, pid: int) -> str:
        """How the state names worker ``pid`` of this host: a pid alone repeats across hosts."""
        return f"{self.host}:{pid}"

    # -- writes -----------------------------------------------------------------------------------

    def _transact(
        self, body: Callable[[Any], Callable[[Any], None] | None], create: bool, *keys: str
    ) -> None:
        """Run ``body`` on a pipeline watching ``keys`` (and the epoch): it reads, and returns what
        queues its writes (None: nothing to write). Retried while other writers get in between."""
        assert redis is not None
        try:
            for _ in range(_ATTEMPTS):
                with self._client.pipeline() as watching:
                    pipe: Any = watching  # redis-py's pipeline methods are untyped
                    try:
                        pipe.watch(_EPOCH, *keys)
                        epoch = pipe.get(_EPOCH)
                        if not create and (epoch is None or (self._epoch not in (None, epoch))):
                            # Like an action on a deleted SQLite file: never write into a state
                            # that lost its models; the workers restore it first.
                            self._lost = self._epoch is not None
                            raise StateUnavailable(
                                "the deployment state cannot be written: it was lost (Redis restarted empty?)"
                            )
                        writes = body(pipe)
                        if writes is None:
                            pipe.unwatch()
                            return
                        new_epoch = epoch or secrets.token_hex(8)
                        pipe.multi()
                        writes(pipe)
                        pipe.set(_EPOCH, new_epoch)
                        pipe.incr(_CHANGES)
                        pipe.publish(_CHANGES, "1")
                        pipe.execute()
                        if self._epoch is None:
                            self._epoch = new_epoch
                        break
                    except redis.WatchError:
                        continue
            else:
                raise StateUnavailable("the deployment state cannot be written: too many concurrent writers")
            if self._follow:  # the caller reads its own write at once (the worker's routes)
                self._take(self._read())
        except redis.RedisError as exc:
            raise StateUnavailable(f"the deployment state cannot be written: {_reason(exc)}") from None

    def seed(self, stables: Mapping[str, str], actor: str) -> None:
        """Give each model that has no deployment yet one with this stable version (and audit it)."""

        def body(pipe: Any) -> Callable[[Any], None] | None:
            known = set(pipe.hkeys(_DEPLOYMENT))
            new = {m: s for m, s in stables.items() if m not in known}
            if not new:
                return None
            now = time.time()

            def writes(pipe: Any) -> None:
                for model, stable in new.items():
                    pipe.hset(_DEPLOYMENT, model, _json(Deployment(model, stable, updated_at=now)))
                    _audit(pipe, AuditEntry(now, model, "init", None, stable, actor, {}))

            return writes

        self._transact(body, True, _DEPLOYMENT)

    def seed_loaded(self, versions: Mapping[str, Iterable[str]]) -> None:
        """Give each model that has no loaded versions yet these (its first start)."""

        def body(pipe: Any) -> Callable[[Any], None] | None:
            known = set(pipe.hkeys(_LOADED))
            now = time.time()
            new = {m: dict.fromkeys(names, now) for m, names in versions.items() if m not in known}
            new = {m: v for m, v in new.items() if v}
            if not new:
                return None
            return lambda pipe: pipe.hset(_LOADED, mapping={m: _json(v) for m, v in new.items()})

        self._transact(body, True, _LOADED)

    def restore(
        self, deployments: Mapping[str, Deployment], loaded: Mapping[str, Iterable[str]], actor: str
    ) -> list[str]:
        """Write again, from what a worker serves, each model's deployment and loaded versions that
        no other worker restored first (after Redis lost the state); the models restored, each
        audited as a ``restore``."""
        restored: list[str] = []

        def body(pipe: Any) -> Callable[[Any], None] | None:
            known = set(pipe.hkeys(_DEPLOYMENT))
            restored[:] = [m for m in deployments if m not in known]
            if not restored:
                return None

            def writes(pipe: Any) -> None:
                for model in restored:
                    d = deployments[model]
                    pipe.hset(_DEPLOYMENT, model, _json(d))
                    pipe.hsetnx(_LOADED, model, _json(dict.fromkeys(loaded.get(model, ()), 0.0)))
                    _audit(pipe, AuditEntry(time.time(), model, "restore", None, d.stable, actor, {}))

            return writes

        self._transact(body, True, _DEPLOYMENT, _LOADED)
        return restored

    def act(
        self,
        model: str,
        action: Action,
        servable: Mapping[str, int | None],
        actor: str,
        on_disk: Collection[str] | None = None,
    ) -> Deployment:
        """Apply ``action`` to ``model`` atomically; the new deployment, audited (as SQLite's)."""
        outcome: list[Deployment] = []

        def body(pipe: Any) -> Callable[[Any], None]:
            raw, raw_loaded = pipe.hget(_DEPLOYMENT, model), pipe.hget(_LOADED, model)
            before = msgspec.json.decode(raw, type=Deployment) if raw is not None else None
            loaded = _decode_loaded(raw_loaded)
            live, records = self._live_records(pipe)
            serving, failed = readiness(
                frozenset(loaded), live, ((w, v, s.state) for (w, m, v), s in records.items() if m == model)
            )
            after, entry = decide(
                model,
                before,
                frozenset(loaded),
                serving,
                failed,
                action,
                servable,
                actor,
                on_disk,
                time.time(),
            )
            if isinstance(action, Load):
                loaded[action.version] = after.updated_at
            elif isinstance(action, Unload):
                del loaded[action.version]
            outcome[:] = [after]

            def writes(pipe: Any) -> None:
                pipe.hset(_DEPLOYMENT, model, _json(after))
                if loaded:
                    pipe.hset(_LOADED, model, _json(loaded))
                else:
                    pipe.hdel(_LOADED, model)
                _audit(pipe, entry)

            return writes

        self._transact(body, False, _DEPLOYMENT, _LOADED, _WORKERS, _RECORDS)
        return outcome[0]

    def worker_ready(self, pid: int, server: int) -> None:
        """Worker ``pid`` of the server whose main process is ``server`` (on this host) has loaded
        its models; from now on this store keeps it alive. Workers found dead are dropped."""
        name = self.worker_name(pid)

        def body(pipe: Any) -> Callable[[Any], None]:
            live, records = self._live_records(pipe)
            dead = [w for w in pipe.hkeys(_WORKERS) if w not in live and w != name]
            stale = [_record_field(*key) for key in records if key[0] in dead]

            def writes(pipe: Any) -> None:
                worker = _Worker(self.host, pid, server, time.time())
                pipe.hset(_WORKERS, name, _json(worker))
                pipe.set(_ALIVE + name, "1", px=self._ttl_ms)
                if dead:
                    pipe.hdel(_WORKERS, *dead)
                if stale:
                    pipe.hdel(_RECORDS, *stale)

            return writes

        self._transact(body, True, _WORKERS, _RECORDS)
        self._beating.add(pid)

    def worker_gone(self, pid: int) -> None:
        name = self.worker_name(pid)
        self._beating.discard(pid)

        def body(pipe: Any) -> Callable[[Any], None]:
            mine = [f for f in pipe.hkeys(_RECORDS) if msgspec.json.decode(f)[0] == name]

            def writes(pipe: Any) -> None:
                pipe.hdel(_WORKERS, name)
                pipe.delete(_ALIVE + name)
                if mine:
                    pipe.hdel(_RECORDS, *mine)

            return writes

        self._transact(body, False, _WORKERS, _RECORDS)

    def record_version(self, pid: int, model: str, version: str, state: VersionState) -> None:
        """Worker ``pid``'s state of one version (loading, serving, failed)."""
        key = _record_field(self.worker_name(pid), model, version)
        self._transact(lambda _: lambda pipe: pipe.hset(_RECORDS, key, _json(state)), False)

    def forget_version(self, pid: int, model: str, version: str) -> None:
        """Worker ``pid`` no longer holds the version (it unloaded it)."""
        key = _record_field(self.worker_name(pid), model, version)
        self._transact(lambda _: lambda pipe: pipe.hdel(_RECORDS, key), False)

    def heartbeat(self) -> None:
        """Keep this store's ready workers alive for another TTL; one whose key had run out was
        dropped by the others: ``replaced`` says so, and the worker records itself again."""
        assert redis is not None
        beating = sorted(self._beating)
        if not beating:
            return
        with self._client.pipeline(transaction=False) as pipe:
            for pid in beating:
                pipe.set(_ALIVE + self.worker_name(pid), "1", px=self._ttl_ms, get=True)
            previous = pipe.execute()
        if any(p is None for p in previous):
            self._beat_lost = True

    # -- reads ------------------------------------------------------------------------------------

    def _live_records(self, pipe: Any) -> tuple[frozenset[str], dict[tuple[str, str, str], VersionState]]:
        """The live ready workers and every worker's records, read on ``pipe`` (watching)."""
        workers = {w: msgspec.json.decode(raw, type=_Worker) for w, raw in pipe.hgetall(_WORKERS).items()}
        records = _decode_records(pipe.hgetall(_RECORDS))
        return self._live(pipe, workers), records

    def _live(self, client: Any, workers: Mapping[str, _Worker]) -> frozenset[str]:
        names = sorted(workers)
        alive = client.mget([_ALIVE + name for name in names]) if names else []
        return frozenset(
            name
            for name, beat in zip(names, alive, strict=True)
            if beat is not None and (workers[name].host != self.host or process_alive(workers[name].pid))
        )

    def _read(self) -> _Snapshot:
        """The whole state in one transaction (and the workers' liveness keys in a second call)."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.mget(_CHANGES, _EPOCH)
            for key in (_DEPLOYMENT, _LOADED, _WORKERS, _RECORDS, _COUNTS):
                pipe.hgetall(key)
            pipe.lrange(_AUDIT, 0, _HISTORY_KEPT - 1)
            (changes, epoch), deployments, loaded, workers, records, counts, audit = pipe.execute()
        decoded = {w: msgspec.json.decode(raw, type=_Worker) for w, raw in workers.items()}
        return _Snapshot(
            changes=int(changes or 0),
            epoch=epoch,
            deployments={m: msgspec.json.decode(raw, type=Deployment) for m, raw in deployments.items()},
            loaded={m: _decode_loaded(raw) for m, raw in loaded.items()},
            workers=decoded,
            live=self._live(self._client, decoded),
            records=_decode_records(records),
            history=tuple(msgspec.json.decode(raw, type=AuditEntry) for raw in audit),
            counts={_count_key(k): int(n) for k, n in counts.items()},
        )

    def _take(self, snapshot: _Snapshot) -> None:
        """Keep ``snapshot`` as the state, unless it shows the state was lost (then the last one
        stays the truth, as a deleted SQLite file's open reader does)."""
        with self._lock:
            if self._epoch is not None and snapshot.epoch != self._epoch:
                self._lost = True
            if self._lost:
                return
            self._epoch = snapshot.epoch
            if self._last is None or not self._last.same_state(snapshot):
                self._seq += 1
            self._last = snapshot

    def _state(self) -> _Snapshot:
        """The state to read: the follower's snapshot, or (not following) a fresh read."""
        assert redis is not None
        if self._follow:
            if self._thread is None:
                self._start_following()
        elif not self._lost:
            try:
                self._take(self._read())
            except redis.RedisError as exc:
                raise StateUnavailable(f"the deployment state cannot be read: {_reason(exc)}") from None
        return self._last or _Snapshot()

    def _start_following(self) -> None:
        assert redis is not None
        try:  # the first read is the caller's: nothing is ever read from an empty snapshot
            self._take(self._read())
        except redis.RedisError as exc:
            problem = f"the deployment state cannot be read: {_reason(exc)}"
            if self._last is None:
                raise StateUnavailable(problem) from None
            self._problem = problem  # what this store wrote last stands meanwhile
        # Each follower has its own stop: one still in a call when closed ends by itself after it.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._following, args=(self._stop,), name="fastserve-state", daemon=True
        )
        self._thread.start()

    def _following(self, stop: threading.Event) -> None:
        """The follower thread: wake on the channel or every _POLL_S, read what changed, beat."""
        assert redis is not None
        pubsub = None
        next_beat = 0.0
        marks: tuple[Any, ...] | None = None
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(_CHANGES)
                pubsub.get_message(timeout=_POLL_S)
                now = time.monotonic()
                full = now >= next_beat  # liveness changes without a write: look every beat
                current = tuple(self._client.mget(_CHANGES, _EPOCH))
                snapshot = self._read() if full or current != marks else None
                self._problem = None  # before a lost state shows: the caller sees both at once
                if snapshot is not None:
                    self._take(snapshot)
                    marks = current
                if full:
                    self.heartbeat()
                    next_beat = now + HEARTBEAT_S
            except redis.RedisError as exc:
                self._problem = f"the deployment state cannot be read: {_reason(exc)}"
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                marks = None
                stop.wait(_POLL_S)  # a refused connection fails at once: do not spin
            except Exception as exc:  # a bug must not stop the following silently
                self._problem = f"reading the deployment state failed: {exc!r}"
                stop.wait(_POLL_S)
        if pubsub is not None:
            pubsub.close()

    def deployments(self) -> dict[str, Deployment]:
        return dict(self._state().deployments)

    def history(self, limit: int = 20) -> list[AuditEntry]:
        """The latest ``limit`` actions, newest first."""
        if limit <= _HISTORY_KEPT:
            return list(self._state().history[:limit])
        assert redis is not None
        try:
            raw = self._client.lrange(_AUDIT, 0, limit - 1)
        except redis.RedisError as exc:
            raise StateUnavailable(f"the deployment state cannot be read: {_reason(exc)}") from None
        return [msgspec.json.decode(entry, type=AuditEntry) for entry in raw]

    def action_counts(self) -> dict[tuple[str, str], int]:
        """How many times each action was taken on each model: (model, action) -> count."""
        return dict(self._state().counts)

    def loaded(self) -> dict[str, dict[str, float]]:
        """The versions to load: model -> version -> when the load was asked for."""
        return {m: dict(v) for m, v in self._state().loaded.items()}

    def version_states(self) -> dict[tuple[str, str], dict[str, VersionState]]:
        """(model, version) -> live worker (``host:pid``) -> its state of that version."""
        state = self._state()
        found: dict[tuple[str, str], dict[str, VersionState]] = {}
        for (worker, model, version), record in state.records.items():
            if worker in state.live:
                found.setdefault((model, version), {})[worker] = record
        return found

    def serving_everywhere(self) -> set[tuple[str, str]]:
        """The loaded versions warm in every live ready worker of every replica."""
        state = self._state()
        everywhere = set()
        for model, versions in state.loaded.items():
            records = ((w, v, s.state) for (w, m, v), s in state.records.items() if m == model)
            serving, _ = readiness(frozenset(versions), state.live, records)
            everywhere |= {(model, v) for v in serving}
        return everywhere

    def ready_workers(self, server: int) -> list[int]:
        """The live ready workers of ``server``, a main process on this host (this replica)."""
        state = self._state()
        return sorted(
            w.pid
            for name, w in state.workers.items()
            if name in state.live and w.host == self.host and w.server == server
        )

    def changed(self) -> bool:
        """Whether the state changed since the last call. Following: a look at the snapshot's
        number, no network; otherwise one MGET of the change counter and the epoch."""
        assert redis is not None
        if self._follow:
            if self._thread is None:
                self._start_following()
            if self._problem is not None:
                raise StateUnavailable(self._problem)
            if self._seq == self._seen_seq:
                return False
            self._seen_seq = self._seq
            return True
        try:
            marks = tuple(self._client.mget(_CHANGES, _EPOCH))
        except redis.RedisError as exc:
            raise StateUnavailable(f"the deployment state cannot be read: {_reason(exc)}") from None
        if marks == self._seen_marks:
            return False
        self._seen_marks = marks
        return True

    def replaced(self) -> bool:
        """Whether what was written may be gone: the state was lost, or this store's workers
        were dropped (their liveness ran out). The worker restores and records itself again."""
        return self._lost or self._beat_lost

    def close(self) -> None:
        """Stop following and forget the lost state: the next read starts afresh."""
        if self._thread is not None:
            self._stop.set()
            # Not waited for past a poll: the worker's loop calls this (after a lost state).
            self._thread.join(timeout=_POLL_S * 2)
            self._thread = None
        with self._lock:
            self._lost = self._beat_lost = False
            self._epoch = None
            self._seen_seq, self._seen_marks = -1, None
        self._client.connection_pool.disconnect()


def _record_field(worker: str, model: str, version: str) -> str:
    return _json([worker, model, version]).decode()


def _decode_records(raw: Mapping[str, str]) -> dict[tuple[str, str, str], VersionState]:
    found = {}
    for key, value in raw.items():
        worker, model, version = msgspec.json.decode(key)
        found[(worker, model, version)] = msgspec.json.decode(value, type=VersionState)
    return found


def _decode_loaded(raw: str | None) -> dict[str, float]:
    return msgspec.json.decode(raw, type=dict[str, float]) if raw is not None else {}


def _audit(pipe: Any, entry: AuditEntry) -> None:
    pipe.lpush(_AUDIT, _json(entry))
    pipe.hincrby(_COUNTS, _json([entry.model, entry.action]).decode(), 1)


def _count_key(raw: str) -> tuple[str, str]:
    model, action = msgspec.json.decode(raw)
    return model, action
