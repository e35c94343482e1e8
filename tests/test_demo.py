"""demo: the digits repository that `fastserve demo` writes, loaded the way the server loads it,
and the churn pipeline (a DataFrame model, written apart until the server serves it)."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings
from fastserve.demo import (
    CHURN_CLASSES,
    CHURN_COLUMNS,
    CHURN_PLANS,
    CHURN_REGIONS,
    DEMO_MODEL,
    churn_table,
    write_churn_model,
)
from fastserve.errors import ConfigError
from fastserve.registry import ModelEntry, Registry
from fastserve.repository import TRUSTED_TYPES


@pytest.fixture(scope="module")
def demo_root(demo_repo: Path) -> Path:
    """The session's demo repository (conftest trains it once with write_demo_repository)."""
    return demo_repo


@pytest.fixture(scope="module")
def digits_entry(demo_root: Path) -> ModelEntry:
    registry = Registry(demo_root, RepositorySettings(), BatchSettings(), LimitSettings())
    return registry.load_all()[DEMO_MODEL]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    x, y = load_digits(return_X_y=True)
    return x, y


def test_writes_two_versions_and_model_toml(demo_root: Path) -> None:
    model_dir = demo_root / "digits"
    assert sorted(p.name for p in demo_root.iterdir()) == ["churn", "digits"]  # churn: pandas is here
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.toml", "v1", "v2"]
    for version in ("v1", "v2"):
        # Written atomically: only the final file, no partial left behind.
        assert [p.name for p in (model_dir / version).iterdir()] == ["model.skops"]
        assert (model_dir / version / "model.skops").stat().st_size > 0
    config = tomllib.loads((model_dir / "model.toml").read_text())
    assert config == {"stable": "v1"}


def test_the_files_need_only_the_default_trusted_types(demo_root: Path) -> None:
    for version in ("v1", "v2"):
        untrusted = sio.get_untrusted_types(file=demo_root / "digits" / version / "model.skops")
        assert set(untrusted) <= set(TRUSTED_TYPES), f"{version}: {untrusted}"


def test_the_registry_loads_both_versions_with_stable_v1(digits_entry: ModelEntry) -> None:
    assert digits_entry.failed == {}
    assert list(digits_entry.versions) == ["v1", "v2"]
    assert digits_entry.stable == "v1"
    assert digits_entry.servable
    for loaded in digits_entry.versions.values():
        assert loaded.n_features == 64
        assert loaded.artifact == "model.skops"


def test_v1_is_a_300_tree_random_forest(digits_entry: ModelEntry) -> None:
    estimator = digits_entry.versions["v1"].estimator
    assert isinstance(estimator, RandomForestClassifier)
    assert estimator.n_estimators == 300
    assert len(estimator.estimators_) == 300


def test_v2_is_hist_gradient_boosting(digits_entry: ModelEntry) -> None:
    assert isinstance(digits_entry.versions["v2"].estimator, HistGradientBoostingClassifier)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_both_versions_predict_digits_well(
    digits_entry: ModelEntry, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], version: str
) -> None:
    x, y = digits
    predictions = digits_entry.versions[version].estimator.predict(x)
    assert predictions.shape == y.shape
    assert (predictions == y).mean() > 0.9


