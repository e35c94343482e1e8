"""Settings: one dataclass per concern; each field is env ``FASTSERVE_<FIELD>`` and flag ``--<field>``.

The CLI writes its flags into the environment before starting Granian, so every worker
process builds the same settings from the same variables (``fastserve.app:app`` reads
nothing else).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from fastserve.errors import ConfigError

ENV_PREFIX = "FASTSERVE_"


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen and how many worker processes."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1


@dataclass(frozen=True)
class RepositorySettings:
    """Where models come from, and what may be loaded from there."""

    # Empty: the demo repository, written on first use.
    repository: str = ""
    # Only a trusted repository may hold model.joblib (unpickling runs arbitrary code).
    trusted_repository: bool = False
    # Extra fully-qualified type names that skops may load, beyond fastserve's own list.
    trusted_types: tuple[str, ...] = ()
    # Serve scikit-learn tree ensembles through fastserve's compiled, GIL-free predict
    # (fastserve.trees), checked equal to the estimator's own predict at load.
    compile_trees: bool = True
    # Where the predict of a version the compiled predict does not take runs: "on", in its own
    # process at nice 19 (fastserve.predict_process), so that a predict holding the GIL does not
    # hold HTTP back; "off", in the worker's thread; "auto", in a process when a full batch
    # holds the thread longer than registry.PROCESS_ABOVE_MS, measured at load.
    predict_process: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})


@dataclass(frozen=True)
class BatchSettings:
    """Dynamic batching and admission for one (model, version); model.toml may override."""

    max_batch_rows: int = 64
    # A batch that is not full waits this long for the next request to join it (at most the
    # model's usual predict time); every arrival restarts the wait, up to max_batch_delay_ms
    # from the moment the model is free.
    batch_window_ms: float = 2.0
    max_batch_delay_ms: float = 10.0
    max_queue_depth: int = 1024
    queue_timeout_ms: float = 1000.0


@dataclass(frozen=True)
class LimitSettings:
    """What one request may ask for; model.toml may override."""

    max_body_bytes: int = 1024 * 1024
    max_rows_per_request: int = 1024
    body_timeout_ms: float = 10_000.0


@dataclass(frozen=True)
class DeploySettings:
    """Where the shared deployment state lives, and who may change it."""

    # Empty: a file per repository under $XDG_STATE_HOME/fastserve (see state.default_state_path).
    state_path: str = ""
    # redis://[:password@]host:port/db (rediss:// for TLS): the state in Redis instead, shared by
    # replicas on many hosts; state_path is then unused. Empty: SQLite.
    state_url: str = ""
    # Bearer token for POST /deploy; empty leaves the route off (403). Environment only: a
    # flag would show the token to every user of `ps`.
    admin_token: str = field(default="", metadata={"env_only": True})


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics at GET /metrics (off: the bench measures what they cost)."""

    metrics: bool = True


@dataclass(frozen=True)
class Settings:
    """Everything a fastserve process needs, grouped by concern."""

    server: ServerSettings = field(default_factory=ServerSettings)
    repository: RepositorySettings = field(default_factory=RepositorySettings)
    batching: BatchSettings = field(default_factory=BatchSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(**{name: _group_from_env(group, env) for name, group in _GROUPS.items()})


_GROUPS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "repository": RepositorySettings,
    "batching": BatchSettings,
    "limits": LimitSettings,
    "deploy": DeploySettings,
    "metrics": MetricsSettings,
}

_T = TypeVar("_T")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse(raw: str, kind: str, name: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if kind == "tuple[str, ...]":
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from None


def _group_from_env(cls: Any, env: Mapping[str, str]) -> Any:
    values = {
        f.name: _parse(env[env_name(f.name)], str(f.type), env_name(f.name))
        for f in fields(cls)
        if env_name(f.name) in env
    }
    for f in fields(cls):
        if f.name in values and "choices" in f.metadata:  # read like the bools: " On " is "on"
            values[f.name] = values[f.name].strip().lower()
    return validate(cls(**values))


_UPPER_BOUNDS = {"port": 65535}
# Shorter than this, a token can be guessed: refuse it rather than serve a weak /deploy.
MIN_TOKEN_LENGTH = 16


def validate(group: _T, where: str = "") -> _T:
    """Refuse settings that cannot work, naming the setting (and the file it came from)."""
    for f in fields(group):  # type: ignore[arg-type]
        value = getattr(group, f.name)
        if f.name == "admin_token" and 0 < len(value) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{env_name(f.name)} must be at least {MIN_TOKEN_LENGTH} characters")
        if f.name == "state_url" and value and not value.startswith(("redis://", "rediss://")):
            # The value is not repeated: it may hold a password.
            raise ConfigError(f"{env_name(f.name)} must be a redis:// or rediss:// URL")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{env_name(f.name)}={value!r} must be one of {', '.join(choices)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = f"{where}: {f.name}" if where else env_name(f.name)
        lowest = 0 if f.name in {"batch_window_ms", "port"} else 1
        highest = _UPPER_BOUNDS.get(f.name, math.inf)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value} must be a finite number")
        if value < lowest:
            raise ConfigError(f"{name}={value} must be at least {lowest}")
        if value > highest:
            raise ConfigError(f"{name}={value} must be at most {highest}")
    return group


def override(group: _T, table: Mapping[str, Any], where: str) -> _T:
    """``group`` with the fields of a model.toml table replaced; unknown keys are errors."""
    known = {f.name: str(f.type) for f in fields(group)}  # type: ignore[arg-type]
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        number = (int | float) if known[key] == "float" else int
        if isinstance(value, bool) or not isinstance(value, number):
            raise ConfigError(f"{where}: {key} = {value!r} is not a valid {known[key]}")
    return validate(dataclasses.replace(group, **table), where)  # type: ignore[type-var]


def add_arguments(parser: argparse.ArgumentParser, *groups: type[Any]) -> None:
    """One ``--<field>`` flag per settings field; unset flags leave the env (or default) alone."""
    for cls in groups:
        for f in fields(cls):
            if f.metadata.get("env_only"):
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type)
            helptext = f"(env {env_name(f.name)}, default {f.default!r})"
            if kind == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            elif "choices" in f.metadata:
                parser.add_argument(
                    flag, dest=f.name, default=None, choices=f.metadata["choices"], help=helptext
                )
            else:
                parser.add_argument(flag, dest=f.name, default=None, metavar=kind.upper(), help=helptext)


def export_arguments(args: argparse.Namespace, *groups: type[Any]) -> None:
    """Write the flags given on the command line into the environment, for worker processes."""
    for cls in groups:
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            os.environ[env_name(f.name)] = str(value)


def resolve_repository(settings: RepositorySettings) -> Path:
    return Path(settings.repository).expanduser() if settings.repository else default_demo_repository()


def default_demo_repository() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastserve" / "demo-models"


GROUPS = tuple(_GROUPS.values())
