"""trees: the compiled tree-ensemble predict gives the same bits as ``estimator.predict``.

Every comparison is on rows the compile-time probe never saw (fresh seeded draws, and rows on
and beside the fitted thresholds built here independently), and is strict: dtype, shape,
values and the sign of zeros.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression
from sklearn.tree import (
    DecisionTreeClassifier,
    DecisionTreeRegressor,
    ExtraTreeClassifier,
    ExtraTreeRegressor,
)

from fastserve import trees
from fastserve.trees import CompiledBoostingPredict, CompiledPredict, CompiledTrees, compile_trees

NO_EXTENSIONS = os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1"

try:
    from fastserve import _trees
except ImportError:  # only tolerated where the suite was asked to run without extensions
    if not NO_EXTENSIONS:
        raise
    _trees = None  # type: ignore[assignment]

# Without the extension compile_trees always answers None: there is nothing else to test.
pytestmark = pytest.mark.skipif(NO_EXTENSIONS, reason="FASTSERVE_NO_EXTENSIONS=1")


def factory(cls: type, **defaults: Any) -> Callable[..., Any]:
    """``cls`` with ``defaults``, which a test's own options override."""
    return lambda **options: cls(**(defaults | options))


CLASSIFIERS = {
    "rf": factory(RandomForestClassifier, n_estimators=25, random_state=0),
    "et": factory(ExtraTreesClassifier, n_estimators=25, random_state=0),
    "dt": factory(DecisionTreeClassifier, random_state=0),
    "xt": factory(ExtraTreeClassifier, random_state=0),
}
REGRESSORS = {
    "rf": factory(RandomForestRegressor, n_estimators=25, random_state=0),
    "et": factory(ExtraTreesRegressor, n_estimators=25, random_state=0),
    "dt": factory(DecisionTreeRegressor, random_state=0),
    "xt": factory(ExtraTreeRegressor, random_state=0),
}
FORESTS = ("rf", "et")

# -- helpers ---------------------------------------------------------------------------------


def assert_same(expected: np.ndarray[Any, Any], got: np.ndarray[Any, Any]) -> None:
    """The same bits: dtype, shape, values, and for floats the sign of every zero."""
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected, strict=True)
    if expected.dtype.kind == "f":
        np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))


