"""The loaded versions of every model: validation, where each predict runs, and warm-up.

The repository (``repository.py``) says what is on disk and what may be loaded; the registry
loads it, checks that each version is a fitted estimator with ``n_features_in_`` and a
``predict``, decides where its predict runs (fastserve's compiled tree predict, a predict
process, or scikit-learn's own in the worker's thread), and warms it with one predict. A
version that fails any of it is recorded with the reason and never served.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings, override
from fastserve.predict_process import PredictProcess
from fastserve.repository import Repository, load_estimator, version_dirs, version_key
from fastserve.trees import compile_trees

logger = logging.getLogger("fastserve.registry")

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


class Registry:
    """Loads every model in the repository; read-only once loaded."""

    def __init__(
        self,
        root: Path,
        repo_settings: RepositorySettings,
        batching: BatchSettings,
        limits: LimitSettings,
    ) -> None:
        self.repository = Repository(root, repo_settings)
        self.settings = repo_settings
        self.batching = batching
        self.limits = limits
        self.models: dict[str, ModelEntry] = {}

    def load_all(self) -> dict[str, ModelEntry]:
        """Discover, load and warm every version; blocking, meant for a worker thread."""
        models = {d.name: self._load_model(d) for d in self.repository.model_dirs()}
        self.models = models
        return models

    def _load_model(self, model_dir: Path) -> ModelEntry:
        config = self.repository.model_toml(model_dir)
        where = f"{model_dir.name}/model.toml"
        entry = ModelEntry(
            name=model_dir.name,
            stable=config.get("stable"),
            batching=override(self.batching, config.get("batching", {}), where),
            limits=override(self.limits, config.get("limits", {}), where),
        )
        for version_dir in version_dirs(model_dir):
            try:
                entry.versions[version_dir.name] = self._load_version(version_dir, entry.batching)
            except Exception as exc:  # any failure makes the version unservable, not the server
                reason = self.repository.describe(exc)
                entry.failed[version_dir.name] = reason
                logger.error("%s %s not served: %s", model_dir.name, version_dir.name, reason)
        if entry.stable is None and entry.versions:
            entry.stable = max(entry.versions, key=version_key)
        return entry

    def _load_version(self, version_dir: Path, batching: BatchSettings) -> LoadedVersion:
        artifact = self.repository.artifact(version_dir)
        trusted_types = self.repository.trusted_types
        estimator = load_estimator(artifact, trusted_types)
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
            predict, path = PredictProcess(artifact, trusted_types, int(n_features)), "process"
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
