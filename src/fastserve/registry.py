"""The loaded versions of every model: validation, where each predict runs, and warm-up.

The repository (``repository.py``) says what is on disk and what may be loaded; the registry
loads it, checks that each version is a fitted estimator with a ``predict``, settles its
input schema (``schema.py``), finds its outputs (``predict``, ``predict_proba``, ...),
decides where they are computed (fastserve's compiled tree predict, a predict process, or
scikit-learn's own methods in the worker's thread), and warms every output once: on zeros
for a positional version, on its example or a row built from its schema for a named one. A
version that fails any of it is recorded with the reason and never served.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastserve.codec import TabularRequest
from fastserve.config import BatchSettings, LimitSettings, RepositorySettings, override
from fastserve.inputs import Inputs
from fastserve.outputs import Compute, Outputs, WrongShape, by_methods, estimator_outputs
from fastserve.predict_process import PredictProcess
from fastserve.repository import Repository, load_estimator, version_dirs, version_key
from fastserve.schema import InputSchema, infer_schema, read_example, warm_up_rows
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
    # The estimator's predict, its compiled twin, or a PredictProcess.
    predict: Predict
    predict_path: str  # which, for /status: "compiled", "scikit-learn" or "process"
    schema: InputSchema = field(default_factory=lambda: InputSchema(1))
    inputs: Inputs | None = None  # how requests become rows
    outputs: Outputs | None = None  # what the batcher calls, once per batch
    probe: Any = None  # the warm-up input, which the model predicted at load
    classes: list[Any] | None = None  # a classifier's classes_, in its columns' order
    rss_bytes: int | None = None  # what loading it added to the process's resident memory

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
    declared: dict[str, Any] = field(default_factory=dict)  # model.toml's [input] table

    @property
    def servable(self) -> bool:
        return self.stable is not None and self.stable in self.versions


class Registry:
    """Loads the models of the repository: all of them, the versions the state asks for, or one
    version at a time while serving (``load_version``)."""

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
        return self.load(None)

    def load(self, wanted: Mapping[str, Collection[str]] | None) -> dict[str, ModelEntry]:
        """Load and warm the ``wanted`` versions of each model (None: every version on disk); a
        model left out is not loaded at all. Blocking, meant for a worker thread."""
        models = {}
        for model_dir in self.repository.model_dirs():
            if wanted is not None and model_dir.name not in wanted:
                continue
            entry = self.entry(model_dir.name)
            for version_dir in version_dirs(model_dir):
                if wanted is None or version_dir.name in wanted[model_dir.name]:
                    self._load_into(entry, version_dir)
            if entry.stable is None and entry.versions:
                entry.stable = max(entry.versions, key=version_key)
            models[entry.name] = entry
        self.models = models
        return models

    def entry(self, model: str) -> ModelEntry:
        """A model's entry with its settings from ``model.toml``, and no version loaded yet."""
        model_dir = self.repository.model_dir(model)
        config = self.repository.model_toml(model_dir)
        where = f"{model}/model.toml"
        return ModelEntry(
            name=model,
            stable=config.get("stable"),
            batching=override(self.batching, config.get("batching", {}), where),
            limits=override(self.limits, config.get("limits", {}), where),
            declared=config.get("input", {}),
        )

    def load_version(self, entry: ModelEntry, version: str) -> LoadedVersion:
        """Load, check and warm one version of ``entry``'s model, under the same rules as at start;
        any failure raises. Blocking, meant for a worker thread."""
        return self._measured(self.repository.version_dir(entry.name, version), entry)

    def _measured(self, version_dir: Path, entry: ModelEntry) -> LoadedVersion:
        before = resident_bytes()
        loaded = self._load_version(version_dir, entry.batching, entry.declared)
        loaded.rss_bytes = max(0, resident_bytes() - before)
        return loaded

    def _load_into(self, entry: ModelEntry, version_dir: Path) -> None:
        try:
            entry.versions[version_dir.name] = self._measured(version_dir, entry)
        except Exception as exc:  # any failure makes the version unservable, not the server
            reason = self.repository.describe(exc)
            entry.failed[version_dir.name] = reason
            logger.error("%s %s not served: %s", entry.name, version_dir.name, reason)

    def _load_version(
        self, version_dir: Path, batching: BatchSettings, declared: dict[str, Any]
    ) -> LoadedVersion:
        artifact = self.repository.artifact(version_dir)
        trusted_types = self.repository.trusted_types
        estimator = load_estimator(artifact, trusted_types)
        where = f"{version_dir.parent.name}/model.toml"
        example = read_example(version_dir, self.repository.root)
        schema = infer_schema(estimator, declared, example, where)
        if not callable(getattr(estimator, "predict", None)):
            raise ValueError("the estimator has no predict method")
        if schema.needs_frame:
            _require_pandas()
        n_features = schema.n_features
        names = estimator_outputs(estimator)
        compute = by_methods(estimator)
        predict: Predict = estimator.predict
        path = "scikit-learn"
        if schema.named and not schema.needs_frame:
            _forget_names(estimator)
        # The compiled predict and the predict process take float64 rows, not a DataFrame.
        compiling = self.settings.compile_trees and not schema.needs_frame
        compiled = compile_trees(estimator) if compiling else None
        if compiled is not None:
            predict, path = compiled, "compiled"
            compute = _compiled_first(compiled, compute)
        elif not schema.needs_frame and self._in_a_process(version_dir, predict, n_features, batching):
            predict, path = PredictProcess(artifact, trusted_types, n_features), "process"
            compute = predict.compute
        fitted_classes = getattr(estimator, "classes_", None)
        classes = fitted_classes.tolist() if fitted_classes is not None else None
        loaded = LoadedVersion(
            version_dir.name,
            estimator,
            n_features,
            artifact.name,
            predict,
            path,
            schema,
            inputs=Inputs(schema),
            outputs=Outputs(names, compute),
            classes=classes,
        )
        try:
            loaded.probe = _warm_up(loaded, warm_up_rows(schema, example))
        except BaseException:
            loaded.close()
            raise
        return loaded

    def _in_a_process(
        self, version_dir: Path, predict: Predict, n_features: int, batching: BatchSettings
    ) -> bool:
        """Whether the version's predict goes to a PredictProcess (settings.predict_process)."""
        if self.settings.predict_process != "auto":
            return self.settings.predict_process == "on"
        batch_rows = batching.max_batch_rows
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


