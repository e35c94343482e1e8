"""registry: discovery, safe loading, validation and warm-up of the versions in a model repository."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings
from fastserve.errors import ConfigError
from fastserve.registry import ModelEntry, Registry
from fastserve.repository import TRUSTED_TYPES, version_key
from fastserve.trees import CompiledPredict


class RaisingModel:
    """Fitted-looking, but every predict raises: a model that must fail its warm-up."""

    def __init__(self, n_features: int = 4) -> None:
        self.n_features_in_ = n_features

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        raise RuntimeError("this model cannot predict")


class TwoAnswersModel:
    """Answers two predictions for any input: a model with the wrong output shape."""

    n_features_in_ = 4

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.zeros(2)


RAISING_TYPE = f"{RaisingModel.__module__}.{RaisingModel.__qualname__}"


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    x, y = load_iris(return_X_y=True)
    return x, y


@pytest.fixture(scope="module")
def logistic(iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(*iris)


@pytest.fixture(scope="module")
def tree(iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(max_depth=3, random_state=0).fit(*iris)


@pytest.fixture(scope="module")
def forest(iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(*iris)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the repository: nothing in it may ever be loaded."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def write_skops(repo: Path, model: str, version: str, estimator: object) -> Path:
    target = repo / model / version / "model.skops"
    target.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, target)
    return target


def write_joblib(repo: Path, model: str, version: str, estimator: object) -> Path:
    target = repo / model / version / "model.joblib"
    target.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, target)
    return target


def write_toml(repo: Path, model: str, text: str) -> None:
    (repo / model).mkdir(parents=True, exist_ok=True)
    (repo / model / "model.toml").write_text(text)


def load(
    root: Path,
    batching: BatchSettings | None = None,
    limits: LimitSettings | None = None,
    **repository: Any,
) -> dict[str, ModelEntry]:
    registry = Registry(
        root, RepositorySettings(**repository), batching or BatchSettings(), limits or LimitSettings()
    )
    models = registry.load_all()
    assert registry.models is models
    return models


# --- loading what is there ----------------------------------------------------------------------


@pytest.fixture
def three_versions(
    repo: Path, logistic: LogisticRegression, tree: DecisionTreeClassifier, forest: RandomForestClassifier
) -> dict[str, Any]:
    """iris v1 (linear), v2 (one tree) and v3 (a forest), written to the repository."""
    versions = {"v1": logistic, "v2": tree, "v3": forest}
    for name, estimator in versions.items():
        write_skops(repo, "iris", name, estimator)
    return versions


def test_all_versions_load_with_their_feature_count(
    repo: Path, iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], three_versions: dict[str, Any]
) -> None:
    entry = load(repo)["iris"]
    assert entry.name == "iris"
    assert entry.failed == {}
    assert list(entry.versions) == ["v1", "v2", "v3"]
    x, _ = iris
    for name, original in three_versions.items():
        loaded = entry.versions[name]
        assert loaded.version == name
        assert loaded.n_features == 4
        assert type(loaded.n_features) is int
        assert loaded.artifact == "model.skops"
        assert type(loaded.estimator) is type(original)
        np.testing.assert_array_equal(loaded.estimator.predict(x), original.predict(x))
    assert entry.servable


def test_tree_models_are_served_through_the_compiled_predict(
    repo: Path, iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], three_versions: dict[str, Any]
) -> None:
    versions = load(repo)["iris"].versions
    assert {name: v.predict_path for name, v in versions.items()} == {
        "v1": "scikit-learn",
        "v2": "compiled",
        "v3": "compiled",
    }
    assert isinstance(versions["v3"].predict, CompiledPredict)
    assert versions["v1"].predict == versions["v1"].estimator.predict
    x, _ = iris
    for loaded in versions.values():
        np.testing.assert_array_equal(loaded.predict(x), loaded.estimator.predict(x))


def test_compile_trees_off_serves_scikit_learns_predict(repo: Path, forest: RandomForestClassifier) -> None:
    write_skops(repo, "iris", "v1", forest)
    loaded = load(repo, compile_trees=False, predict_process="off")["iris"].versions["v1"]
    assert loaded.predict_path == "scikit-learn"
    assert loaded.predict == loaded.estimator.predict


def test_n_features_follows_the_training_data(
    repo: Path, iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    x, y = iris
    write_skops(repo, "petals", "v1", DecisionTreeClassifier(random_state=0).fit(x[:, 2:], y))
    assert load(repo)["petals"].versions["v1"].n_features == 2


def test_several_models_load_independently(
    repo: Path, logistic: LogisticRegression, tree: DecisionTreeClassifier
) -> None:
    write_skops(repo, "a", "v1", logistic)
    write_skops(repo, "b", "v7", tree)
    models = load(repo)
    assert sorted(models) == ["a", "b"]
    assert models["a"].stable == "v1"
    assert models["b"].stable == "v7"


def test_stable_comes_from_model_toml(repo: Path, logistic: LogisticRegression) -> None:
    for version in ("v1", "v2", "v3"):
        write_skops(repo, "iris", version, logistic)
    write_toml(repo, "iris", 'stable = "v2"\n')
    entry = load(repo)["iris"]
    assert entry.stable == "v2"
    assert entry.servable


def test_without_model_toml_stable_is_the_latest_in_natural_order(
    repo: Path, logistic: LogisticRegression
) -> None:
    for version in ("v2", "v10", "v9"):
        write_skops(repo, "iris", version, logistic)
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v2", "v9", "v10"]
    assert entry.stable == "v10"


def test_model_toml_without_stable_also_takes_the_latest(repo: Path, logistic: LogisticRegression) -> None:
    for version in ("1.9", "1.10"):
        write_skops(repo, "iris", version, logistic)
    write_toml(repo, "iris", "[batching]\nmax_batch_rows = 8\n")
    assert load(repo)["iris"].stable == "1.10"


def test_version_key_is_natural_order() -> None:
    names = ["v10", "v2", "v1", "v1a", "v1.10", "v1.9", "v100"]
    assert sorted(names, key=version_key) == ["v1", "v1.9", "v1.10", "v1a", "v2", "v10", "v100"]


def test_names_that_are_not_models_or_versions_are_skipped(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, ".hidden", "v1", logistic)
    write_skops(repo, "bad name", "v1", logistic)
    write_skops(repo, "iris", "__pycache__", logistic)
    write_skops(repo, "iris", ".tmp", logistic)
    (repo / "README.md").write_text("models live here\n")
    (repo / "iris" / "notes.txt").write_text("v1 is the first\n")
    models = load(repo)
    assert list(models) == ["iris"]
    assert list(models["iris"].versions) == ["v1"]
    assert models["iris"].failed == {}


def test_the_repository_may_be_reached_through_a_symlink(
    repo: Path, tmp_path: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    link = tmp_path / "current"
    link.symlink_to(repo, target_is_directory=True)
    entry = load(link)["iris"]
    assert list(entry.versions) == ["v1"]
    assert entry.failed == {}


def test_a_model_skops_symlink_inside_the_repository_is_allowed(
    repo: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    (repo / "iris" / "v2").mkdir()
    (repo / "iris" / "v2" / "model.skops").symlink_to(Path("..") / "v1" / "model.skops")
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v1", "v2"]


def test_missing_repository_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^FASTSERVE_REPOSITORY: 'missing' is not a directory$"):
        load(tmp_path / "missing")


def test_a_file_as_repository_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "models.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^FASTSERVE_REPOSITORY: 'models.txt' is not a directory$"):
        load(tmp_path / "models.txt")


# --- versions that must not be served -----------------------------------------------------------


def test_a_corrupt_file_fails_only_its_version(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    (repo / "iris" / "v2").mkdir()
    (repo / "iris" / "v2" / "model.skops").write_bytes(b"this is not a skops file")
    truncated = write_skops(repo, "iris", "v3", logistic)
    truncated.write_bytes(truncated.read_bytes()[:200])
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v1"]
    assert sorted(entry.failed) == ["v2", "v3"]
    assert entry.failed["v2"].startswith("BadZipFile: ")
    assert entry.failed["v3"]
    assert entry.stable == "v1"
    assert entry.servable


def test_an_empty_version_directory_fails(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    (repo / "iris" / "v2").mkdir()
    entry = load(repo)["iris"]
    assert entry.failed == {"v2": "FileNotFoundError: no model.skops in the version directory"}
    assert entry.stable == "v1"


def test_an_unfitted_estimator_fails(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, "iris", "v2", LogisticRegression())
    entry = load(repo)["iris"]
    assert entry.failed == {"v2": "ValueError: the estimator has no n_features_in_; fit it before saving"}
    assert list(entry.versions) == ["v1"]


def test_an_estimator_without_predict_fails(
    repo: Path, iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    write_skops(repo, "iris", "v1", StandardScaler().fit(iris[0]))
    entry = load(repo)["iris"]
    assert entry.failed == {"v1": "ValueError: the estimator has no predict method"}
    assert not entry.servable


def test_an_untrusted_type_is_refused_at_load(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, "iris", "v2", RaisingModel())
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v1"]
    reason = entry.failed["v2"]
    assert reason.startswith("UntrustedTypesFoundException: ")
    assert RAISING_TYPE in reason
    assert "cannot predict" not in reason  # refused before anything ran


def test_a_configured_trusted_type_loads_and_then_fails_its_warm_up(
    repo: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, "iris", "v2", RaisingModel())
    entry = load(repo, trusted_types=(RAISING_TYPE,))["iris"]
    assert entry.failed == {"v2": "RuntimeError: this model cannot predict"}
    assert list(entry.versions) == ["v1"]


def test_the_trusted_types_are_the_tree_structures_only() -> None:
    assert set(TRUSTED_TYPES) == {
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }


def test_warm_up_failures_are_recorded(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_joblib(repo, "iris", "v2", RaisingModel())
    write_joblib(repo, "iris", "v3", TwoAnswersModel())
    entry = load(repo, trusted_repository=True)["iris"]
    assert list(entry.versions) == ["v1"]
    assert entry.failed == {
        "v2": "RuntimeError: this model cannot predict",
        "v3": "ValueError: warm-up predict returned shape (2,) for one row",
    }
    # A failed newer version does not become stable.
    assert entry.stable == "v1"


def test_model_joblib_is_refused_in_an_untrusted_repository(repo: Path, logistic: LogisticRegression) -> None:
    write_joblib(repo, "iris", "v1", logistic)
    entry = load(repo)["iris"]
    assert entry.versions == {}
    assert entry.failed == {
        "v1": "PermissionError: model.joblib is only loaded from a trusted repository "
        "(FASTSERVE_TRUSTED_REPOSITORY=1)"
    }
    assert not entry.servable


def test_model_joblib_loads_in_a_trusted_repository(
    repo: Path, iris: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], logistic: LogisticRegression
) -> None:
    write_joblib(repo, "iris", "v1", logistic)
    entry = load(repo, trusted_repository=True)["iris"]
    assert entry.failed == {}
    loaded = entry.versions["v1"]
    assert loaded.artifact == "model.joblib"
    assert loaded.n_features == 4
    np.testing.assert_array_equal(loaded.estimator.predict(iris[0]), logistic.predict(iris[0]))


def test_model_skops_is_preferred_over_model_joblib(
    repo: Path, logistic: LogisticRegression, tree: DecisionTreeClassifier
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_joblib(repo, "iris", "v1", tree)
    loaded = load(repo, trusted_repository=True)["iris"].versions["v1"]
    assert loaded.artifact == "model.skops"
    assert isinstance(loaded.estimator, LogisticRegression)


def test_a_model_skops_symlink_to_outside_is_refused(
    repo: Path, outside: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    target = write_skops(outside, "iris", "v2", logistic)
    (repo / "iris" / "v2").mkdir()
    (repo / "iris" / "v2" / "model.skops").symlink_to(target)
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v1"]
    assert entry.failed == {"v2": "PermissionError: model.skops resolves outside the repository"}


def test_a_model_joblib_symlink_to_outside_is_refused_even_when_trusted(
    repo: Path, outside: Path, logistic: LogisticRegression
) -> None:
    target = write_joblib(outside, "iris", "v1", logistic)
    (repo / "iris" / "v1").mkdir(parents=True)
    (repo / "iris" / "v1" / "model.joblib").symlink_to(target)
    entry = load(repo, trusted_repository=True)["iris"]
    assert entry.failed == {"v1": "PermissionError: model.joblib resolves outside the repository"}


def test_a_version_directory_symlinked_to_outside_is_refused(
    repo: Path, outside: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(outside, "iris", "v2", logistic)
    (repo / "iris" / "v2").symlink_to(outside / "iris" / "v2", target_is_directory=True)
    entry = load(repo)["iris"]
    assert list(entry.versions) == ["v1"]
    assert entry.failed == {"v2": "PermissionError: model.skops resolves outside the repository"}


def test_a_model_directory_symlinked_to_outside_is_refused(
    repo: Path, outside: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(outside, "stolen", "v1", logistic)
    write_skops(outside, "stolen", "v2", logistic)
    (repo / "stolen").symlink_to(outside / "stolen", target_is_directory=True)
    models = load(repo)
    assert models["iris"].servable
    stolen = models["stolen"]
    assert stolen.versions == {}
    assert stolen.failed == {
        "v1": "PermissionError: model.skops resolves outside the repository",
        "v2": "PermissionError: model.skops resolves outside the repository",
    }
    assert stolen.stable is None
    assert not stolen.servable


def test_a_model_toml_symlinked_to_outside_is_refused(
    repo: Path, outside: Path, logistic: LogisticRegression
) -> None:
    # "Only real files under the root's real path are opened": model.toml included.
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, "iris", "v2", logistic)
    (outside / "model.toml").write_text('stable = "v1"\n')
    (repo / "iris" / "model.toml").symlink_to(outside / "model.toml")
    with pytest.raises(ConfigError, match=r"iris/model\.toml.*outside the repository"):
        load(repo)


def test_failure_reasons_never_carry_a_path(
    repo: Path, tmp_path: Path, outside: Path, logistic: LogisticRegression
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    (repo / "iris" / "v2").mkdir()
    (repo / "iris" / "v2" / "model.skops").write_bytes(b"PK\x03\x04 broken zip")
    write_skops(repo, "iris", "v3", LogisticRegression())
    write_skops(repo, "iris", "v4", RaisingModel())
    (repo / "iris" / "v5").mkdir()
    (repo / "iris" / "v5" / "model.skops").symlink_to(write_skops(outside, "x", "v1", logistic))
    (repo / "iris" / "v6").symlink_to(outside / "x" / "v1", target_is_directory=True)
    (repo / "iris" / "v7").mkdir()
    (repo / "iris" / "v7" / "model.joblib").write_bytes(b"\x80\x04 not a pickle")
    (repo / "iris" / "v8").mkdir()
    entry = load(repo)["iris"]
    trusted = load(repo, trusted_repository=True)["iris"]
    reasons = list(entry.failed.values()) + list(trusted.failed.values())
    assert sorted(entry.failed) == ["v2", "v3", "v4", "v5", "v6", "v7", "v8"]
    assert sorted(trusted.failed) == ["v2", "v3", "v4", "v5", "v6", "v7", "v8"]
    for reason in reasons:
        assert reason
        assert str(tmp_path) not in reason
        assert str(tmp_path.resolve()) not in reason
        assert "Traceback" not in reason
        assert os.sep + "repo" not in reason


def test_a_model_with_no_loadable_version_is_not_servable(repo: Path) -> None:
    (repo / "iris" / "v1").mkdir(parents=True)
    (repo / "iris" / "v1" / "model.skops").write_bytes(b"garbage")
    (repo / "empty").mkdir()
    models = load(repo)
    assert models["iris"].stable is None
    assert not models["iris"].servable
    assert list(models["iris"].failed) == ["v1"]
    assert models["empty"].versions == {}
    assert models["empty"].failed == {}
    assert not models["empty"].servable


def test_a_stable_that_failed_is_not_servable(repo: Path, logistic: LogisticRegression) -> None:
    (repo / "iris" / "v1").mkdir(parents=True)
    (repo / "iris" / "v1" / "model.skops").write_bytes(b"garbage")
    write_skops(repo, "iris", "v2", logistic)
    write_toml(repo, "iris", 'stable = "v1"\n')
    entry = load(repo)["iris"]
    assert entry.stable == "v1"
    assert list(entry.versions) == ["v2"]
    assert not entry.servable


def test_a_stable_that_does_not_exist_is_not_servable(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_toml(repo, "iris", 'stable = "v9"\n')
    entry = load(repo)["iris"]
    assert entry.stable == "v9"
    assert not entry.servable


# --- model.toml ---------------------------------------------------------------------------------


def test_per_model_overrides_land_in_the_entry(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_skops(repo, "plain", "v1", logistic)
    write_toml(
        repo,
        "iris",
        'stable = "v1"\n\n[batching]\nmax_batch_rows = 8\nbatch_window_ms = 0\n\n'
        "[limits]\nmax_rows_per_request = 10\nbody_timeout_ms = 250.5\n",
    )
    server_batching = BatchSettings(max_batch_rows=32, queue_timeout_ms=500.0)
    server_limits = LimitSettings(max_body_bytes=4096)
    models = load(repo, batching=server_batching, limits=server_limits)
    assert models["iris"].batching == BatchSettings(
        max_batch_rows=8, batch_window_ms=0.0, max_queue_depth=1024, queue_timeout_ms=500.0
    )
    assert models["iris"].limits == LimitSettings(
        max_body_bytes=4096, max_rows_per_request=10, body_timeout_ms=250.5
    )
    assert models["plain"].batching == server_batching
    assert models["plain"].limits == server_limits


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('stable = "v1\n', r"^iris/model\.toml: "),
        ("stable = v1\n", r"^iris/model\.toml: "),
        ("[batching\nmax_batch_rows = 8\n", r"^iris/model\.toml: "),
        ('stable = "v1"\ncanary = 0.5\n', r"^iris/model\.toml: unknown keys \['canary'\]$"),
        ("[batching]\nmax_rows = 8\n", r"^iris/model\.toml: unknown setting 'max_rows'$"),
        ("[limits]\nmax_batch_rows = 8\n", r"^iris/model\.toml: unknown setting 'max_batch_rows'$"),
        (
            '[batching]\nmax_batch_rows = "8"\n',
            r"^iris/model\.toml: max_batch_rows = '8' is not a valid int$",
        ),
        (
            "[batching]\nmax_batch_rows = 8.0\n",
            r"^iris/model\.toml: max_batch_rows = 8\.0 is not a valid int$",
        ),
        (
            "[batching]\nmax_batch_rows = true\n",
            r"^iris/model\.toml: max_batch_rows = True is not a valid int$",
        ),
        (
            "[limits]\nbody_timeout_ms = false\n",
            r"^iris/model\.toml: body_timeout_ms = False is not a valid float$",
        ),
    ],
    ids=[
        "unterminated-string",
        "bare-word",
        "unclosed-table",
        "unknown-key",
        "unknown-batching-key",
        "batching-key-in-limits",
        "string-for-int",
        "float-for-int",
        "bool-for-int",
        "bool-for-float",
    ],
)
def test_a_bad_model_toml_is_a_config_error(
    repo: Path, logistic: LogisticRegression, text: str, match: str
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_toml(repo, "iris", text)
    with pytest.raises(ConfigError, match=match):
        load(repo)


def test_an_out_of_range_override_is_a_config_error(repo: Path, logistic: LogisticRegression) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_toml(repo, "iris", "[batching]\nmax_queue_depth = 0\n")
    with pytest.raises(ConfigError, match=r"must be at least 1"):
        load(repo)


@pytest.mark.parametrize(
    ("text", "key"),
    [("batching = 64\n", "batching"), ('limits = "none"\n', "limits"), ("stable = 2\n", "stable")],
)
def test_a_model_toml_value_of_the_wrong_kind_is_a_config_error(
    repo: Path, logistic: LogisticRegression, text: str, key: str
) -> None:
    write_skops(repo, "iris", "v1", logistic)
    write_toml(repo, "iris", text)
    with pytest.raises(ConfigError, match=rf"iris/model\.toml.*{key}"):
        load(repo)
