"""predict_process: a version's predict in its own process at nice 19, over pipes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression

from fastserve.config import BatchSettings, LimitSettings, RepositorySettings
from fastserve.predict_process import PredictProcess, PredictProcessDied
from fastserve.registry import PROCESS_ABOVE_MS, Registry
from fastserve.repository import TRUSTED_TYPES

from conftest import status_of, write_joblib_model
from fake_models import BusyModel, SleepyModel, Unruly

TESTS = Path(__file__).parent


@pytest.fixture
def logistic(tmp_path: Path) -> tuple[LogisticRegression, Path, np.ndarray[Any, Any]]:
    """A model the compiled predict does not take, saved with skops into a repository."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    estimator = LogisticRegression().fit(x, (x[:, 0] + x[:, 1] > 0).astype(int))
    target = tmp_path / "repo" / "m" / "v1" / "model.skops"
    target.parent.mkdir(parents=True)
    sio.dump(estimator, target)
    return estimator, target, x


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, waiting for a parent that is itself gone to be reaped
            return True
        time.sleep(0.05)
    return False


def test_answers_match_the_estimator_from_a_child_at_nice_19(logistic: Any) -> None:
    estimator, artifact, x = logistic
    predict = PredictProcess(artifact, TRUSTED_TYPES, 4)
    try:
        got = predict(x)
        np.testing.assert_array_equal(got, estimator.predict(x), strict=True)
        pid = predict.pid
        assert pid is not None and pid != os.getpid()
        assert parent_of(pid) == os.getpid() and nice_of(pid) == 19
        with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
            predict(np.zeros((2, 3)))
        assert predict.pid == pid  # a refused call does not touch the child
    finally:
        predict.close()
    assert gone(pid)
    assert predict.pid is None


@pytest.fixture
def children_import_fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """A joblib model needs its class importable in the child: fake_models, from here."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)


@pytest.fixture
def unruly(tmp_path: Path, children_import_fake_models: None) -> Iterator[PredictProcess]:
    artifact = write_joblib_model(tmp_path / "repo", "m", "v1", Unruly(2))
    predict = PredictProcess(artifact, (), 2)
    yield predict
    predict.close()


def test_what_the_model_prints_does_not_reach_the_pipe(unruly: PredictProcess) -> None:
    rows = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    for _ in range(3):
        assert unruly(rows).tolist() == [1, 2, 3]


def test_a_predict_that_raises_fails_its_batch_and_the_child_goes_on(unruly: PredictProcess) -> None:
    assert unruly(np.array([[5.0, 0.0]])).tolist() == [5]
    pid = unruly.pid
    with pytest.raises(RuntimeError, match="ValueError: first feature above 1000"):
        unruly(np.array([[1001.0, 0.0]]))
    assert unruly(np.array([[6.0, 0.0]])).tolist() == [6]
    assert unruly.pid == pid


def test_a_child_that_dies_fails_its_batch_and_the_next_batch_starts_another(unruly: PredictProcess) -> None:
    assert unruly(np.array([[5.0, 0.0]])).tolist() == [5]
    first = unruly.pid
    assert first is not None
    with pytest.raises(PredictProcessDied):
        unruly(np.array([[-1.0, 0.0]]))
    assert unruly.pid is None and gone(first)
    assert unruly(np.array([[7.0, 0.0]])).tolist() == [7]
    assert unruly.pid not in (None, first)


# 0.1 ms of GIL-holding CPU a row: 6.4 ms for the default batch of 64 rows, 0.8 ms for 8.
BUSY_PER_ROW_S = 0.0001
assert 64 * BUSY_PER_ROW_S * 1000 > 2 * PROCESS_ABOVE_MS > 4 * 8 * BUSY_PER_ROW_S * 1000


def load_paths(repo: Path, predict_process: str) -> dict[str, str]:
    """Each model's v1 predict path, from a Registry with ``predict_process`` (its children closed)."""
    settings = RepositorySettings(trusted_repository=True, predict_process=predict_process)
    models = Registry(repo, settings, BatchSettings(), LimitSettings()).load_all()
    assert all(not entry.failed for entry in models.values()), {n: e.failed for n, e in models.items()}
    paths = {}
    for name, entry in models.items():
        loaded = entry.versions["v1"]
        paths[name] = loaded.predict_path
        assert loaded.predict(np.array([[3.0, 0.0]])).tolist() == [3]
        loaded.close()
    return paths


@pytest.fixture
def mixed_repo(tmp_path: Path, children_import_fake_models: None) -> Path:
    """Models whose full batch holds the thread long (busy), briefly (small-batch: the same model
    with 8-row batches), or not at all (sleepy: the same wall time, asleep)."""
    repo = tmp_path / "repo"
    write_joblib_model(repo, "busy", "v1", BusyModel(2, BUSY_PER_ROW_S))
    write_joblib_model(
        repo, "small-batch", "v1", BusyModel(2, BUSY_PER_ROW_S), "[batching]\nmax_batch_rows = 8\n"
    )
    write_joblib_model(repo, "sleepy", "v1", SleepyModel(2, delay_s=0.0064))
    return repo


def test_auto_sends_a_version_to_a_process_where_its_full_batch_holds_the_gil(mixed_repo: Path) -> None:
    assert RepositorySettings().predict_process == "auto"
    paths = load_paths(mixed_repo, "auto")
    assert paths == {"busy": "process", "small-batch": "scikit-learn", "sleepy": "scikit-learn"}


@pytest.mark.parametrize(("setting", "path"), [("on", "process"), ("off", "scikit-learn")])
def test_on_and_off_overrule_the_measure(mixed_repo: Path, setting: str, path: str) -> None:
    assert set(load_paths(mixed_repo, setting).values()) == {path}


def predict_children(repo: Path) -> list[int]:
    """Pids of the predict processes serving a version of ``repo``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fastserve.predict_process" in argv and any(str(repo).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


@pytest.mark.e2e
def test_the_server_serves_through_a_child_that_dies_with_its_worker(serve: Any, logistic: Any) -> None:
    estimator, artifact, x = logistic
    repo = artifact.parents[2]
    server = serve(repo, predict_process="on")
    rows = x[:20]
    answer = httpx.post(f"{server.url}/predict/m", json={"instances": rows.tolist()}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == estimator.predict(rows).tolist()
    assert status_of(server)["models"]["m"]["versions"]["v1"]["predict"] == "process"
    [child] = [pid for pid in predict_children(repo) if not gone(pid, within_s=0)]
    assert nice_of(child) == 19
    worker = parent_of(child)
    assert worker != server.process.pid  # Granian's worker started it, not the main process
    os.kill(worker, signal.SIGKILL)
    assert gone(child), "the predict process outlived its worker"


@pytest.mark.e2e
def test_by_default_the_server_predicts_in_a_process_only_where_a_batch_holds_the_gil_long(
    serve: Any, tmp_path: Path
) -> None:
    repo = tmp_path / "served"
    write_joblib_model(repo, "busy", "v1", BusyModel(2, BUSY_PER_ROW_S))
    write_joblib_model(repo, "light", "v1", BusyModel(2, 0.0))
    server = serve(repo, trusted_repository=1)
    models = status_of(server)["models"]
    assert {name: models[name]["versions"]["v1"]["predict"] for name in models} == {
        "busy": "process",
        "light": "scikit-learn",
    }
    body = {"instances": [[4.0, 0.0], [5.0, 1.0]]}
    for name in models:
        answer = httpx.post(f"{server.url}/predict/{name}", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [4, 5]
    [child] = [pid for pid in predict_children(repo) if not gone(pid, within_s=0)]
    assert nice_of(child) == 19
