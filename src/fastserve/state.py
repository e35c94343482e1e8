"""Deployment state shared by every worker process and every restart: aliases, canary, shadow,
the versions to load and where each is warm, and the audit log.

The store is one SQLite file in WAL mode, so that the workers of ``granian --workers N``,
``fastserve deploy`` on the host, and a restarted server all read and write the same truth.
Each model has one row: its stable version, an optional candidate with its canary share
and shadow flag, and the stable before the current one (where a bare rollback goes). Each
action is one ``BEGIN IMMEDIATE`` transaction that reads the row, applies the action and
writes the row and its audit entry, so two workers acting at once take turns.

A model gets its row the first time a server (or the CLI) sees it, seeded from the
repository (``model.toml``'s ``stable``, else the latest version). From then on the store
rules: a new version dropped into the repository is served only once it is deployed.

The versions to load are rows too (``loaded``), seeded the first time a model is seen
(``model.toml``'s ``load = [...]``, else every version on disk) and changed by the ``load``
and ``unload`` actions; a restart loads exactly these. Each worker records, per version,
whether it is loading, serving or failed (``worker_version``); a version is warm everywhere
when every live ready worker serves it, and only then may an alias point at it.

Workers see other processes' actions by polling ``PRAGMA data_version``, which SQLite
keeps in shared memory: a poll reads no table and takes microseconds.

This is the default store, for one host; ``redis_state.RedisStore`` holds the same state in
Redis for replicas on many hosts (``store.open_store`` picks). Both apply the rules of
``actions.decide`` and ``readiness`` below.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from fastserve.actions import Action, AuditEntry, Deployment, Load, Unload, decide
from fastserve.config import Settings, resolve_repository
from fastserve.errors import ConfigError, StateUnavailable, without_path

# Version states a worker records (worker_version.state).
LOADING, SERVING, FAILED, UNLOADING = "loading", "serving", "failed", "unloading"


@dataclass(frozen=True)
class VersionState:
    """One worker's record of one version."""

    state: str  # LOADING, SERVING, FAILED or UNLOADING
    reason: str | None  # why it failed
    rss_bytes: int | None  # what loading it added to the worker's resident memory


