"""Deployment state shared by every worker process and every restart: aliases, canary, shadow, audit.

The store is one SQLite file in WAL mode, so that the workers of ``granian --workers N``,
``fastserve deploy`` on the host, and a restarted server all read and write the same truth.
Each model has one row: its stable version, an optional candidate with its canary share
and shadow flag, and the stable before the current one (where a bare rollback goes). Each
action is one ``BEGIN IMMEDIATE`` transaction that reads the row, applies the action and
writes the row and its audit entry, so two workers acting at once take turns.

A model gets its row the first time a server (or the CLI) sees it, seeded from the
repository (``model.toml``'s ``stable``, else the latest version). From then on the store
rules: a new version dropped into the repository is served only once it is deployed.

Workers see other processes' actions by polling ``PRAGMA data_version``, which SQLite
keeps in shared memory: a poll reads no table and takes microseconds.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import msgspec

from fastserve.config import Settings, resolve_repository
from fastserve.errors import (
    ConfigError,
    DeployConflict,
    MalformedBody,
    UnknownModel,
    UnknownVersion,
    without_path,
)

# -- actions ------------------------------------------------------------------------------------


# A version name as the repository allows it: an empty one would read as "none" below.
_Version = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Candidate(msgspec.Struct, tag="candidate", tag_field="action", forbid_unknown_fields=True):
    """Make ``version`` the candidate: ``canary`` of the traffic goes to it, ``shadow`` mirrors the rest."""

    version: _Version
    canary: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    shadow: bool = False


class Promote(msgspec.Struct, tag="promote", tag_field="action", forbid_unknown_fields=True):
    """The candidate becomes stable; the old stable is kept as the rollback target."""


class Rollback(msgspec.Struct, tag="rollback", tag_field="action", forbid_unknown_fields=True):
    """Stable goes back to ``version``, or to the previous stable when no version is named."""

    version: _Version | None = None


class ClearCandidate(msgspec.Struct, tag="clear_candidate", tag_field="action", forbid_unknown_fields=True):
    """No candidate: all traffic to stable, nothing mirrored."""


Action = Candidate | Promote | Rollback | ClearCandidate
ACTION_NAMES = ("candidate", "promote", "rollback", "clear_candidate")

_ACTION_DECODER = msgspec.json.Decoder(Action)


def make_action(fields: Mapping[str, Any]) -> Action:
    """A deployment action from its fields (the CLI's arguments), checked as a body would be."""
    try:
        action: Action = msgspec.convert(fields, Action)
    except msgspec.ValidationError as exc:
        raise MalformedBody(f"not a deployment action: {exc}") from None
    return action


def decode_action(body: bytes) -> Action:
    """A deployment action from its JSON body, or ``MalformedBody`` saying what is wrong."""
    try:
        action: Action = _ACTION_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"not a deployment action: {exc}") from None
    return action


def action_name(action: Action) -> str:
    return type(action).__struct_config__.tag  # type: ignore[return-value]


# -- state and its transitions ------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """Where one model's traffic goes."""

    model: str
    stable: str
    candidate: str | None = None
    canary: float = 0.0
    shadow: bool = False
    previous_stable: str | None = None
    updated_at: float = 0.0  # unix seconds of the last action

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditEntry:
    """One action, as the audit log keeps it."""

    at: float  # unix seconds
    model: str
    action: str
    from_version: str | None
    to_version: str | None
    actor: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def transition(current: Deployment, action: Action, servable: Mapping[str, int | None]) -> Deployment:
    """The deployment after ``action``.

    ``servable`` maps each version that may be deployed to its feature count (``None`` when
    the caller cannot know it without loading the model, as the CLI). Raises
    ``UnknownVersion`` for a version not in it, and ``DeployConflict`` for an action that
    makes no sense in the current state.
    """
    model = current.model
    if isinstance(action, Candidate):
        _check_servable(model, action.version, servable)
        if action.version == current.stable:
            raise DeployConflict(f"{model} {action.version} is already stable")
        wanted, serving = servable[action.version], servable.get(current.stable)
        if wanted is not None and serving is not None and wanted != serving:
            raise DeployConflict(
                f"{model} {action.version} takes {wanted} features, stable {current.stable} takes {serving}"
            )
        return replace(current, candidate=action.version, canary=action.canary, shadow=action.shadow)
    if isinstance(action, Promote):
        if current.candidate is None:
            raise DeployConflict(f"{model} has no candidate to promote")
        _check_servable(model, current.candidate, servable)
        return _new_stable(current, current.candidate)
    if isinstance(action, Rollback):
        target = action.version or current.previous_stable
        if target is None:
            raise DeployConflict(f"{model} has no previous stable version to roll back to")
        _check_servable(model, target, servable)
        if target == current.stable:
            raise DeployConflict(f"{model} {target} is already stable")
        return _new_stable(current, target)
    return replace(current, candidate=None, canary=0.0, shadow=False)


def _new_stable(current: Deployment, version: str) -> Deployment:
    # The candidate survives a rollback unless it is the version that becomes stable.
    deployment = replace(current, stable=version, previous_stable=current.stable)
    if deployment.candidate == version:
        deployment = replace(deployment, candidate=None, canary=0.0, shadow=False)
    return deployment


def _check_servable(model: str, version: str, servable: Mapping[str, int | None]) -> None:
    if version not in servable:
        raise UnknownVersion(f"model {model!r} serves no version {version!r}")


def _moved(before: Deployment, after: Deployment, action: Action) -> tuple[str | None, str | None]:
    if isinstance(action, Promote | Rollback):
        return before.stable, after.stable
    return before.candidate, after.candidate


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
# A writer holding the lock (another worker's action) is waited for, up to this long.
_BUSY_TIMEOUT_S = 5.0


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
        self._data_version = -1

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            _switch_to_wal(conn)
            conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            # This reaches /status and /readyz.
            reason = without_path(exc)
            raise ConfigError(f"FASTSERVE_STATE_PATH: cannot open the deployment state: {reason}") from None
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = self._connect()
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def seed(self, stables: Mapping[str, str], actor: str) -> None:
        """Give each model that has no row yet one with this stable version (and audit it)."""
        now = time.time()
        with self._transaction() as conn:
            for model, stable in stables.items():
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO deployment (model, stable, updated_at) VALUES (?, ?, ?)",
                    (model, stable, now),
                ).rowcount
                if inserted:
                    _audit(conn, AuditEntry(now, model, "init", None, stable, actor, {}))

    def act(self, model: str, action: Action, servable: Mapping[str, int | None], actor: str) -> Deployment:
        """Apply ``action`` to ``model`` atomically; the new deployment, audited."""
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM deployment WHERE model = ?", (model,)).fetchone()
            if row is None:
                raise UnknownModel(f"no model named {model!r}")
            before = _deployment(row)
            after = replace(transition(before, action, servable), updated_at=time.time())
            conn.execute(
                "UPDATE deployment SET stable = ?, candidate = ?, canary = ?, shadow = ?,"
                " previous_stable = ?, updated_at = ? WHERE model = ?",
                (
                    after.stable,
                    after.candidate,
                    after.canary,
                    int(after.shadow),
                    after.previous_stable,
                    after.updated_at,
                    model,
                ),
            )
            source, target = _moved(before, after, action)
            detail = {"canary": after.canary, "shadow": after.shadow} if isinstance(action, Candidate) else {}
            entry = AuditEntry(after.updated_at, model, action_name(action), source, target, actor, detail)
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
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO worker VALUES (?, ?, ?)", (pid, server, time.time()))

    def worker_gone(self, pid: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM worker WHERE pid = ?", (pid,))

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