def features(rng: np.random.Generator, n_rows: int, n_features: int) -> np.ndarray[Any, Any]:
    """Continuous columns, and columns of small integers (whose thresholds fall at .5)."""
    x = rng.normal(size=(n_rows, n_features)) * rng.uniform(0.01, 1000.0, size=n_features)
    x[:, ::2] = rng.integers(0, 6, size=(n_rows, (n_features + 1) // 2))
    return x


def split_thresholds(estimator: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(feature, threshold) of every split in the estimator, read through ``tree_`` directly."""
    tree_estimators = getattr(estimator, "estimators_", [estimator])
    pairs = [(e.tree_.feature, e.tree_.threshold, e.tree_.children_left != -1) for e in tree_estimators]
    return (
        np.concatenate([feature[split] for feature, _, split in pairs]),
        np.concatenate([threshold[split] for _, threshold, split in pairs]),
    )


def edge_rows(estimator: Any, rng: np.random.Generator, n_rows: int) -> np.ndarray[Any, Any]:
    """Rows whose every split feature sits on a threshold, its float32 rounding or a neighbour."""
    n_features = estimator.n_features_in_
    feature, threshold = split_thresholds(estimator)
    x = rng.normal(size=(n_rows, n_features))
    for j in range(n_features):
        t = threshold[feature == j]
        t = t[np.isfinite(t)]  # a split that only separates NaN has threshold inf
        if t.size == 0:
            continue
        t32 = t.astype(np.float32)
        candidates = np.concatenate(
            [
                t,
                t32.astype(np.float64),
                np.nextafter(t32, np.float32(-np.inf)).astype(np.float64),
                np.nextafter(t32, np.float32(np.inf)).astype(np.float64),
                np.nextafter(t, -np.inf),
                np.nextafter(t, np.inf),
            ]
        )
        x[:, j] = rng.choice(candidates, size=n_rows)
    return x


def fresh_rows(estimator: Any, seed: int) -> np.ndarray[Any, Any]:
    """Rows for a comparison: random ones, edge ones, zeros, and large finite magnitudes."""
    rng = np.random.default_rng(seed)
    n_features = estimator.n_features_in_
    big = np.zeros((2, n_features))  # large, but with no float32 sum that could overflow
    big[0, 0], big[1, -1] = 6.0e37, -6.0e37
    return np.vstack(
        [
            features(rng, 200, n_features),
            edge_rows(estimator, rng, 300),
            np.zeros((1, n_features)),
            -np.zeros((1, n_features)),
            big,
        ]
    )


def compiled(estimator: Any) -> CompiledPredict:
    fn = compile_trees(estimator)
    assert isinstance(fn, CompiledPredict), "expected the estimator to compile"
    return fn


def assert_matches(estimator: Any, seed: int = 1) -> CompiledPredict:
    fn = compiled(estimator)
    X = fresh_rows(estimator, seed)
    assert_same(estimator.predict(X), fn(X))
    for n in (1, 2, 17):  # the lockstep groups: fewer pairs than a group, and a ragged end
        assert_same(estimator.predict(X[:n]), fn(X[:n]))
    assert_outputs_match(estimator, fn, X)
    return fn


def assert_outputs_match(estimator: Any, fn: CompiledTrees, X: np.ndarray[Any, Any]) -> None:
    """Every output in ``fn.output_names``, compiled, all at once and each alone, is the bits of
    the estimator's own method, in the same memory layout (what numpy does next depends on it)."""
    with np.errstate(divide="ignore"):  # the log of a zero probability, on both sides
        expected = {name: getattr(estimator, name)(X) for name in fn.output_names}
        together = fn.compiled_outputs(X, fn.output_names)
        alone = {name: fn.compute(X, [name]) for name in fn.output_names}
    assert together is not None, "expected the compiled loop to take these rows"
    assert list(together) == list(fn.output_names)
    for name, want in expected.items():
        assert list(alone[name]) == [name]
        for got in (together[name], alone[name][name]):
            assert_same(want, got)
            assert (got.flags.c_contiguous, got.flags.f_contiguous) == (
                want.flags.c_contiguous,
                want.flags.f_contiguous,
            ), name


@pytest.fixture
def data() -> tuple[np.ndarray[Any, Any], np.random.Generator]:
    rng = np.random.default_rng(1234)
    return features(rng, 300, 6), rng


# -- bit equality ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLASSIFIERS)
@pytest.mark.parametrize(
    "labels",
    [
        np.array([3, 7]),
        np.array([-1, 0, 5, 9]),
        np.array(["cat", "dog", "emu"]),
        np.array(["cat", "dog", "emu"], dtype=object),
        np.array([-1.0, 2.0]),
        np.array([False, True]),
    ],
    ids=["binary-int", "multiclass-int", "str", "object", "float", "bool"],
)
def test_classifiers_match(kind: str, labels: np.ndarray[Any, Any], data: Any) -> None:
    x, rng = data
    y = labels[(x[:, 0] + x[:, 2] + rng.integers(0, 2, len(x))).astype(int) % len(labels)]
    estimator = CLASSIFIERS[kind]().fit(x, y)
    fn = assert_matches(estimator)
    assert fn.forest.n_values == len(labels)


@pytest.mark.parametrize("kind", REGRESSORS)
def test_regressors_match(kind: str, data: Any) -> None:
    x, rng = data
    y = x[:, 1] * 3.0 - x[:, 0] ** 2 + rng.normal(size=len(x))
    assert_matches(REGRESSORS[kind]().fit(x, y))


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_stumps_match(kind: str, data: Any) -> None:
    x, rng = data
    y = rng.integers(0, 3, len(x))
    assert_matches(CLASSIFIERS[kind](max_depth=1).fit(x, y))
    assert_matches(REGRESSORS[kind](max_depth=1).fit(x, y * 1.5))


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_single_leaf_trees_match(kind: str, data: Any) -> None:
    """Constant targets: every tree is one leaf (depth 0); one class is an argmax over one."""
    x, _ = data
    fn = assert_matches(CLASSIFIERS[kind]().fit(x, np.full(len(x), "only")))
    assert fn.forest.n_nodes == fn.forest.n_trees
    assert_matches(REGRESSORS[kind]().fit(x, np.full(len(x), -2.5)))


@pytest.mark.parametrize("kind", FORESTS)
def test_forest_options_match(kind: str, data: Any) -> None:
    x, rng = data
    y = rng.integers(0, 4, len(x))
    for options in (
        {"bootstrap": False},
        {"bootstrap": True, "max_samples": 0.3},
        {"max_leaf_nodes": 12},  # the best-first builder numbers nodes differently
        {"class_weight": "balanced", "criterion": "entropy"},
        {"max_features": None, "min_samples_leaf": 5},
    ):
        assert_matches(CLASSIFIERS[kind](**options).fit(x, y))
    yr = np.abs(x[:, 1]) + rng.uniform(size=len(x))
    for options in (
        {"bootstrap": False},
        {"max_leaf_nodes": 12},
        {"criterion": "absolute_error", "n_estimators": 5},
        {"criterion": "poisson"},
    ):
        assert_matches(REGRESSORS[kind](**options).fit(x, yr))


def test_negative_zero_leaf_value_is_kept_by_a_single_tree() -> None:
    """sklearn returns a single tree's leaf value as is; 0.0 + -0.0 would lose the sign."""
    estimator = DecisionTreeRegressor().fit(np.array([[0.0], [1.0]]), np.array([1.0, 2.0]))
    estimator.tree_.value[:] = -0.0  # the array is the tree's own storage
    X = np.array([[0.0], [1.0]])
    assert np.signbit(estimator.predict(X)).all()
    assert_same(estimator.predict(X), compiled(estimator)(X))


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_ties_go_to_the_first_class(kind: str) -> None:
    """A leaf with equal fractions: numpy's argmax takes the first class, and so do we."""
    x = np.array([[0.0], [0.0], [1.0], [1.0]])
    y = np.array(["b", "a", "b", "a"])
    estimator = CLASSIFIERS[kind](**({"bootstrap": False} if kind in FORESTS else {})).fit(x, y)
    X = np.array([[0.0], [1.0]])
    assert list(estimator.predict(X)) == ["a", "a"]
    assert_same(estimator.predict(X), compiled(estimator)(X))


@pytest.mark.parametrize("kind", FORESTS)
def test_nan_rows_go_to_sklearn_and_match(kind: str, data: Any) -> None:
    """sklearn 1.9 forests learn where NaN goes; a row with NaN is predicted by sklearn."""
    x, rng = data
    x = x.copy()
    x[rng.uniform(size=x.shape) < 0.2] = np.nan
    y = rng.integers(0, 3, len(x))
    for estimator in (CLASSIFIERS[kind]().fit(x, y), REGRESSORS[kind]().fit(x, y * 1.0)):
        fn = compiled(estimator)
        X = fresh_rows(estimator, 2)
        X[rng.uniform(size=X.shape) < 0.1] = np.nan
        assert_same(estimator.predict(X), fn(X))
        clean = np.nan_to_num(X[:5])
        assert fn.forest.predict(clean) is not None
        assert fn.forest.predict(X) is None


def test_nan_rows_of_a_model_fitted_without_nan_match(data: Any) -> None:
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, rng.integers(0, 2, len(x)))
    X = fresh_rows(estimator, 3)
    X[::3, 0] = np.nan
    assert_same(estimator.predict(X), compiled(estimator)(X))


def outcome(predict: Callable[[Any], Any], X: Any) -> tuple[str, Any]:
    """The result, or the exception's type and message (warnings as the caller filters them)."""
    try:
        return "ok", predict(X)
    except Exception as error:
        return type(error).__name__, str(error)


def assert_same_outcome(estimator: Any, fn: CompiledPredict, X: Any) -> None:
    expected, got = outcome(estimator.predict, X), outcome(fn, X)
    assert got[0] == expected[0]
    if expected[0] == "ok":
        assert_same(expected[1], got[1])
    else:
        assert got[1] == expected[1]


@pytest.mark.parametrize("value", [1e39, -1e300, np.inf, -np.inf, 3.4028235677973366e38])
def test_values_beyond_float32_behave_as_in_sklearn(value: float, data: Any) -> None:
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, rng.integers(0, 2, len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 4)[:10]
    X[3, 1] = value
    assert fn.forest.predict(X) is None
    # As the suite runs (warnings are errors): numpy's overflowing cast raises RuntimeWarning.
    assert_same_outcome(estimator, fn, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # then sklearn's own ValueError
        assert_same_outcome(estimator, fn, X)


@pytest.mark.parametrize("pattern", ["rounds-to-float32-max", "same-sign", "both-signs"])
def test_batches_whose_float32_sum_could_overflow_go_to_sklearn(pattern: str, data: Any) -> None:
    """sklearn's finite check sums X in float32, and warns when that meets both infinities."""
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, rng.integers(0, 2, len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 4)[:10]
    if pattern == "rounds-to-float32-max":
        X[2, 1] = 3.4028235004135232e38  # above FLT_MAX, but its cast rounds down to it
    elif pattern == "same-sign":
        X[:, 0] = 1e38  # the sum overflows to +inf: no warning, sklearn's element-wise check passes
    else:
        X[:, 0], X[:, 1] = 3e38, -3e38  # inf + -inf: "invalid value encountered in reduce"
    assert fn.forest.predict(X) is None
    assert_same_outcome(estimator, fn, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_same_outcome(estimator, fn, X)


def test_large_values_below_the_overflow_bound_are_compiled(data: Any) -> None:
    x, rng = data
    estimator = RandomForestRegressor(n_estimators=5, random_state=0).fit(x, rng.normal(size=len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 4)[:10]
    X[3, 0], X[4, 1] = 1.6e38, -1e30
    assert fn.forest.predict(X) is not None
    assert_same(estimator.predict(X), fn(X))


def test_other_inputs_go_to_sklearn(data: Any) -> None:
    x, rng = data
    estimator = ExtraTreesClassifier(n_estimators=5, random_state=0).fit(x, rng.integers(0, 3, len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 5)[:20]
    for other in (
        X.astype(np.float32),
        X.astype(">f8"),
        np.asfortranarray(X),
        X[:, ::-1].copy()[:, ::-1],  # a negative-stride view
        X[::2],
        X.tolist(),
        np.round(X).astype(np.int64),
        X[:, :3],
        X[:0],
        X[0],
    ):
        assert_same_outcome(estimator, fn, other)


def test_n_jobs_forests_compile_and_match_the_one_job_sum(data: Any) -> None:
    """With n_jobs > 1 sklearn sums in thread-completion order; the compiled sum is in order."""
    x, rng = data
    estimator = RandomForestRegressor(n_estimators=20, n_jobs=2, random_state=0).fit(
        x, rng.normal(size=len(x))
    )
    fn = compiled(estimator)
    X = fresh_rows(estimator, 6)
    estimator.set_params(n_jobs=1)
    assert_same(estimator.predict(X), fn(X))


def test_models_fitted_with_feature_names_compile_and_match(data: Any) -> None:
    """Fitted on a DataFrame, sklearn warns on every ndarray batch; the answers are the same."""
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, rng.integers(0, 3, len(x)))
    # What fit(DataFrame) records (there is no pandas here to fit on one).
    estimator.feature_names_in_ = np.array([f"f{j}" for j in range(x.shape[1])], dtype=object)
    fn = compiled(estimator)
    X = fresh_rows(estimator, 7)
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        expected = estimator.predict(X)
    assert_same(expected, fn(X))


# -- property test ---------------------------------------------------------------------------

KINDS = [
    RandomForestClassifier,
    ExtraTreesClassifier,
    RandomForestRegressor,
    ExtraTreesRegressor,
    DecisionTreeClassifier,
    DecisionTreeRegressor,
    ExtraTreeClassifier,
    ExtraTreeRegressor,
]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    n_samples=st.integers(1, 80),
    n_features=st.integers(1, 6),
    n_classes=st.integers(1, 4),
    n_estimators=st.integers(1, 6),
    max_depth=st.one_of(st.none(), st.integers(1, 6)),
    bootstrap=st.booleans(),
    integer_features=st.booleans(),
)
def test_random_forests_match(
    kind: type,
    seed: int,
    n_samples: int,
    n_features: int,
    n_classes: int,
    n_estimators: int,
    max_depth: int | None,
    bootstrap: bool,
    integer_features: bool,
) -> None:
    # Hypothesis prints the drawn arguments, seed included, on failure: that replays the case.
    rng = np.random.default_rng(seed)
    x = features(rng, n_samples, n_features) if integer_features else rng.normal(size=(n_samples, n_features))
    params: dict[str, Any] = {"random_state": seed % 1000, "max_depth": max_depth}
    if kind in (RandomForestClassifier, ExtraTreesClassifier, RandomForestRegressor, ExtraTreesRegressor):
        params.update(n_estimators=n_estimators, bootstrap=bootstrap)
    if "Classifier" in kind.__name__:
        y: np.ndarray[Any, Any] = rng.integers(0, n_classes, n_samples)
    else:
        y = rng.normal(size=n_samples) * 10.0 ** rng.integers(-3, 4)
    estimator = kind(**params).fit(x, y)
    fn = compiled(estimator)
    X = fresh_rows(estimator, seed + 1)
    assert_same(estimator.predict(X), fn(X))
    assert_same(estimator.predict(X[:1]), fn(X[:1]))


# -- HistGradientBoosting --------------------------------------------------------------------

BOOSTING = {
    "binary": (factory(HistGradientBoostingClassifier, max_iter=30, random_state=0), 2),
    "multiclass": (factory(HistGradientBoostingClassifier, max_iter=30, random_state=0), 4),
    "squared-error": (factory(HistGradientBoostingRegressor, max_iter=30, random_state=0), 0),
    "poisson": (factory(HistGradientBoostingRegressor, loss="poisson", max_iter=30, random_state=0), 0),
}


def boosting_rows(estimator: Any, rng: np.random.Generator, n_rows: int) -> np.ndarray[Any, Any]:
    """Rows on and beside (in float64) the model's thresholds, read from its predictors here,
    with some values NaN or infinite: the values its own walk routes."""
    nodes = np.concatenate([p.nodes for trees in estimator._predictors for p in trees])
    split = nodes["is_leaf"] == 0
    x = rng.normal(size=(n_rows, estimator.n_features_in_))
    for j in range(x.shape[1]):
        t = nodes["num_threshold"][split & (nodes["feature_idx"] == j)]
        t = t[np.isfinite(t)]
        if t.size:
            candidates = np.concatenate([t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf)])
            x[:, j] = rng.choice(candidates, n_rows)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[rng.random(x.shape) < 0.02] = np.inf
    x[rng.random(x.shape) < 0.02] = -np.inf
    return x


@pytest.mark.parametrize("missing_in_training", [False, True], ids=["clean-fit", "nan-fit"])
@pytest.mark.parametrize("kind", BOOSTING)
def test_boosting_models_match(kind: str, missing_in_training: bool, data: Any) -> None:
    make, n_classes = BOOSTING[kind]
    x, rng = data
    y = rng.integers(0, n_classes, len(x)) if n_classes else np.abs(x[:, 0]) + rng.random(len(x))
    if missing_in_training:  # splits then learn where NaN goes, both ways
        x = x.copy()
        x[rng.random(x.shape) < 0.2] = np.nan
    estimator = make().fit(x, y)
    fn = compile_trees(estimator)
    assert isinstance(fn, CompiledBoostingPredict), "expected the model to compile"
    X = np.vstack([features(rng, 200, x.shape[1]), boosting_rows(estimator, rng, 300), -np.zeros((1, 6))])
    assert_same(estimator.predict(X), fn(X))
    for n in (1, 2, 17):  # the lockstep groups: fewer rows than a group, and a ragged end
        assert_same(estimator.predict(X[:n]), fn(X[:n]))
        assert_outputs_match(estimator, fn, X[:n])
    assert_outputs_match(estimator, fn, X)
    assert fn.booster.n_outputs == (n_classes if n_classes > 2 else 1)
    assert fn.booster.n_trees == estimator.n_iter_ * fn.booster.n_outputs


def test_boosting_scores_are_the_models_raw_scores(data: Any) -> None:
    """Classes can agree by luck; the raw scores are what the walk adds up."""
    x, rng = data
    estimator = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, rng.integers(0, 3, len(x)))
    X = boosting_rows(estimator, rng, 200)
    scores = compiled_boosting(estimator).booster.predict(X)
    assert scores is not None
    assert_same(estimator._raw_predict(X), scores)
    # sklearn's layout: a softmax of 8 or more classes sums a C-ordered row in another order.
    assert scores.flags.f_contiguous


def compiled_boosting(estimator: Any) -> CompiledBoostingPredict:
    fn = compile_trees(estimator)
    assert isinstance(fn, CompiledBoostingPredict)
    return fn


def test_the_demo_gradient_boosting_compiles(tmp_path: Any) -> None:
    """The demo's v2: 100 iterations of 10 classes, 1,000 trees."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    estimator = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(x, y)
    fn = compiled_boosting(estimator)
    assert_same(estimator.predict(x), fn(x))
    assert_outputs_match(estimator, fn, x)


# -- the other outputs: predict_proba, predict_log_proba, decision_function -------------------

FOREST_OUTPUTS = ("predict", "predict_proba", "predict_log_proba")
BOOSTING_OUTPUTS = ("predict", "predict_proba", "decision_function")
LABELS = {
    "str": np.array(["cat", "dog", "emu"]),
    "gapped-int": np.array([-1, 0, 5, 9]),  # classes_ that are not 0..n-1
    "binary-int": np.array([3, 7]),
}


def range_rows(
    feature: np.ndarray[Any, Any],
    threshold: np.ndarray[Any, Any],
    n_features: int,
    rng: np.random.Generator,
    n_rows: int,
) -> np.ndarray[Any, Any]:
    """Rows drawn uniformly across each feature's threshold range, and a little beyond it."""
    low, high = np.full(n_features, -1.0), np.full(n_features, 1.0)
    for j in range(n_features):
        t = threshold[(feature == j) & np.isfinite(threshold)]
        if t.size:
            low[j], high[j] = t.min(), t.max()
    margin = (high - low) * 0.1 + 0.5
    return rng.uniform(low - margin, high + margin, size=(n_rows, n_features))


def forest_rows(estimator: Any, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """10,000 rows across the threshold ranges, then rows on and beside the thresholds."""
    feature, threshold = split_thresholds(estimator)
    spread = range_rows(feature, threshold, estimator.n_features_in_, rng, 10_000)
    return np.vstack([spread, edge_rows(estimator, rng, 500)])


def boosting_spread_rows(estimator: Any, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """10,000 rows across the model's threshold ranges, some values NaN or infinite, then rows on
    and beside the thresholds (``boosting_rows``)."""
    nodes = np.concatenate([p.nodes for trees in estimator._predictors for p in trees])
    split = nodes["is_leaf"] == 0
    x = range_rows(
        nodes["feature_idx"][split], nodes["num_threshold"][split], estimator.n_features_in_, rng, 10_000
    )
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.01] = np.inf
    x[rng.random(x.shape) < 0.01] = -np.inf
    return np.vstack([x, boosting_rows(estimator, rng, 500)])


@pytest.mark.parametrize("weighted", [False, True], ids=["grown", "balanced-impure-leaves"])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_classifier_outputs_match_on_the_probe_and_10000_rows(kind: str, labels: str, weighted: bool) -> None:
    """Weighted, with leaves that hold several classes, a leaf's class fractions need not sum
    to exactly 1: the probabilities are the fractions as they are, never renormalized."""
    rng = np.random.default_rng(1601)
    x = features(rng, 300, 6)
    classes = LABELS[labels]
    y = classes[(x[:, 0] + x[:, 2] + rng.integers(0, 2, len(x))).astype(int) % len(classes)]
    options: dict[str, Any] = {"class_weight": "balanced", "min_samples_leaf": 5} if weighted else {}
    estimator = CLASSIFIERS[kind](**options).fit(x, y)
    if weighted and len(classes) > 2:  # two fractions happen to sum to 1
        trees_ = [e.tree_ for e in getattr(estimator, "estimators_", [estimator])]
        leaves = np.concatenate([t.value[t.children_left == -1, 0] for t in trees_])
        assert (leaves.sum(axis=1) != 1.0).any()
    fn = compiled(estimator)
    assert fn.output_names == FOREST_OUTPUTS
    _, probe = trees._flatten(estimator)
    assert_outputs_match(estimator, fn, probe)
    assert_outputs_match(estimator, fn, forest_rows(estimator, rng))


BOOSTED_LABELS = {
    "binary-str": np.array(["no", "yes"]),
    "multiclass-gapped-int": np.arange(10) * 3 - 4,  # 10 classes: the softmax sums pairwise
    "multiclass-str": np.array(["a", "b", "c"]),
}


@pytest.mark.parametrize("missing_in_training", [False, True], ids=["clean-fit", "nan-fit"])
@pytest.mark.parametrize("labels", BOOSTED_LABELS)
def test_boosting_classifier_outputs_match_on_the_probe_and_10000_rows(
    labels: str, missing_in_training: bool
) -> None:
    rng = np.random.default_rng(1602)
    x = features(rng, 400, 6)
    classes = BOOSTED_LABELS[labels]
    y = classes[(np.abs(x[:, 1]) * 3 + x[:, 0] + rng.integers(0, 3, len(x))).astype(int) % len(classes)]
    if missing_in_training:
        x[rng.random(x.shape) < 0.2] = np.nan
    estimator = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(x, y)
    fn = compiled_boosting(estimator)
    assert fn.output_names == BOOSTING_OUTPUTS
    _, probe = trees._flatten_boosting(estimator)
    assert_outputs_match(estimator, fn, probe)
    X = boosting_spread_rows(estimator, rng)
    assert np.isnan(X).any() and np.isinf(X).any()
    assert_outputs_match(estimator, fn, X)
    binary = len(classes) == 2
    assert fn.compute(X, ["decision_function"])["decision_function"].ndim == (1 if binary else 2)
    assert fn.compute(X, ["predict_proba"])["predict_proba"].shape == (len(X), len(classes))


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: RandomForestClassifier(n_estimators=3), FOREST_OUTPUTS),
        (lambda: ExtraTreesClassifier(n_estimators=3), FOREST_OUTPUTS),
        (lambda: DecisionTreeClassifier(), FOREST_OUTPUTS),
        (lambda: ExtraTreeClassifier(), FOREST_OUTPUTS),
        (lambda: HistGradientBoostingClassifier(max_iter=3), BOOSTING_OUTPUTS),
        (lambda: RandomForestRegressor(n_estimators=3), ("predict",)),
        (lambda: ExtraTreesRegressor(n_estimators=3), ("predict",)),
        (lambda: DecisionTreeRegressor(), ("predict",)),
        (lambda: ExtraTreeRegressor(), ("predict",)),
        (lambda: HistGradientBoostingRegressor(max_iter=3), ("predict",)),
    ],
    ids=["rf", "et", "dt", "xt", "hgb", "rf-reg", "et-reg", "dt-reg", "xt-reg", "hgb-reg"],
)
def test_output_names_are_the_methods_each_estimator_has(
    make: Callable[[], Any], names: Any, data: Any
) -> None:
    x, rng = data
    estimator = make()
    target = rng.integers(0, 3, len(x)) if hasattr(estimator, "predict_proba") else x[:, 0]
    estimator.fit(x, target)
    fn = compile_trees(estimator)
    assert fn is not None
    assert fn.output_names == names
    expected = tuple(name for name in FOREST_OUTPUTS + ("decision_function",) if hasattr(estimator, name))
    assert sorted(fn.output_names) == sorted(expected)


