"""Which store holds the deployment state: the interface both share, and the one factory.

SQLite (``state.DeploymentStore``, a file per host) is the default and needs nothing;
``--state-url redis://...`` (``redis_state.RedisStore``) shares the state between replicas on
many hosts. Both apply the same rules (``actions.decide``, ``state.readiness``); what they
raise on a fault of the storage is ``state.STATE_ERRORS``, ``StateUnavailable`` for an action.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from fastserve.actions import Action, AuditEntry, Deployment
from fastserve.config import Settings
from fastserve.state import DeploymentStore, VersionState, state_path


class StateStore(Protocol):
    """The deployment state as the workers, the lifecycle and the CLI use it.

    Workers are named by pid on this host; ``server`` is the pid of their main process (one
    server, or one replica). ``replaced`` says that what was written may be gone (the file
    deleted, Redis restarted empty, this worker's liveness run out): the worker restores what it
    read last, then closes and records itself again (``worker.Server._mend``).
    """

    def seed(self, stables: Mapping[str, str], actor: str) -> None: ...
    def seed_loaded(self, versions: Mapping[str, Iterable[str]]) -> None: ...
    def act(
        self,
        model: str,
        action: Action,
        servable: Mapping[str, int | None],
        actor: str,
        on_disk: Collection[str] | None = None,
    ) -> Deployment: ...
    def restore(
        self, deployments: Mapping[str, Deployment], loaded: Mapping[str, Iterable[str]], actor: str
    ) -> list[str]: ...
    def deployments(self) -> dict[str, Deployment]: ...
    def history(self, limit: int = 20) -> list[AuditEntry]: ...
    def action_counts(self) -> dict[tuple[str, str], int]: ...
    def worker_ready(self, pid: int, server: int) -> None: ...
    def worker_gone(self, pid: int) -> None: ...
    def loaded(self) -> dict[str, dict[str, float]]: ...
    def record_version(self, pid: int, model: str, version: str, state: VersionState) -> None: ...
    def forget_version(self, pid: int, model: str, version: str) -> None: ...
    def worker_name(self, pid: int) -> str: ...
    def version_states(self) -> dict[tuple[str, str], dict[str, VersionState]]: ...
    def serving_everywhere(self) -> set[tuple[str, str]]: ...
    def ready_workers(self, server: int) -> list[int]: ...
    def changed(self) -> bool: ...
    def replaced(self) -> bool: ...
    def close(self) -> None: ...


def open_store(settings: Settings, follow: bool = False) -> StateStore:
    """The configured store. ``follow``: a worker's, whose event loop reads it 20 times a second
    and must never wait on a network (a Redis store then reads in a thread of its own)."""
    if settings.deploy.state_url:
        from fastserve.redis_state import RedisStore

        return RedisStore(settings.deploy.state_url, follow=follow)
    return DeploymentStore(state_path(settings))
