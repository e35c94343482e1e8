"""The model repository on disk: discovery, safe loading, validation and warm-up.

Layout: ``<root>/<model>/<version>/model.skops`` (or ``model.joblib`` in a trusted
repository), plus an optional ``<root>/<model>/model.toml``. Only real files under the
root's real path are opened, so a symlink cannot lead a load outside it. A version that
fails to load, lacks ``n_features_in_``, or fails its warm-up predict is recorded with the
reason and never served.
"""

from __future__ import annotations

import logging
import math
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings, override
from fastserve.errors import ConfigError
from fastserve.predict_process import PredictProcess
from fastserve.trees import compile_trees

logger = logging.getLogger("fastserve.registry")

# skops refuses any type outside its defaults and this list: the tree structures of
# scikit-learn's own ensembles, which its defaults leave out only because they are
# compiled types. Anything else must be named in the server's configuration.
TRUSTED_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)

# Under predict_process="auto", a version whose predict of a full batch holds the worker's
# thread longer than this runs in a predict process instead. In the thread it would hold the
# GIL about that long each batch, and every request arriving meanwhile, even one refused with
# a 429, would wait for it: RF-300 on scikit-learn's predict holds it 23.5 ms a batch of 64.
# Up to 2 ms, a refusal's wait stays within the 5 ms time-to-429 target beside HTTP's own
# (p99 about 2 ms), and a process would cost a copy of the model and a pipe's round trip
# (about 0.1 ms a batch) for little. The small models stay in the thread with a margin: a
# LogisticRegression holds it 0.2 ms, a 10-tree forest or a KNN classifier about 1 ms, which
# is mostly scikit-learn's fixed cost per call.
PROCESS_ABOVE_MS = 2.0

# What the batcher calls on a batch of rows: one prediction per row.
Predict = Callable[[np.ndarray[Any, Any]], Any]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class LoadedVersion:
    """A version that loaded, validated and warmed up: safe to serve."""

    version: str
    estimator: Any
    n_features: int
    artifact: str  # file name within the version directory, for /status
    # What the batcher calls: the estimator's predict, its compiled twin, or a PredictProcess.
    predict: Predict
    predict_path: str  # which, for /status: "compiled", "scikit-learn" or "process"

    def close(self) -> None:
        """Stop the version's predict process, if it has one."""
        if isinstance(self.predict, PredictProcess):
            self.predict.close()


@dataclass
class ModelEntry:
    """One model directory: its servable versions, failures, and its settings."""

    name: str
    # The stable version the repository asks for (model.toml, else the latest that loaded):
    # it seeds the deployment state the first time the model is seen; the state rules after.
    stable: str | None
    batching: BatchSettings
    limits: LimitSettings
    versions: dict[str, LoadedVersion] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # version -> reason

    @property
    def servable(self) -> bool:
        return self.stable is not None and self.stable in self.versions