@pytest.mark.parametrize("kind", ["rf", "dt", "hgb"])
def test_a_regressor_computes_predict_only(kind: str, data: Any) -> None:
    x, rng = data
    make = {"rf": REGRESSORS["rf"], "dt": REGRESSORS["dt"], "hgb": BOOSTING["squared-error"][0]}[kind]
    estimator = make().fit(x, x[:, 1] - x[:, 0] + rng.normal(size=len(x)))
    fn = compile_trees(estimator)
    assert fn is not None and fn.output_names == ("predict",)
    X = boosting_rows(estimator, rng, 300) if kind == "hgb" else fresh_rows(estimator, 11)
    assert_outputs_match(estimator, fn, X)
    for name in ("predict_proba", "predict_log_proba", "decision_function"):
        with pytest.raises(KeyError, match=name):
            fn.compute(X, ["predict", name])


def test_compute_several_names_at_once_equals_each_alone(data: Any) -> None:
    """One walk for all: in the order asked, each name once, each the same as asked alone."""
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, rng.integers(0, 3, len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 12)
    with np.errstate(divide="ignore"):
        alone = {name: fn.compute(X, [name])[name] for name in fn.output_names}
        together = fn.compute(X, ["predict_log_proba", "predict", "predict_log_proba", "predict_proba"])
        as_a_set = fn.compute(X, frozenset(fn.output_names))
    assert list(together) == ["predict_log_proba", "predict", "predict_proba"]
    assert sorted(as_a_set) == sorted(fn.output_names)
    for name, want in alone.items():
        assert_same(want, together[name])
        assert_same(want, as_a_set[name])
    assert fn.compute(X, []) == {}


