"""A compiled, GIL-free predict for scikit-learn tree ensembles, equal to ``estimator.predict``.

A forest's ``predict`` spends most of its time in joblib and per-tree Python, with the GIL
held; ``compile_forest`` flattens the fitted trees into one ``_trees.CompiledForest``, whose
single C loop releases the GIL, and checks on probe rows that the answers are bit for bit
those of ``estimator.predict`` before handing the function out.

Any input the compiled loop does not take as is (not a float64 ndarray of the right width, no
rows, a value that is NaN or not finite as float32, values large enough that sklearn's
float32 finiteness sum could overflow) goes to ``estimator.predict`` itself, so sklearn's own
NaN routing, errors and warnings are kept; the one warning the compiled path drops is that an
ndarray has no feature names, which a model fitted on a DataFrame gives on every batch the
server hands it. There is no pure-Python twin: where the extension is missing or
``FASTSERVE_NO_EXTENSIONS=1``, the fallback is sklearn's predict.

The compiled copy is a snapshot: refitting the estimator afterwards is not seen.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.tree import (
    DecisionTreeClassifier,
    DecisionTreeRegressor,
    ExtraTreeClassifier,
    ExtraTreeRegressor,
)

if TYPE_CHECKING:
    from fastserve._trees import CompiledForest

try:
    from fastserve import _trees
except ImportError:  # a platform with no compiler: sklearn's predict is the fallback
    _trees = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

COMPILED: bool = _trees is not None
"""Whether the compiled extension imported (``compile_forest`` also honours the env switch)."""

# Each forest type and the exact type of its trees; a single tree is its own entry.
_FORESTS: dict[type, type] = {
    RandomForestClassifier: DecisionTreeClassifier,
    ExtraTreesClassifier: ExtraTreeClassifier,
    RandomForestRegressor: DecisionTreeRegressor,
    ExtraTreesRegressor: ExtraTreeRegressor,
}
_SINGLE_TREES = frozenset(
    {DecisionTreeClassifier, ExtraTreeClassifier, DecisionTreeRegressor, ExtraTreeRegressor}
)
_CLASSIFIERS = frozenset(
    {RandomForestClassifier, ExtraTreesClassifier, DecisionTreeClassifier, ExtraTreeClassifier}
)

# Probe rows: how many sit on thresholds (at most; fewer when the trees have fewer), and how
# many are drawn at random across each feature's threshold range.
_EDGE_ROWS = 2048
_RANDOM_ROWS = 256
_PROBE_SEED = 0


class _Unsupported(Exception):
    """Why an estimator is not compiled: logged, and ``compile_forest`` returns None."""


class CompiledPredict:
    """``estimator.predict``, answered by ``forest`` wherever it can be (same bits)."""

    __slots__ = ("estimator", "forest", "_classes")

    def __init__(self, estimator: Any, forest: CompiledForest) -> None:
        self.estimator = estimator
        self.forest = forest
        self._classes: np.ndarray[Any, Any] | None = estimator.classes_ if forest.classifier else None

    def __call__(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out = self.compiled(X)
        if out is None:
            out = self.estimator.predict(X)
        return out

    def compiled(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        """The compiled answer, or None where ``estimator.predict`` must answer."""
        # type(), not isinstance(): sklearn turns ndarray subclasses (np.matrix, masked
        # arrays) into plain arrays its own way; ">f8" is not np.float64 and goes there too.
        if not (
            type(X) is np.ndarray
            and X.dtype == np.float64
            and X.ndim == 2
            and X.shape[1] == self.forest.n_features
        ):
            return None
        out = self.forest.predict(np.ascontiguousarray(X))
        if out is None or self._classes is None:
            return out
        return self._classes.take(out, axis=0)


def compile_forest(estimator: Any) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]] | None:
    """A predict function equal to ``estimator.predict`` bit for bit, or None.

    Supported: a fitted single-output RandomForest/ExtraTrees classifier or regressor, or a
    DecisionTree/ExtraTree classifier or regressor, of exactly that type (a subclass may
    override predict). None, with the reason logged on ``fastserve.trees``, for anything else,
    when the extension is unavailable, or when the probe rows find any difference.
    """
    name = type(estimator).__name__
    if os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1" or _trees is None:
        logger.info("%s: compiled tree predict unavailable (extension not built or disabled)", name)
        return None
    try:
        forest, probe = _flatten(estimator)
    except _Unsupported as why:
        logger.info("%s: not compiled: %s", name, why)
        return None
    predict = CompiledPredict(estimator, forest)
    try:
        difference = _first_difference(estimator, predict, probe)
    except Exception as error:  # sklearn refused its own probe: we know too little to go on
        logger.warning("%s: not compiled: the probe predict raised %r", name, error)
        return None
    if difference is not None:
        logger.warning("%s: not compiled: compiled predict differs from sklearn on %s", name, difference)
        return None
    return predict


def _flatten(estimator: Any) -> tuple[CompiledForest, np.ndarray[Any, Any]]:
    """One CompiledForest holding every tree of ``estimator``, and its probe rows.

    ``_Unsupported`` if it cannot be compiled.
    """
    kind = type(estimator)
    if kind in _FORESTS:
        estimators = getattr(estimator, "estimators_", None)
        if not estimators:
            raise _Unsupported("not fitted")
        for tree_estimator in estimators:
            if type(tree_estimator) is not _FORESTS[kind]:
                raise _Unsupported(
                    f"holds a {type(tree_estimator).__name__}, not a {_FORESTS[kind].__name__}"
                )
        trees = [tree_estimator.tree_ for tree_estimator in estimators]
    elif kind in _SINGLE_TREES:
        if not hasattr(estimator, "tree_"):
            raise _Unsupported("not fitted")
        trees = [estimator.tree_]
    else:
        raise _Unsupported("not a supported tree or forest type (subclasses are not)")
    if estimator.n_outputs_ != 1:
        raise _Unsupported(f"{estimator.n_outputs_} outputs (only single-output is compiled)")
    classifier = kind in _CLASSIFIERS
    n_features = int(estimator.n_features_in_)
    n_values = int(estimator.n_classes_) if classifier else 1

    offsets = np.zeros(len(trees) + 1, dtype=np.int64)
    for t, tree in enumerate(trees):
        if tree.n_features != n_features or tree.value.shape[1:] != (1, n_values):
            raise _Unsupported(f"tree {t} does not match the estimator's features or classes")
        offsets[t + 1] = offsets[t] + tree.node_count

    def concatenated(field: str, shift: bool = False) -> np.ndarray[Any, Any]:
        parts = [getattr(tree, field) for tree in trees]
        if shift:  # tree-local child indices to global ones; the leaf marker stays -1
            parts = [np.where(part == -1, -1, part + offsets[t]) for t, part in enumerate(parts)]
        return np.concatenate(parts)

    left = concatenated("children_left", shift=True)
    feature = concatenated("feature")
    threshold = concatenated("threshold")
    try:
        forest = _trees.CompiledForest(
            left,
            concatenated("children_right", shift=True),
            feature,
            threshold,
            concatenated("missing_go_to_left"),
            concatenated("value").reshape(-1, n_values),
            offsets,
            n_features,
            classifier=classifier,
            average=kind in _FORESTS,
        )
    except ValueError as error:
        raise _Unsupported(f"unexpected tree structure: {error}") from None
    split = left != -1
    return forest, _probe_rows(n_features, feature[split], threshold[split])


def _first_difference(estimator: Any, predict: CompiledPredict, X: np.ndarray[Any, Any]) -> str | None:
    """What differs between ``predict`` and ``estimator.predict`` on the rows ``X``, or None."""
    reference = estimator
    if hasattr(estimator, "n_jobs"):
        # With several jobs, sklearn sums the trees in whatever order its threads finish, so
        # its own result varies in the last bits between calls: compare with the one-job order.
        reference = copy.copy(estimator)
        reference.n_jobs = 1
    with warnings.catch_warnings():
        # A model fitted on a DataFrame warns that an ndarray has no feature names. The
        # server only ever has ndarrays, in the order the client sent; the warning says
        # nothing about the answers, which is what is compared here.
        warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
        expected = reference.predict(X)
    got = predict.compiled(X)
    if got is None:
        return "probe rows it refused"
    return _difference(expected, got)


def _difference(expected: np.ndarray[Any, Any], got: np.ndarray[Any, Any]) -> str | None:
    """None when the arrays are the same bits (dtype, shape, values and signs of zero)."""
    if expected.dtype != got.dtype or expected.shape != got.shape:
        return f"dtype/shape {got.dtype}{got.shape} vs sklearn's {expected.dtype}{expected.shape}"
    if not np.array_equal(expected, got):
        return f"{int(np.count_nonzero(expected != got))} of {expected.size} values"
    if expected.dtype.kind == "f" and not np.array_equal(np.signbit(expected), np.signbit(got)):
        return "the sign of a zero"
    return None


def _probe_rows(
    n_features: int, split_feature: np.ndarray[Any, Any], split_threshold: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """Zeros, random rows across the threshold ranges, and rows on and beside thresholds.

    The edge rows give each feature the thresholds it is split on, as float64, as their
    float32 rounding and as that rounding's two float32 neighbours, so that both the ``<=``
    and the cast are exercised on each side of every split (every candidate appears at least
    once when there are at most ``_EDGE_ROWS`` of them).

    Thresholds that are not finite (a split that only separates NaN) or too large are left
    out: the whole probe must be a batch the compiled path takes, and whose float32 sum
    cannot overflow in sklearn's finiteness check.
    """
    rng = np.random.default_rng(_PROBE_SEED)
    largest = float(np.finfo(np.float32).max) / 4 / ((1 + _RANDOM_ROWS + _EDGE_ROWS) * n_features)
    edge: list[np.ndarray[Any, Any]] = []
    low = np.full(n_features, -1.0)
    high = np.full(n_features, 1.0)
    for j in range(n_features):
        thresholds = split_threshold[split_feature == j]
        thresholds = np.unique(thresholds[np.abs(thresholds) <= largest])
        if thresholds.size:
            low[j], high[j] = thresholds[0], thresholds[-1]
        as32 = thresholds.astype(np.float32)
        edge.append(
            np.unique(
                np.concatenate(
                    [
                        thresholds,
                        as32.astype(np.float64),
                        np.nextafter(as32, np.float32(-np.inf)).astype(np.float64),
                        np.nextafter(as32, np.float32(np.inf)).astype(np.float64),
                    ]
                )
            )
        )
    n_edge = min(max(values.size for values in edge), _EDGE_ROWS)
    # Each column in its own random order, so that rows mix thresholds of different splits.
    columns = [
        np.resize(rng.permutation(values), n_edge) if values.size else np.zeros(n_edge) for values in edge
    ]
    margin = (high - low) * 0.1 + 1.0
    random_rows = rng.uniform(low - margin, high + margin, size=(_RANDOM_ROWS, n_features))
    return np.ascontiguousarray(
        np.vstack([np.zeros((1, n_features)), random_rows, np.column_stack(columns)]), dtype=np.float64
    )