def _warm_up(loaded: LoadedVersion, rows: list[dict[str, Any]] | None) -> Any:
    """Every output once, on zeros or on the named rows: a model that cannot answer is found now,
    not on a user's request. The input it predicted, for the batcher's probe."""
    assert loaded.inputs is not None and loaded.outputs is not None
    schema = loaded.schema
    if rows is None:
        X: Any = np.zeros((1, schema.n_features))
    else:
        buffered, side = loaded.inputs.convert(TabularRequest(instances=list(rows)))
        X = np.array(buffered, dtype=np.float64)
        if schema.needs_frame:
            X = loaded.inputs.frame(X, [side] if side is not None else [])
    outputs = loaded.outputs
    try:
        outputs(X, outputs.names)
    except WrongShape as exc:
        raise ValueError(f"warm-up {exc}") from None
    return X


def _compiled_first(compiled: Any, fallback: Compute) -> Compute:
    """The compiled outputs from one walk of the trees; any other by the estimator's methods."""
    ours = frozenset(compiled.output_names)

    def compute(X: Any, names: Collection[str]) -> dict[str, np.ndarray[Any, Any]]:
        out = compiled.compute(X, [name for name in names if name in ours])
        rest = [name for name in names if name not in ours]
        if rest:
            out.update(fallback(X, rest))
        return out  # type: ignore[no-any-return]

    return compute


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * _PAGE_BYTES


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _forget_names(estimator: Any) -> None:
    """Fitted on a DataFrame of numbers, the model is fed float64 rows in its fitted column order
    (the names were mapped to positions when it loaded); without its ``feature_names_in_``,
    scikit-learn stops warning on every batch that the rows have no names."""
    steps = getattr(estimator, "steps", None)
    first = steps[0][1] if isinstance(steps, list) and steps else estimator
    for fitted in {id(estimator): estimator, id(first): first}.values():
        if "feature_names_in_" in getattr(fitted, "__dict__", {}):
            del fitted.feature_names_in_


def _require_pandas() -> None:
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise ValueError(
            "this version takes strings or categories, so each batch is a pandas DataFrame: "
            "pip install 'fastserve[pandas]'"
        ) from None
