"""Deployment actions and their rules: what each action does to a model's aliases and loaded versions.

The rules are pure functions of the current state; each store (``state.DeploymentStore`` on
SQLite, ``redis_state.RedisStore`` on Redis) reads that state, applies ``decide`` and writes
the outcome in one transaction per action, so every worker, every replica, the CLI and a
restart see the same outcome whatever holds the state.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import msgspec

from fastserve.errors import (
    DeployConflict,
    MalformedBody,
    UnknownModel,
    UnknownVersion,
    VersionNotReady,
)

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


class Load(msgspec.Struct, tag="load", tag_field="action", forbid_unknown_fields=True):
    """Every worker loads and warms ``version`` from the repository (a new model's first version
    becomes its stable); again after a failed load, every worker that does not serve it tries again."""

    version: _Version


class Unload(msgspec.Struct, tag="unload", tag_field="action", forbid_unknown_fields=True):
    """Every worker answers ``version``'s queued requests, then drops it; never stable or candidate."""

    version: _Version


Action = Candidate | Promote | Rollback | ClearCandidate | Load | Unload
ACTION_NAMES = ("candidate", "promote", "rollback", "clear_candidate", "load", "unload")
# The actions that move aliases; load and unload change which versions are loaded.
ALIAS_ACTIONS = (Candidate, Promote, Rollback, ClearCandidate)

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


def transition(
    current: Deployment,
    action: Action,
    servable: Mapping[str, int | None],
    pending: Collection[str] = (),
) -> Deployment:
    """The deployment after an alias action.

    ``servable`` maps each version that may be deployed to its feature count (``None`` when
    the caller cannot know it without loading the model, as the CLI). ``pending`` holds the
    versions being loaded, not yet warm in every worker. Raises ``VersionNotReady`` for a
    version in ``pending``, ``UnknownVersion`` for one in neither, and ``DeployConflict`` for
    an action that makes no sense in the current state.
    """
    model = current.model
    if isinstance(action, Candidate):
        _check_servable(model, action.version, servable, pending)
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
        _check_servable(model, current.candidate, servable, pending)
        return _new_stable(current, current.candidate)
    if isinstance(action, Rollback):
        target = action.version or current.previous_stable
        if target is None:
            raise DeployConflict(f"{model} has no previous stable version to roll back to")
        _check_servable(model, target, servable, pending)
        if target == current.stable:
            raise DeployConflict(f"{model} {target} is already stable")
        return _new_stable(current, target)
    if isinstance(action, ClearCandidate):
        return replace(current, candidate=None, canary=0.0, shadow=False)
    raise TypeError(f"{action_name(action)} moves no alias")


def loaded_after(
    model: str,
    current: Deployment | None,
    loaded: frozenset[str],
    action: Load | Unload,
    on_disk: Collection[str] | None,
    serving: Collection[str],
) -> frozenset[str]:
    """The versions of ``model`` loaded after ``action``.

    ``on_disk`` holds the versions with a model file in the repository (None: not checked);
    ``serving`` the loaded ones warm in every worker. A load of a version that is serving
    everywhere is a conflict: there is nothing to load (a load that failed somewhere is
    tried again). An unload of stable or candidate is a conflict, as is one of a version
    that is not loaded.
    """
    version = action.version
    if isinstance(action, Load):
        if on_disk is not None and version not in on_disk:
            raise UnknownVersion(f"model {model!r} has no version {version!r} in the repository")
        if version in serving:
            raise DeployConflict(f"{model} {version} is loaded and warm in every worker already")
        return loaded | {version}
    if version not in loaded:
        raise UnknownVersion(f"model {model!r} has no loaded version {version!r}")
    if current is not None and version in (current.stable, current.candidate):
        alias = "stable" if version == current.stable else "candidate"
        raise DeployConflict(f"{model} {version} is the {alias}: move the alias before unloading it")
    return loaded - {version}


def _new_stable(current: Deployment, version: str) -> Deployment:
    # The candidate survives a rollback unless it is the version that becomes stable.
    deployment = replace(current, stable=version, previous_stable=current.stable)
    if deployment.candidate == version:
        deployment = replace(deployment, candidate=None, canary=0.0, shadow=False)
    return deployment


def _check_servable(
    model: str, version: str, servable: Mapping[str, int | None], pending: Collection[str]
) -> None:
    if version in pending:
        raise VersionNotReady(f"{model} {version} is not warm in every worker yet")
    if version not in servable:
        raise UnknownVersion(f"model {model!r} serves no version {version!r}")


def decide(
    model: str,
    before: Deployment | None,
    loaded: frozenset[str],
    serving: frozenset[str],
    failed: frozenset[str],
    action: Action,
    servable: Mapping[str, int | None],
    actor: str,
    on_disk: Collection[str] | None,
    now: float,
) -> tuple[Deployment, AuditEntry]:
    """The deployment after ``action`` and its audit entry, from what a store read in its
    transaction: ``loaded`` versions of ``model``, those of them warm in every live worker
    (``serving``) and those some live worker failed to load. The caller writes both, and for
    ``load`` / ``unload`` adds or drops the version from the loaded ones."""
    if isinstance(action, ALIAS_ACTIONS):
        if before is None:
            raise UnknownModel(f"no model named {model!r}")
        if loaded:  # only what is loaded, and warm everywhere, may take an alias
            servable = {v: n for v, n in servable.items() if v in serving}
        pending = loaded - serving - failed  # failed somewhere: not servable, not pending
        after = replace(transition(before, action, servable, pending), updated_at=now)
    else:
        assert isinstance(action, Load | Unload)
        loaded_after(model, before, loaded, action, on_disk, serving)
        # A whole new model starts on the version it was loaded with.
        after = replace(before or Deployment(model, action.version), updated_at=now)
    source, target = moved(before, after, action)
    detail = {"canary": after.canary, "shadow": after.shadow} if isinstance(action, Candidate) else {}
    return after, AuditEntry(now, model, action_name(action), source, target, actor, detail)


def moved(before: Deployment | None, after: Deployment, action: Action) -> tuple[str | None, str | None]:
    """The audit log's from and to versions of ``action``."""
    if isinstance(action, Load | Unload):
        return (action.version, None) if isinstance(action, Unload) else (None, action.version)
    assert before is not None
    if isinstance(action, Promote | Rollback):
        return before.stable, after.stable
    return before.candidate, after.candidate