def test_names_it_does_not_compute_raise_key_error(data: Any) -> None:
    x, rng = data
    y = rng.integers(0, 2, len(x))
    forest = compiled(RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y))
    booster = compiled_boosting(HistGradientBoostingClassifier(max_iter=3).fit(x, y))
    X = fresh_rows(forest.estimator, 13)
    X[0, 0] = np.nan  # a batch sklearn would answer: the name is refused before anything runs
    for fn, name in ((forest, "decision_function"), (booster, "predict_log_proba"), (forest, "transform")):
        with pytest.raises(KeyError, match=f"'{name}' is not computed here"):
            fn.compute(X, ["predict", name])
    with pytest.raises(TypeError, match="not the string 'predict'"):
        forest.compute(X, "predict")


def test_a_batch_the_compiled_loop_refuses_is_answered_by_sklearns_methods(data: Any) -> None:
    """Name by name, each by the estimator's own method on the batch itself: the same calls,
    the same results, the same errors as calling those methods directly."""
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(
        x, rng.choice(LABELS["str"], len(x))
    )
    fn = compiled(estimator)
    calls: list[tuple[str, Any]] = []  # sklearn's predict calls self.predict_proba: seen too
    for name in fn.output_names:
        real = getattr(estimator, name)

        def counting(rows: Any, name: str = name, real: Any = real) -> Any:
            calls.append((name, rows))
            return real(rows)

        setattr(estimator, name, counting)

    def both(compute: Callable[[Any], Any], X: Any) -> tuple[tuple[str, Any], list[tuple[str, Any]]]:
        calls.clear()
        with np.errstate(divide="ignore"):
            result = outcome(compute, X)
        return result, list(calls)

    def by_sklearn(names: tuple[str, ...]) -> Callable[[Any], Any]:
        return lambda X: {name: getattr(estimator, name)(X) for name in names}

    def by_compute(names: tuple[str, ...]) -> Callable[[Any], Any]:
        return lambda X: fn.compute(X, names)

    with_nan = fresh_rows(estimator, 14)
    with_nan[5, 2] = np.nan
    clean = fresh_rows(estimator, 15)[:20]
    infinite = clean.copy()
    infinite[3, 1] = np.inf
    batches = [with_nan, clean.astype(np.float32), clean.tolist(), clean[:, :3], infinite, clean[:0]]
    for X in batches:
        for names in (fn.output_names, ("predict_proba",), ("predict_log_proba", "predict")):
            if isinstance(X, np.ndarray) and X.dtype == np.float64 and X.shape[1:] == (6,):
                assert fn.compiled_outputs(X, names) is None
            want, sklearn_calls = both(by_sklearn(names), X)
            have, our_calls = both(by_compute(names), X)
            assert [name for name, _ in our_calls] == [name for name, _ in sklearn_calls]
            assert all(rows is X for _, rows in our_calls)
            assert have[0] == want[0]
            if want[0] == "ok":
                assert list(have[1]) == list(names)
                for name in names:
                    assert_same(want[1][name], have[1][name])
            else:
                assert have[1] == want[1]


