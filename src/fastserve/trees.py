"""A compiled, GIL-free predict for scikit-learn tree ensembles, equal to ``estimator.predict``,
and the classifier's other outputs from the same walk of the trees.

A forest's ``predict`` spends most of its time in joblib and per-tree Python, with the GIL
held, and a HistGradientBoosting model's in one Python call per tree (a thousand for 100
iterations of 10 classes). ``compile_trees`` flattens the fitted trees into one
``_trees.CompiledForest`` or ``_trees.CompiledBoosting``, whose single C loop releases the
GIL, and checks on probe rows that the answers are bit for bit those of
``estimator.predict`` before handing the function out.

A classifier's ``predict`` is itself derived from scores: a forest's from the averaged leaf
rows, which are its ``predict_proba``, a HistGradientBoosting model's from the raw scores,
which are its ``decision_function`` and, through the model's own loss, its
``predict_proba``. So ``CompiledTrees.compute`` gives any of a classifier's
``output_names`` from one walk, each checked bit for bit on the probe rows like predict.

Any input the compiled loop does not take as is (not a float64 ndarray of the right width, no
rows; for a forest also a value that is NaN or not finite as float32, or values large enough
that sklearn's float32 finiteness sum could overflow) goes to ``estimator.predict`` itself,
so sklearn's own NaN routing, errors and warnings are kept. HistGradientBoosting predicts on
float64 and takes NaN and infinity, so its compiled walk routes them as sklearn does. The one
warning the compiled path drops is that an ndarray has no feature names, which a model
fitted on a DataFrame gives on every batch the server hands it. There is no pure-Python
twin: where the extension is missing or ``FASTSERVE_NO_EXTENSIONS=1``, the fallback is
sklearn's predict.

The compiled copy is a snapshot: refitting the estimator afterwards is not seen.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
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
    from fastserve._trees import CompiledBoosting, CompiledForest

try:
    from fastserve import _trees
except ImportError:  # a platform with no compiler: sklearn's predict is the fallback
    _trees = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

COMPILED: bool = _trees is not None
"""Whether the compiled extension imported (``compile_trees`` also honours the env switch)."""

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
_BOOSTING = frozenset({HistGradientBoostingClassifier, HistGradientBoostingRegressor})

# Probe rows: how many sit on thresholds (at most; fewer when the trees have fewer), and how
# many are drawn at random across each feature's threshold range.
_EDGE_ROWS = 2048
_RANDOM_ROWS = 256
_PROBE_SEED = 0

PREDICT, PREDICT_PROBA, PREDICT_LOG_PROBA, DECISION_FUNCTION = (
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
)
# What a classifier's walk gives besides predict, where the estimator has the method.
_PREDICT_ONLY = (PREDICT,)
_FOREST_SCORES = (PREDICT_PROBA, PREDICT_LOG_PROBA)
_BOOSTING_SCORES = (PREDICT_PROBA, DECISION_FUNCTION)


class _Unsupported(Exception):
    """Why an estimator is not compiled: logged, and ``compile_trees`` returns None."""


class CompiledTrees:
    """``estimator.predict``, and the other outputs in ``output_names``, answered by a compiled
    kernel wherever it can be (same bits).

    ``output_names``: always ``"predict"``; for a classifier also ``"predict_proba"``, and
    ``"predict_log_proba"`` (forests and single trees) or ``"decision_function"``
    (HistGradientBoosting) where the estimator has the method.
    """

    __slots__ = ("estimator", "output_names", "_classes", "_n_features")

    def __init__(self, estimator: Any, n_features: int, classifier: bool, scores: tuple[str, ...]) -> None:
        self.estimator = estimator
        self._n_features = n_features
        self._classes: np.ndarray[Any, Any] | None = estimator.classes_ if classifier else None
        names = scores if classifier else ()
        self.output_names: tuple[str, ...] = (PREDICT, *(name for name in names if hasattr(estimator, name)))

    def __call__(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out = self.compiled(X)
        if out is None:
            out = self.estimator.predict(X)
        return out

    def compute(self, X: np.ndarray[Any, Any], names: Collection[str]) -> dict[str, np.ndarray[Any, Any]]:
        """``{name: getattr(estimator, name)(X)}`` for each of ``names`` (duplicates once, in
        the order asked), bit for bit, from one walk of the trees.

        A batch the compiled loop does not take (see the module docstring) is answered by the
        estimator's own methods, name by name, with their errors and warnings. ``KeyError``
        for a name not in ``output_names``.
        """
        wanted = self._wanted(names)
        if not wanted:
            return {}
        if wanted == _PREDICT_ONLY:  # the batches of most requests: predict's own walk, no more
            return {PREDICT: self(X)}
        out = self.compiled_outputs(X, wanted)
        if out is None:
            out = {name: getattr(self.estimator, name)(X) for name in wanted}
        return out

    def compiled(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        """The compiled answer, or None where ``estimator.predict`` must answer."""
        if not self._takes(X):
            return None
        return self._predict(np.ascontiguousarray(X))

    def compiled_outputs(
        self, X: np.ndarray[Any, Any], names: Collection[str]
    ) -> dict[str, np.ndarray[Any, Any]] | None:
        """The compiled answers for ``names`` (all in ``output_names``), or None where the
        estimator's methods must answer."""
        if not self._takes(X):
            return None
        return self._outputs(np.ascontiguousarray(X), names)

    def _wanted(self, names: Collection[str]) -> tuple[str, ...]:
        if isinstance(names, str):  # a str is a Collection[str] of its letters
            raise TypeError(f"names must be a collection of output names, not the string {names!r}")
        wanted = tuple(dict.fromkeys(names))
        for name in wanted:
            if name not in self.output_names:
                raise KeyError(f"{name!r} is not computed here; it computes {', '.join(self.output_names)}")
        return wanted

    def _takes(self, X: np.ndarray[Any, Any]) -> bool:
        # type(), not isinstance(): sklearn turns ndarray subclasses (np.matrix, masked
        # arrays) into plain arrays its own way; ">f8" is not np.float64 and goes there too.
        return (
            type(X) is np.ndarray and X.dtype == np.float64 and X.ndim == 2 and X.shape[1] == self._n_features
        )

    def _predict(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        raise NotImplementedError

    def _outputs(
        self, X: np.ndarray[Any, Any], names: Collection[str]
    ) -> dict[str, np.ndarray[Any, Any]] | None:
        raise NotImplementedError


class CompiledPredict(CompiledTrees):
    """A forest's or a single tree's outputs, by ``forest``.

    For a classifier the walk's averaged leaf rows are ``predict_proba`` (``_trees.pyx`` says
    why they are its bits); ``predict`` is ``classes_.take`` of their argmax and
    ``predict_log_proba`` is ``np.log`` of them, as sklearn's forests and trees write it.
    """

    __slots__ = ("forest",)

    def __init__(self, estimator: Any, forest: CompiledForest) -> None:
        super().__init__(estimator, forest.n_features, forest.classifier, _FOREST_SCORES)
        self.forest = forest

    def _predict(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        out = self.forest.predict(X)
        if out is None or self._classes is None:
            return out
        return self._classes.take(out, axis=0)

    def _outputs(
        self, X: np.ndarray[Any, Any], names: Collection[str]
    ) -> dict[str, np.ndarray[Any, Any]] | None:
        if self._classes is None:  # a regressor's only output is predict
            predicted = self._predict(X)
            return None if predicted is None else {PREDICT: predicted}
        walked = self.forest.predict_with_proba(X)
        if walked is None:
            return None
        index, proba = walked
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name in names:
            if name == PREDICT:
                out[name] = self._classes.take(index, axis=0)
            elif name == PREDICT_PROBA:
                out[name] = proba
            else:  # PREDICT_LOG_PROBA; a zero probability warns "divide by zero", as in sklearn
                out[name] = np.log(proba)
        return out


class CompiledBoostingPredict(CompiledTrees):
    """A HistGradientBoosting model's outputs: the raw scores by ``booster`` (in sklearn's
    Fortran order), then the last step of each of the estimator's own methods on them, in
    numpy as sklearn writes it: ``predict``'s labels, ``decision_function``'s scores, and
    ``predict_proba`` by the model's own loss (``_loss.predict_proba``)."""

    __slots__ = ("booster", "_inverse_link", "_loss")

    def __init__(self, estimator: Any, booster: CompiledBoosting) -> None:
        classifier = type(estimator) is HistGradientBoostingClassifier
        super().__init__(estimator, booster.n_features, classifier, _BOOSTING_SCORES)
        self.booster = booster
        self._inverse_link = None if classifier else estimator._loss.link.inverse
        self._loss = estimator._loss

    def _predict(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        raw = self.booster.predict(X)
        if raw is None:
            return None
        return self._labels(raw)

    def _labels(self, raw: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self._classes is None:
            assert self._inverse_link is not None
            return self._inverse_link(raw.ravel())  # type: ignore[no-any-return]
        if raw.shape[1] == 1:  # binary: "> 0", so that a score of 0 is class 0, as argmax would
            encoded = (raw.ravel() > 0).astype(int)
        else:
            encoded = np.argmax(raw, axis=1)
        labels: np.ndarray[Any, Any] = self._classes[encoded]
        return labels

    def _outputs(
        self, X: np.ndarray[Any, Any], names: Collection[str]
    ) -> dict[str, np.ndarray[Any, Any]] | None:
        raw = self.booster.predict(X)
        if raw is None:
            return None
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name in names:
            if name == PREDICT:
                out[name] = self._labels(raw)
            elif name == PREDICT_PROBA:  # reads raw (softmax works on a copy)
                out[name] = self._loss.predict_proba(raw)
            else:  # DECISION_FUNCTION
                out[name] = raw.ravel() if raw.shape[1] == 1 else raw
        return out


def compile_trees(estimator: Any) -> CompiledTrees | None:
    """A predict function equal to ``estimator.predict`` bit for bit, or None.

    Supported: a fitted single-output RandomForest/ExtraTrees classifier or regressor, a
    DecisionTree/ExtraTree classifier or regressor, or a HistGradientBoosting classifier or
    regressor without categorical features, of exactly that type (a subclass may override
    predict). None, with the reason logged on ``fastserve.trees``, for anything else, when
    the extension is unavailable, or when the probe rows find any difference in any output:
    the function's ``output_names`` and ``compute`` give a classifier's other outputs from the
    same walk, and every one is checked like predict.
    """
    name = type(estimator).__name__
    if os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1" or _trees is None:
        logger.info("%s: compiled tree predict unavailable (extension not built or disabled)", name)
        return None
    predict: CompiledTrees
    try:
        if type(estimator) in _BOOSTING:
            booster, probe = _flatten_boosting(estimator)
            predict = CompiledBoostingPredict(estimator, booster)
        else:
            forest, probe = _flatten(estimator)
            predict = CompiledPredict(estimator, forest)
    except _Unsupported as why:
        logger.info("%s: not compiled: %s", name, why)
        return None
    try:
        difference = _first_difference(estimator, predict, probe)
    except Exception as error:  # sklearn refused its own probe: we know too little to go on
        logger.warning("%s: not compiled: the probe predict raised %r", name, error)
        return None
    if difference is not None:
        logger.warning("%s: not compiled: compiled %s differs from sklearn on %s", name, *difference)
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


def _flatten_boosting(estimator: Any) -> tuple[CompiledBoosting, np.ndarray[Any, Any]]:
    """One CompiledBoosting holding every tree of a HistGradientBoosting model, in the order
    ``_predict_iterations`` adds them, and its probe rows. ``_Unsupported`` if it cannot be
    compiled."""
    predictors = getattr(estimator, "_predictors", None)
    if not predictors:
        raise _Unsupported("not fitted")
    categorical = getattr(estimator, "is_categorical_", None)
    if estimator._preprocessor is not None or (categorical is not None and categorical.any()):
        raise _Unsupported("categorical features (only numerical splits are compiled)")
    n_features = int(estimator.n_features_in_)
    n_outputs = int(estimator.n_trees_per_iteration_)
    baseline = np.asarray(estimator._baseline_prediction, dtype=np.float64).reshape(-1)
    if baseline.shape != (n_outputs,) or any(len(trees) != n_outputs for trees in predictors):
        raise _Unsupported("trees per iteration do not match the model's outputs")
    tables = [predictor.nodes for trees in predictors for predictor in trees]
    sizes = np.array([len(table) for table in tables], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    nodes = np.concatenate(tables)
    if nodes["is_categorical"].any():
        raise _Unsupported("categorical splits (only numerical splits are compiled)")
    leaf = nodes["is_leaf"].astype(bool)
    shift = np.repeat(offsets[:-1], sizes)  # tree-local child indices to global ones
    left = np.where(leaf, -1, nodes["left"].astype(np.int64) + shift)
    right = np.where(leaf, -1, nodes["right"].astype(np.int64) + shift)
    feature, threshold = nodes["feature_idx"], nodes["num_threshold"]
    try:
        booster = _trees.CompiledBoosting(
            left,
            right,
            feature,
            threshold,
            nodes["missing_go_to_left"],
            nodes["value"],
            offsets,
            np.tile(np.arange(n_outputs), len(predictors)),
            baseline,
            n_features,
        )
    except ValueError as error:
        raise _Unsupported(f"unexpected tree structure: {error}") from None
    probe = _probe_rows(n_features, feature[~leaf], threshold[~leaf])
    return booster, np.vstack([probe, _with_missing_values(probe)])


def _with_missing_values(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A copy of ``rows`` with a fifth of its values NaN and a few infinite: the values a
    HistGradientBoosting model routes itself (``missing_go_to_left``, and ``<=`` on infinity)."""
    rng = np.random.default_rng(_PROBE_SEED)
    out = rows.copy()
    out[rng.random(out.shape) < 0.2] = np.nan
    out[rng.random(out.shape) < 0.01] = np.inf
    out[rng.random(out.shape) < 0.01] = -np.inf
    return out


def _first_difference(
    estimator: Any, predict: CompiledTrees, X: np.ndarray[Any, Any]
) -> tuple[str, str] | None:
    """The first output of ``predict.output_names`` that differs from the estimator's own method
    on the rows ``X``, and what differs, or None."""
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
        # A zero probability's log is -inf, with numpy's "divide by zero" warning on both sides.
        with np.errstate(divide="ignore"):
            expected = {name: getattr(reference, name)(X) for name in predict.output_names}
            got = predict.compiled_outputs(X, predict.output_names)
    if got is None:
        return "outputs", "probe rows it refused"
    for name in predict.output_names:
        difference = _difference(expected[name], got[name])
        if difference is not None:
            return name, difference
    return None


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