def test_the_versions_disagree_somewhere(
    digits_entry: ModelEntry, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    x, _ = digits
    rng = np.random.default_rng(12345)
    perturbed = np.clip(x + rng.normal(0.0, 3.0, size=x.shape), 0.0, 16.0)
    rows = np.vstack([x, perturbed])
    v1 = digits_entry.versions["v1"].estimator.predict(rows)
    v2 = digits_entry.versions["v2"].estimator.predict(rows)
    disagreements = int((v1 != v2).sum())
    assert disagreements >= 1, "v1 and v2 agree on every row: version comparisons would show nothing"
    # Different models, not different labels: they still agree on most rows.
    assert disagreements < len(rows) // 4


# --- churn: a Pipeline fitted on a DataFrame of mixed types ----------------------------


@pytest.fixture(scope="module")
def churn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pandas", reason="the churn model needs pandas: pip install 'fastserve[pandas]'")
    return write_churn_model(tmp_path_factory.mktemp("churn-repo"))


@pytest.fixture(scope="module")
def churn_data(churn_file: Path) -> tuple[Any, np.ndarray[Any, Any]]:
    return churn_table()


def _load(path: Path) -> Any:
    return sio.load(path, trusted=list(TRUSTED_TYPES))


def test_churn_writes_the_model_and_its_example(churn_file: Path) -> None:
    assert churn_file.parts[-3:] == ("churn", "v1", "model.skops")
    assert sorted(p.name for p in churn_file.parent.iterdir()) == ["input_example.json", "model.skops"]
    examples = json.loads((churn_file.parent / "input_example.json").read_text())
    assert len(examples) == 3
    for row in examples:
        assert list(row) == list(CHURN_COLUMNS)
        assert isinstance(row["age"], int) and isinstance(row["tenure_months"], int)
        assert isinstance(row["monthly"], float) and isinstance(row["autopay"], bool)
        assert row["region"] in CHURN_REGIONS
    assert [row["plan"] for row in examples] == list(CHURN_PLANS)


def test_churn_table_has_the_documented_dtypes(churn_data: tuple[Any, np.ndarray[Any, Any]]) -> None:
    frame, labels = churn_data
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == CHURN_COLUMNS
    assert list(frame["region"].cat.categories) == list(CHURN_REGIONS)
    assert set(frame["plan"]) == set(CHURN_PLANS)
    assert frame["age"].between(18, 80).all() and frame["tenure_months"].between(0, 72).all()
    assert set(labels) == set(CHURN_CLASSES)


def test_churn_needs_only_fastserve_trusted_types(churn_file: Path) -> None:
    assert set(sio.get_untrusted_types(file=churn_file)) <= set(TRUSTED_TYPES)
    assert type(_load(churn_file)).__name__ == "Pipeline"


def test_the_loaded_pipeline_answers_as_the_fitted_one(
    churn_file: Path, churn_data: tuple[Any, np.ndarray[Any, Any]]
) -> None:
    from fastserve.demo import churn_pipeline

    frame, labels = churn_data
    fitted = churn_pipeline().fit(frame, labels)
    loaded = _load(churn_file)
    assert list(loaded.classes_) == list(CHURN_CLASSES)
    np.testing.assert_array_equal(loaded.predict(frame), fitted.predict(frame))
    np.testing.assert_array_equal(loaded.predict_proba(frame), fitted.predict_proba(frame))


def test_the_example_rows_predict(churn_file: Path) -> None:
    import pandas as pd

    examples = json.loads((churn_file.parent / "input_example.json").read_text())
    frame = pd.DataFrame(examples).astype(
        {"plan": object, "region": pd.CategoricalDtype(list(CHURN_REGIONS))}
    )
    loaded = _load(churn_file)
    assert set(loaded.predict(frame)) <= set(CHURN_CLASSES)
    assert loaded.predict_proba(frame).shape == (3, 2)


def test_the_churn_model_is_not_trivial(
    churn_file: Path, churn_data: tuple[Any, np.ndarray[Any, Any]]
) -> None:
    frame, labels = churn_data
    accuracy = float((_load(churn_file).predict(frame) == labels).mean())
    majority = max(float((labels == c).mean()) for c in CHURN_CLASSES)
    # 0.807 against 0.566 for always answering "stay" (4,000 rows, seed 0).
    assert accuracy > majority + 0.15, (accuracy, majority)


def test_writing_twice_gives_the_same_model(
    churn_file: Path, churn_data: tuple[Any, np.ndarray[Any, Any]], tmp_path: Path
) -> None:
    frame, _ = churn_data
    again = _load(write_churn_model(tmp_path))
    first = _load(churn_file)
    np.testing.assert_array_equal(again.predict(frame), first.predict(frame))
    np.testing.assert_array_equal(again.predict_proba(frame), first.predict_proba(frame))
    assert (tmp_path / "churn" / "v1" / "input_example.json").read_text() == (
        churn_file.parent / "input_example.json"
    ).read_text()


def test_the_churn_model_without_pandas_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fastserve\[pandas\]'"):
        write_churn_model(tmp_path)
    assert not (tmp_path / "churn").exists()