@pytest.mark.parametrize("kind", ["rf", "xt", "hgb-binary", "hgb-multiclass"])
def test_the_outputs_come_from_the_compiled_walk(kind: str, data: Any) -> None:
    """With every method of the estimator broken after compiling, compute still answers a
    normal batch, with what those methods gave before."""
    x, rng = data
    if kind.startswith("hgb"):
        estimator: Any = HistGradientBoostingClassifier(max_iter=10, random_state=0)
        y = rng.integers(0, 2 if kind == "hgb-binary" else 4, len(x))
    else:
        estimator = CLASSIFIERS[kind]()
        y = rng.choice(LABELS["gapped-int"], len(x))
    estimator.fit(x, y)
    fn = compile_trees(estimator)
    assert fn is not None
    X = boosting_rows(estimator, rng, 300) if kind.startswith("hgb") else fresh_rows(estimator, 16)
    with np.errstate(divide="ignore"):
        expected = {name: getattr(estimator, name)(X) for name in fn.output_names}

    def broken(rows: Any) -> Any:
        raise AssertionError("the estimator's own method was called")

    for name in fn.output_names:
        setattr(estimator, name, broken)
    with np.errstate(divide="ignore"):
        got = fn.compute(X, fn.output_names)
    for name in fn.output_names:
        assert_same(expected[name], got[name])
    # While a batch the loop refuses (here, no rows) goes to the broken methods.
    with pytest.raises(AssertionError, match="own method was called"):
        fn.compute(X[:0], ["predict_proba"])