def version_key(version: str) -> tuple[Any, ...]:
    """Natural order: v2 < v10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


class Registry:
    """Loads every model in the repository; read-only once loaded."""

    def __init__(
        self,
        root: Path,
        repo_settings: RepositorySettings,
        batching: BatchSettings,
        limits: LimitSettings,
    ) -> None:
        self.root = root.resolve()
        self.settings = repo_settings
        self.batching = batching
        self.limits = limits
        self.models: dict[str, ModelEntry] = {}
        self.trusted_types = TRUSTED_TYPES + tuple(repo_settings.trusted_types)

    def load_all(self) -> dict[str, ModelEntry]:
        """Discover, load and warm every version; blocking, meant for a worker thread."""
        models = {model_dir.name: self._load_model(model_dir) for model_dir in self._model_dirs()}
        self.models = models
        return models

    def discover(self) -> dict[str, tuple[list[str], str | None]]:
        """Each model's versions that have an artifact, and the stable the repository asks for,
        without loading anything (for the CLI, which acts on the deployment state offline)."""
        found = {}
        for model_dir in self._model_dirs():
            stable = _read_model_toml(model_dir, self.root).get("stable")
            versions = [d.name for d in _version_dirs(model_dir) if self._has_artifact(d)]
            if stable is None and versions:
                stable = versions[-1]
            found[model_dir.name] = (versions, stable)
        return found

    def _model_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise ConfigError(f"FASTSERVE_REPOSITORY: {self.root.name!r} is not a directory")
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and _NAME.match(d.name)]

    def _has_artifact(self, version_dir: Path) -> bool:
        return any(path.exists() for path in self._artifact_paths(version_dir))

    def _artifact_paths(self, version_dir: Path) -> list[Path]:
        """The files a version may be loaded from, in order of preference."""
        paths = [version_dir / "model.skops"]
        if self.settings.trusted_repository:
            paths.append(version_dir / "model.joblib")
        return paths

    def _load_model(self, model_dir: Path) -> ModelEntry:
        config = _read_model_toml(model_dir, self.root)
        where = f"{model_dir.name}/model.toml"
        entry = ModelEntry(
            name=model_dir.name,
            stable=config.get("stable"),
            batching=override(self.batching, config.get("batching", {}), where),
            limits=override(self.limits, config.get("limits", {}), where),
        )
        for version_dir in _version_dirs(model_dir):
            try:
                entry.versions[version_dir.name] = self._load_version(version_dir, entry.batching)
            except Exception as exc:  # any failure makes the version unservable, not the server
                reason = self._describe(exc)
                entry.failed[version_dir.name] = reason
                logger.error("%s %s not served: %s", model_dir.name, version_dir.name, reason)
        if entry.stable is None and entry.versions:
            entry.stable = max(entry.versions, key=version_key)
        return entry

    def _load_version(self, version_dir: Path, batching: BatchSettings) -> LoadedVersion:
        artifact = self._artifact(version_dir)
        estimator = load_estimator(artifact, self.trusted_types)
        n_features = getattr(estimator, "n_features_in_", None)
        if not isinstance(n_features, int | np.integer) or n_features < 1:
            raise ValueError("the estimator has no n_features_in_; fit it before saving")
        if not callable(getattr(estimator, "predict", None)):
            raise ValueError("the estimator has no predict method")
        predict: Predict = estimator.predict
        path = "scikit-learn"
        compiled = compile_trees(estimator) if self.settings.compile_trees else None
        if compiled is not None:
            predict, path = compiled, "compiled"
        elif self._in_a_process(version_dir, predict, int(n_features), batching.max_batch_rows):
            predict, path = PredictProcess(artifact, self.trusted_types, int(n_features)), "process"
        try:
            _warm_up(predict, int(n_features))
        except BaseException:
            if isinstance(predict, PredictProcess):
                predict.close()
            raise
        return LoadedVersion(version_dir.name, estimator, int(n_features), artifact.name, predict, path)

    def _in_a_process(self, version_dir: Path, predict: Predict, n_features: int, batch_rows: int) -> bool:
        """Whether the version's predict goes to a PredictProcess (settings.predict_process)."""
        if self.settings.predict_process != "auto":
            return self.settings.predict_process == "on"
        held_ms = _thread_ms(predict, n_features, batch_rows)
        in_a_process = held_ms > PROCESS_ABOVE_MS
        logger.info(
            "%s %s: a batch of %d rows holds the thread %.2f ms: predict in %s",
            version_dir.parent.name,
            version_dir.name,
            batch_rows,
            held_ms,
            "a process" if in_a_process else "the worker's thread",
        )
        return in_a_process

    def _describe(self, exc: BaseException) -> str:
        # Reasons go to /status: the exception's type and message, never a traceback or a path.
        return f"{type(exc).__name__}: {exc}".replace(str(self.root), "<repository>")

    def _artifact(self, version_dir: Path) -> Path:
        for path in self._artifact_paths(version_dir):
            if path.exists() or path.is_symlink():
                real = path.resolve()
                if not real.is_relative_to(self.root) or not real.is_file():
                    raise PermissionError(f"{path.name} resolves outside the repository")
                return real
        if (version_dir / "model.joblib").exists():
            raise PermissionError(
                "model.joblib is only loaded from a trusted repository (FASTSERVE_TRUSTED_REPOSITORY=1)"
            )
        raise FileNotFoundError("no model.skops in the version directory")


def load_estimator(artifact: Path, trusted_types: Sequence[str]) -> Any:
    """The estimator in ``artifact``: skops with ``trusted_types``, or joblib, whose file only a
    trusted repository may hold (``Registry._artifact`` decides which file is loaded)."""
    if artifact.suffix == ".skops":
        import skops.io as sio

        return sio.load(artifact, trusted=list(trusted_types))
    import joblib

    return joblib.load(artifact)


def _version_dirs(model_dir: Path) -> list[Path]:
    """A model's version directories, in natural order (oldest first)."""
    found = [d for d in model_dir.iterdir() if d.is_dir() and _NAME.match(d.name)]
    return sorted(found, key=lambda d: version_key(d.name))


def _read_model_toml(model_dir: Path, root: Path) -> dict[str, Any]:
    path = model_dir / "model.toml"
    where = f"{model_dir.name}/model.toml"
    if not path.exists():
        return {}
    if not path.resolve().is_relative_to(root) or not path.is_file():
        raise ConfigError(f"{where} resolves outside the repository")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unknown = set(config) - {"stable", "batching", "limits"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if not isinstance(config.get("stable", ""), str):
        raise ConfigError(f"{where}: stable must be a version name in quotes")
    for table in ("batching", "limits"):
        if not isinstance(config.get(table, {}), dict):
            raise ConfigError(f"{where}: {table} must be a table ([{table}])")
    return config


def _thread_ms(predict: Predict, n_features: int, batch_rows: int) -> float:
    """The calling thread's CPU time in one predict of a full batch of zeros, in ms: the least
    of three calls, so that one-off first-call costs do not count. A predict holds the GIL for
    at most this long; one that sleeps or waits on other threads costs the thread little."""
    rows = np.zeros((batch_rows, n_features))
    least = math.inf
    for _ in range(3):
        start = time.thread_time_ns()
        predict(rows)
        least = min(least, time.thread_time_ns() - start)
    return least / 1e6


def _warm_up(predict: Predict, n_features: int) -> None:
    """One predict on zeros: a model that cannot predict is found now, not on a user's request."""
    result = np.asarray(predict(np.zeros((1, n_features))))
    if result.shape[:1] != (1,):
        raise ValueError(f"warm-up predict returned shape {result.shape} for one row")
