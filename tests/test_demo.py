"""demo: the digits repository that `fastserve demo` writes, loaded the way the server loads it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings
from fastserve.demo import DEMO_MODEL
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
    assert sorted(p.name for p in demo_root.iterdir()) == ["digits"]
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