def test_a_zero_probability_logs_to_minus_infinity_with_sklearns_warning(data: Any) -> None:
    x, rng = data
    estimator = DecisionTreeClassifier(random_state=0).fit(x, rng.integers(0, 3, len(x)))
    fn = compiled(estimator)
    X = fresh_rows(estimator, 17)
    with pytest.warns(RuntimeWarning, match="divide by zero encountered in log"):
        expected = estimator.predict_log_proba(X)
    with pytest.warns(RuntimeWarning, match="divide by zero encountered in log"):
        got = fn.compute(X, ["predict_log_proba"])["predict_log_proba"]
    assert np.isneginf(got).any()
    assert_same(expected, got)


def test_n_jobs_forest_probabilities_are_the_one_job_sum(data: Any) -> None:
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=20, n_jobs=2, random_state=0).fit(
        x, rng.integers(0, 5, len(x))
    )
    fn = compiled(estimator)
    X = fresh_rows(estimator, 18)
    estimator.set_params(n_jobs=1)
    assert_outputs_match(estimator, fn, X)


# -- what is not compiled --------------------------------------------------------------------


class MyForest(RandomForestClassifier):
    pass


def unsupported_cases() -> list[tuple[str, Callable[[], Any], str]]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 3))
    y = rng.integers(0, 2, 60)

    return [
        (
            "gradient-boosting",
            lambda: GradientBoostingClassifier(n_estimators=3).fit(x, y),
            "not a supported",
        ),
        ("logistic", lambda: LogisticRegression().fit(x, y), "not a supported"),
        ("subclass", lambda: MyForest(n_estimators=3).fit(x, y), "not a supported"),
        (
            "multi-output",
            lambda: RandomForestClassifier(n_estimators=3).fit(x, np.column_stack([y, 1 - y])),
            "2 outputs",
        ),
        (
            "multi-output-regressor",
            lambda: DecisionTreeRegressor().fit(x, np.column_stack([x[:, 0], x[:, 1]])),
            "2 outputs",
        ),
        (
            "categorical-boosting",
            lambda: HistGradientBoostingClassifier(max_iter=3, categorical_features=[0]).fit(
                np.column_stack([rng.integers(0, 4, 60), x[:, 1:]]), y
            ),
            "categorical",
        ),
        ("unfitted-boosting", lambda: HistGradientBoostingRegressor(), "not fitted"),
        ("unfitted-forest", lambda: RandomForestClassifier(), "not fitted"),
        ("unfitted-tree", lambda: DecisionTreeClassifier(), "not fitted"),
        ("not-an-estimator", lambda: object(), "not a supported"),
    ]