# -- the store ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployment (
    model TEXT PRIMARY KEY,
    stable TEXT NOT NULL,
    candidate TEXT,
    canary REAL NOT NULL DEFAULT 0,
    shadow INTEGER NOT NULL DEFAULT 0,
    previous_stable TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS worker (
    pid INTEGER PRIMARY KEY,
    server INTEGER NOT NULL,
    ready_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loaded (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    requested_at REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS worker_version (
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    rss_bytes INTEGER,
    at REAL NOT NULL,
    PRIMARY KEY (pid, model, version)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    model TEXT NOT NULL,
    action TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

_COLUMNS = "model, stable, candidate, canary, shadow, previous_stable, updated_at"
# A writer holding the lock (another worker's action) is waited for, up to this long. Workers'
# writes take milliseconds; a lock held longer is a fault, and the action answers 503.
_BUSY_TIMEOUT_S = 2.0
# What a failed read or write of the state can raise.
STATE_ERRORS = (ConfigError, StateUnavailable, sqlite3.Error, OSError)


def state_path(settings: Settings) -> Path:
    """The configured state file, or the default one for the configured repository."""
    if settings.deploy.state_path:
        return Path(settings.deploy.state_path).expanduser()
    return default_state_path(resolve_repository(settings.repository))


def default_state_path(repository: Path) -> Path:
    """A state file per repository, outside it: the repository can stay read-only."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    real = repository.expanduser().resolve()
    digest = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    return base / "fastserve" / f"{real.name or 'root'}-{digest}.sqlite"


class DeploymentStore:
    """The SQLite file behind the deployment state.

    ``deployments``, ``history`` and ``changed`` use one connection that belongs to the
    thread that first calls them (the event loop's); ``seed`` and ``act`` open their own,
    so they can run in a worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self._reader_file: tuple[int, int] | None = None  # (device, inode) the reader has open
        self._data_version = -1

    def _connect(self, create: bool = True) -> sqlite3.Connection:
        """A connection to the state file; ``create=False`` refuses to make a new, empty one
        (an action on a file deleted under the server would start a state with no models)."""
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            else:
                uri = f"{self.path.absolute().as_uri()}?mode=rw"
                conn = sqlite3.connect(uri, timeout=_BUSY_TIMEOUT_S, isolation_level=None, uri=True)
            _switch_to_wal(conn)
            conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            reason = without_path(exc)
            if not create:
                raise StateUnavailable(f"the deployment state cannot be opened: {reason}") from None
            # This reaches /status and /readyz.
            raise ConfigError(f"FASTSERVE_STATE_PATH: cannot open the deployment state: {reason}") from None
        return conn

    @contextmanager
    def _transaction(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; a lock held past the wait, a full disk or a vanished file
        raise ``StateUnavailable`` (the rules' own errors pass through)."""
        conn = self._connect(create)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with suppress(sqlite3.Error):  # a failed commit has rolled back already
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the deployment state cannot be written: {without_path(exc)}") from None
        finally:
            conn.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = self._connect()
            self._reader_file = _file_id(self.path)
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self._data_version = -1

    def replaced(self) -> bool:
        """Whether the file the reader has open is no longer the one at the path: deleted, or
        deleted and made again (a stat, no read)."""
        if self._reader is None:
            return False
        return _file_id(self.path) != self._reader_file

    def restore(
        self,
        deployments: Mapping[str, Deployment],
        loaded: Mapping[str, Iterable[str]],
        actor: str,
    ) -> list[str]:
        """Make the state file again from what a worker serves (after it was deleted): each model's
        deployment and loaded versions, where no other worker restored them first. The models
        this call restored, each audited as a ``restore``."""
        restored = []
        with self._transaction(create=True) as conn:
            for model, deployment in deployments.items():
                d = deployment
                inserted = conn.execute(
                    f"INSERT OR IGNORE INTO deployment ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (model, d.stable, d.candidate, d.canary, int(d.shadow), d.previous_stable, d.updated_at),
                ).rowcount
                if not inserted:
                    continue
                restored.append(model)
                conn.executemany(
                    "INSERT OR IGNORE INTO loaded (model, version, requested_at) VALUES (?, ?, 0)",
                    [(model, version) for version in loaded.get(model, ())],
                )
                _audit(conn, AuditEntry(time.time(), model, "restore", None, d.stable, actor, {}))
        return restored

    def seed(self, stables: Mapping[str, str], actor: str) -> None:
        """Give each model that has no row yet one with this stable version (and audit it)."""
        now = time.time()
        with self._transaction(create=True) as conn:
            for model, stable in stables.items():
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO deployment (model, stable, updated_at) VALUES (?, ?, ?)",
                    (model, stable, now),
                ).rowcount
                if inserted:
                    _audit(conn, AuditEntry(now, model, "init", None, stable, actor, {}))

    def seed_loaded(self, versions: Mapping[str, Iterable[str]]) -> None:
        """Give each model that has no loaded versions yet these (its first start)."""
        now = time.time()
        with self._transaction(create=True) as conn:
            for model, names in versions.items():
                if conn.execute("SELECT 1 FROM loaded WHERE model = ? LIMIT 1", (model,)).fetchone():
                    continue
                conn.executemany(
                    "INSERT INTO loaded (model, version, requested_at) VALUES (?, ?, ?)",
                    [(model, version, now) for version in names],
                )

    def act(
        self,
        model: str,
        action: Action,
        servable: Mapping[str, int | None],
        actor: str,
        on_disk: Collection[str] | None = None,
    ) -> Deployment:
        """Apply ``action`` to ``model`` atomically; the new deployment, audited.

        ``servable`` maps the versions the caller knows to their feature counts; an alias may
        point only at a loaded version warm in every live worker (checked here, in the same
        transaction). ``on_disk``: the versions with a model file, for ``load``.
        """
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM deployment WHERE model = ?", (model,)).fetchone()
            before = _deployment(row) if row is not None else None
            loaded = frozenset(
                v for (v,) in conn.execute("SELECT version FROM loaded WHERE model = ?", (model,))
            )
            serving, failed = _readiness(conn, model, loaded)
            after, entry = decide(
                model, before, loaded, serving, failed, action, servable, actor, on_disk, time.time()
            )
            if isinstance(action, Load):
                conn.execute(
                    "INSERT OR REPLACE INTO loaded (model, version, requested_at) VALUES (?, ?, ?)",
                    (model, action.version, after.updated_at),
                )
            elif isinstance(action, Unload):
                conn.execute("DELETE FROM loaded WHERE model = ? AND version = ?", (model, action.version))
            conn.execute(
                "INSERT OR REPLACE INTO deployment"
                " (model, stable, candidate, canary, shadow, previous_stable, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    model,
                    after.stable,
                    after.candidate,
                    after.canary,
                    int(after.shadow),
                    after.previous_stable,
                    after.updated_at,
                ),
            )
            _audit(conn, entry)
        return after

    def deployments(self) -> dict[str, Deployment]:
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM deployment").fetchall()
        return {row[0]: _deployment(row) for row in rows}

    def history(self, limit: int = 20) -> list[AuditEntry]:
        """The latest ``limit`` actions, newest first."""
        rows = self._conn.execute(
            "SELECT at, model, action, from_version, to_version, actor, detail"
            " FROM audit ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            AuditEntry(at, model, action, source, target, actor, msgspec.json.decode(detail))
            for at, model, action, source, target, actor, detail in rows
        ]

    def action_counts(self) -> dict[tuple[str, str], int]:
        """How many times each action was taken on each model: (model, action) -> count."""
        query = "SELECT model, action, COUNT(*) FROM audit GROUP BY model, action"
        rows = self._conn.execute(query).fetchall()
        return {(model, action): n for model, action, n in rows}

    def worker_ready(self, pid: int, server: int) -> None:
        """Worker ``pid`` of the server whose main process is ``server`` has loaded its models."""
        with self._transaction(create=True) as conn:
            conn.execute("INSERT OR REPLACE INTO worker VALUES (?, ?, ?)", (pid, server, time.time()))

    def worker_gone(self, pid: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM worker WHERE pid = ?", (pid,))
            conn.execute("DELETE FROM worker_version WHERE pid = ?", (pid,))

    def loaded(self) -> dict[str, dict[str, float]]:
        """The versions to load: model -> version -> when the load was asked for (a newer time
        than a worker's last attempt asks it to try again)."""
        found: dict[str, dict[str, float]] = {}
        for model, version, at in self._conn.execute("SELECT model, version, requested_at FROM loaded"):
            found.setdefault(model, {})[version] = at
        return found

    def record_version(self, pid: int, model: str, version: str, state: VersionState) -> None:
        """Worker ``pid``'s state of one version (loading, serving, failed)."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO worker_version VALUES (?, ?, ?, ?, ?, ?, ?)",
                (pid, model, version, state.state, state.reason, state.rss_bytes, time.time()),
            )

    def forget_version(self, pid: int, model: str, version: str) -> None:
        """Worker ``pid`` no longer holds the version (it unloaded it)."""
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM worker_version WHERE pid = ? AND model = ? AND version = ?",
                (pid, model, version),
            )

    def worker_name(self, pid: int) -> str:
        """How ``version_states`` names worker ``pid``: its pid (one host shares one file)."""
        return str(pid)

    def version_states(self) -> dict[tuple[str, str], dict[str, VersionState]]:
        """(model, version) -> live worker (``worker_name``) -> its state of that version."""
        rows = self._conn.execute("SELECT pid, model, version, state, reason, rss_bytes FROM worker_version")
        found: dict[tuple[str, str], dict[str, VersionState]] = {}
        alive: dict[int, bool] = {}
        for pid, model, version, state, reason, rss in rows:
            if alive.setdefault(pid, process_alive(pid)):
                record = VersionState(state, reason, rss)
                found.setdefault((model, version), {})[self.worker_name(pid)] = record
        return found

    def serving_everywhere(self) -> set[tuple[str, str]]:
        """The loaded versions warm in every live ready worker: the ones an alias may name, and
        a pinned request may reach."""
        conn = self._conn
        everywhere = set()
        for model, versions in self.loaded().items():
            everywhere |= {(model, v) for v in _serving_everywhere(conn, model, frozenset(versions))}
        return everywhere

    def ready_workers(self, server: int) -> list[int]:
        """The live workers of ``server`` that are ready (a worker killed outright leaves a row
        behind; its pid is gone)."""
        rows = self._conn.execute("SELECT pid FROM worker WHERE server = ?", (server,)).fetchall()
        return [pid for (pid,) in rows if process_alive(pid)]

    def changed(self) -> bool:
        """Whether another connection committed since the last call (cheap: no table is read)."""
        version: int = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        self._data_version = version
        return True


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (its workers share the pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """WAL mode, waiting out other connections as every other statement does.

    Switching the journal mode does not go through SQLite's busy handler: while another
    worker holds a lock on a file that is not in WAL mode yet (several workers opening a new
    state file at once), it fails at once with "database is locked".
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _serving_everywhere(conn: sqlite3.Connection, model: str, loaded: frozenset[str]) -> frozenset[str]:
    return _readiness(conn, model, loaded)[0]


def _readiness(
    conn: sqlite3.Connection, model: str, loaded: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    live = [pid for (pid,) in conn.execute("SELECT pid FROM worker") if process_alive(pid)]
    if not live:
        return loaded, frozenset()
    marks = ",".join("?" * len(live))
    query = f"SELECT pid, version, state FROM worker_version WHERE model = ? AND pid IN ({marks})"
    return readiness(loaded, live, conn.execute(query, (model, *live)))


def readiness(
    loaded: frozenset[str], live: Collection[object], records: Iterable[tuple[object, str, str]]
) -> tuple[frozenset[str], frozenset[str]]:
    """Those of ``loaded`` that every ``live`` ready worker serves (all of them, with no live
    worker: the next start loads them), and those that some live worker failed to load.
    ``records``: (worker, version, state) of one model, for any workers (the dead are skipped)."""
    if not live:
        return loaded, frozenset()
    serving: dict[str, int] = {}
    failed = set()
    for worker, version, state in records:
        if worker not in live:
            continue
        if state == SERVING:
            serving[version] = serving.get(version, 0) + 1
        elif state == FAILED:
            failed.add(version)
    everywhere = frozenset(v for v in loaded if serving.get(v, 0) == len(live))
    return everywhere, frozenset(failed & loaded)


def _deployment(row: tuple[Any, ...]) -> Deployment:
    model, stable, candidate, canary, shadow, previous, updated_at = row
    return Deployment(model, stable, candidate, float(canary), bool(shadow), previous, updated_at)


def _audit(conn: sqlite3.Connection, entry: AuditEntry) -> None:
    conn.execute(
        "INSERT INTO audit (at, model, action, from_version, to_version, actor, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            entry.at,
            entry.model,
            entry.action,
            entry.from_version,
            entry.to_version,
            entry.actor,
            msgspec.json.encode(entry.detail).decode(),
        ),
    )