@pytest.mark.parametrize(
    ("make", "reason"),
    [case[1:] for case in unsupported_cases()],
    ids=[case[0] for case in unsupported_cases()],
)
def test_unsupported_estimators_are_not_compiled(
    make: Callable[[], Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fastserve.trees"):
        assert compile_trees(make()) is None
    assert len(caplog.records) == 1
    assert caplog.records[0].name == "fastserve.trees"
    assert reason in caplog.records[0].getMessage()


def test_a_difference_on_the_probe_refuses_to_compile(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(60, 3))
    estimator = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, rng.integers(0, 2, 60))
    real = estimator.predict
    estimator.predict = lambda X: real(X)[::-1]  # an instance attribute: what compile_trees calls
    with caplog.at_level(logging.INFO, logger="fastserve.trees"):
        assert compile_trees(estimator) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "differs from sklearn" in record.getMessage()


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("forest", "predict_proba"),
        ("forest", "predict_log_proba"),
        ("boosting", "predict_proba"),
        ("boosting", "decision_function"),
    ],
)
def test_a_difference_in_any_output_on_the_probe_refuses_to_compile(
    kind: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One value one ulp away, in one output other than predict, and the model is not compiled."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(80, 3))
    y = rng.integers(0, 3, 80)
    if kind == "forest":
        estimator: Any = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
    else:
        estimator = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y)
    real = getattr(estimator, name)

    def nudged(X: Any) -> Any:
        out = real(X).copy()
        out[len(out) // 2, 0] = np.nextafter(out[len(out) // 2, 0], np.inf)
        return out

    setattr(estimator, name, nudged)
    with caplog.at_level(logging.INFO, logger="fastserve.trees"):
        assert compile_trees(estimator) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"compiled {name} differs from sklearn on 1 of" in record.getMessage()


def test_a_probe_predict_that_raises_refuses_to_compile(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(8)
    estimator = DecisionTreeClassifier().fit(rng.normal(size=(20, 2)), rng.integers(0, 2, 20))

    def broken(X: Any) -> Any:
        raise RuntimeError("boom")

    estimator.predict = broken
    with caplog.at_level(logging.INFO, logger="fastserve.trees"):
        assert compile_trees(estimator) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "boom" in record.getMessage()


def test_no_extensions_switch_returns_none(monkeypatch: pytest.MonkeyPatch, data: Any) -> None:
    x, rng = data
    estimator = DecisionTreeClassifier().fit(x, rng.integers(0, 2, len(x)))
    monkeypatch.setenv("FASTSERVE_NO_EXTENSIONS", "1")
    assert compile_trees(estimator) is None


def test_missing_extension_returns_none(monkeypatch: pytest.MonkeyPatch, data: Any) -> None:
    x, rng = data
    estimator = DecisionTreeClassifier().fit(x, rng.integers(0, 2, len(x)))
    monkeypatch.setattr(trees, "_trees", None)
    assert compile_trees(estimator) is None


# -- the compiled path runs, without the GIL -------------------------------------------------


def test_a_normal_install_has_the_compiled_module() -> None:
    assert trees.COMPILED
    assert trees._trees is _trees
    assert _trees.__file__ is not None
    assert _trees.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_compiled_path_answers_and_sklearn_only_falls_back(data: Any) -> None:
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, rng.integers(0, 3, len(x)))
    fn = compiled(estimator)
    assert isinstance(fn.forest, _trees.CompiledForest)
    assert (fn.forest.n_trees, fn.forest.n_features, fn.forest.n_values) == (10, x.shape[1], 3)
    assert fn.forest.n_nodes == sum(e.tree_.node_count for e in estimator.estimators_)
    assert fn.forest.classifier and fn.forest.average
    X = fresh_rows(estimator, 9)
    expected = estimator.predict(X)

    calls: list[object] = []
    real = estimator.predict

    def counting(rows: Any) -> Any:
        calls.append(rows)
        return real(rows)

    estimator.predict = counting
    assert_same(expected, fn(X))
    assert calls == []
    X[0, 0] = np.nan
    fn(X)
    assert len(calls) == 1 and calls[0] is X


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExtraTreesRegressor(n_estimators=40, random_state=0),
        lambda: HistGradientBoostingRegressor(max_iter=50, random_state=0),
    ],
    ids=["forest", "boosting"],
)
def test_predict_releases_the_gil(make: Callable[[], Any]) -> None:
    """While one thread predicts, another keeps running Python: no long gap in its ticks.

    Holding the GIL through the C loop would stop the ticking thread for the whole call (the
    largest gap would be about the call's duration); released, the gaps stay near the
    interpreter's switch interval. Calls are sized to last at least 0.2 s.
    """
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4000, 8))
    estimator = make().fit(x, rng.normal(size=4000))
    fn = compile_trees(estimator)
    assert isinstance(fn, CompiledPredict | CompiledBoostingPredict), "expected the estimator to compile"
    X = rng.normal(size=(2000, 8))
    while True:
        start = time.perf_counter()
        fn(X)
        if time.perf_counter() - start >= 0.2:
            break
        X = np.vstack([X, X])

    def attempt() -> tuple[float, float]:
        done = threading.Event()
        window: list[float] = []

        def work() -> None:
            window.append(time.perf_counter())
            fn(X)
            window.append(time.perf_counter())
            done.set()

        worker = threading.Thread(target=work)
        largest_gap = 0.0
        last = time.perf_counter()
        worker.start()
        while not done.is_set():
            now = time.perf_counter()
            largest_gap = max(largest_gap, now - last)
            last = now
        worker.join()
        return largest_gap, window[1] - window[0]

    results = [attempt() for _ in range(3)]
    # One clean attempt proves it: with the GIL held, every attempt has a gap near the call.
    assert any(gap < 0.25 * duration for gap, duration in results), results


def test_concurrent_predicts_each_match_sklearn(data: Any) -> None:
    """Threads share one CompiledForest (it is read-only); each call has its own scratch."""
    x, rng = data
    estimator = RandomForestClassifier(n_estimators=25, random_state=0).fit(x, rng.integers(0, 4, len(x)))
    fn = compiled(estimator)
    batches = [fresh_rows(estimator, seed) for seed in range(8)] * 4
    expected = [estimator.predict(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fn, batches))
    for want, have in zip(expected, got, strict=True):
        assert_same(want, have)


# -- CompiledForest's own contract -----------------------------------------------------------


def one_split(**changes: Any) -> dict[str, Any]:
    """A valid one-split tree (node 0 splits feature 0 at 0.5; leaves 1 and 2), with changes."""
    arrays: dict[str, Any] = {
        "left": [1, -1, -1],
        "right": [2, -1, -1],
        "feature": [0, -2, -2],
        "threshold": [0.5, -2.0, -2.0],
        "missing_go_to_left": [0, 0, 0],
        "value": [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]],
        "offsets": [0, 3],
        "n_features": 1,
        "classifier": True,
        "average": False,
    }
    arrays.update(changes)
    return arrays


def build(arrays: dict[str, Any]) -> Any:
    flags = {name: arrays.pop(name) for name in ("classifier", "average")}
    return _trees.CompiledForest(*arrays.values(), **flags)


def test_compiled_forest_predicts_a_hand_built_tree() -> None:
    forest = build(one_split())
    X = np.array([[0.5], [np.nextafter(np.float32(0.5), np.float32(1.0))], [-1e30]])
    assert forest.predict(X).tolist() == [0, 1, 0]
    assert forest.predict(np.zeros((0, 1))) is None
    assert forest.predict(np.array([[np.nan]])) is None
    with pytest.raises(ValueError, match="X has 2 features, expected 1"):
        forest.predict(np.zeros((1, 2)))


def split_forest(leaf_values: list[list[list[float]]]) -> Any:
    """Trees like ``one_split``'s, one per entry of ``leaf_values`` (its two leaves' rows)."""
    n = len(leaf_values)
    return build(
        one_split(
            left=[1 + 3 * t if k == 0 else -1 for t in range(n) for k in range(3)],
            right=[2 + 3 * t if k == 0 else -1 for t in range(n) for k in range(3)],
            feature=[0, -2, -2] * n,
            threshold=[0.5, -2.0, -2.0] * n,
            missing_go_to_left=[0, 0, 0] * n,
            value=[row for leaves in leaf_values for row in [[0.5, 0.5], *leaves]],
            offsets=[3 * t for t in range(n + 1)],
            average=n > 1,
        )
    )


def test_compiled_forest_gives_the_probabilities_it_takes_the_argmax_of() -> None:
    """One tree: its leaf rows as they are. A forest: the rows summed into zeros in tree order,
    divided once by the number of trees. The index is predict's, from the same walk."""
    X = np.array([[0.0], [1.0], [0.25]])
    tree = split_forest([[[0.25, 0.75], [0.6, 0.4]]])
    index, proba = tree.predict_with_proba(X)
    assert proba.dtype == np.float64 and proba.flags.c_contiguous
    assert proba.tolist() == [[0.25, 0.75], [0.6, 0.4], [0.25, 0.75]]
    assert index.tolist() == [1, 0, 1] == tree.predict(X).tolist()
    # (0.1 + 0.2) + 0.3 is 0.6000000000000001 and 0.1 + (0.2 + 0.3) is 0.6: the order shows.
    leaves = [[[p, 1 - p], [1 - p, p]] for p in (0.1, 0.2, 0.3)]
    forest = split_forest(leaves)
    index, proba = forest.predict_with_proba(X)
    in_order = [(0.0 + 0.1 + 0.2 + 0.3) / 3, (0.0 + 0.9 + 0.8 + 0.7) / 3]
    assert proba.tolist() == [in_order, in_order[::-1], in_order]
    assert index.tolist() == [1, 0, 1] == forest.predict(X).tolist()
    assert forest.predict_with_proba(np.array([[np.nan]])) is None
    assert forest.predict_with_proba(np.zeros((0, 1))) is None
    with pytest.raises(ValueError, match="X has 2 features, expected 1"):
        forest.predict_with_proba(np.zeros((1, 2)))
    regressor = build(one_split(value=[[0.0], [1.0], [2.0]], classifier=False))
    with pytest.raises(ValueError, match="a regressor has no class probabilities"):
        regressor.predict_with_proba(X)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"left": [0, -1, -1]}, "node 0: a child must come after its parent"),
        ({"right": [3, -1, -1]}, "node 0: a child must come after its parent"),
        ({"left": [2, -1, 1]}, "node 2: a child must come after its parent"),
        ({"feature": [1, -2, -2]}, "node 0: feature 1 is out of range"),
        ({"feature": [-1, -2, -2]}, "node 0: feature -1 is out of range"),
        ({"offsets": [0, 2]}, "offsets must start at 0 and end at the number of nodes"),
        ({"offsets": [0, 3, 3], "average": True}, "tree 1 has no nodes"),
        ({"offsets": [0, 1, 3], "average": True}, "node 0: a child must come after its parent"),
        ({"offsets": [3]}, "at least one tree"),
        ({"offsets": [0, 1, 3]}, "only a forest"),
        ({"threshold": [0.5, 0.0]}, "one entry per node"),
        ({"value": [[1.0, 0.0]] * 4}, "one entry per node"),
        ({"classifier": False}, "a regressor has one value per leaf"),
        ({"n_features": 0}, "at least one tree, one node and one feature"),
        ({"value": np.zeros((3, 0))}, "a leaf has at least one value"),
        (
            {
                "left": [],
                "right": [],
                "feature": [],
                "threshold": [],
                "missing_go_to_left": [],
                "value": [[]],
            },
            "at least one tree, one node",
        ),
    ],
)
def test_compiled_forest_refuses_malformed_trees(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(one_split(**changes))


# -- CompiledBoosting's own contract ---------------------------------------------------------


def one_boosted_split(**changes: Any) -> Any:
    """One tree splitting feature 0 at 0.5, NaN to the right; leaves add -1 and +1 to a
    baseline of 0.25, on output 0 of 1."""
    arrays: dict[str, Any] = {
        "left": [1, -1, -1],
        "right": [2, -1, -1],
        "feature": [0, 0, 0],
        "threshold": [0.5, 0.0, 0.0],
        "missing_go_to_left": [0, 0, 0],
        "value": [0.0, -1.0, 1.0],
        "offsets": [0, 3],
        "output": [0],
        "baseline": [0.25],
        "n_features": 1,
    }
    arrays.update(changes)
    return _trees.CompiledBoosting(*arrays.values())


def test_compiled_boosting_routes_nan_and_infinity() -> None:
    X = np.array([[0.5], [np.nextafter(0.5, 1.0)], [np.nan], [-np.inf], [np.inf]])
    assert one_boosted_split().predict(X).tolist() == [[-0.75], [1.25], [1.25], [-0.75], [1.25]]
    nan_left = one_boosted_split(missing_go_to_left=[1, 0, 0])
    assert nan_left.predict(X).ravel().tolist() == [-0.75, 1.25, -0.75, -0.75, 1.25]
    # Any nonzero flag is "left", as in sklearn; the walk never indexes a child with it.
    assert one_boosted_split(missing_go_to_left=[7, 0, 0]).predict(X).tolist() == nan_left.predict(X).tolist()
    assert one_boosted_split().predict(np.zeros((0, 1))) is None
    with pytest.raises(ValueError, match="X has 2 features, expected 1"):
        one_boosted_split().predict(np.zeros((1, 2)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"left": [0, -1, -1]}, "node 0: a child must come after its parent"),
        ({"feature": [3, 0, 0]}, "node 0: feature 3 is out of range"),
        ({"output": [1]}, "tree 0: output 1 is out of range"),
        ({"output": []}, "every tree needs the output it adds to"),
        ({"value": [0.0, 1.0]}, "one entry per node"),
        ({"offsets": [0, 2]}, "offsets must start at 0"),
        ({"baseline": []}, "a model has at least one output"),
        ({"n_features": 0}, "at least one tree, one node and one feature"),
    ],
)
def test_compiled_boosting_refuses_malformed_trees(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        one_boosted_split(**changes)
