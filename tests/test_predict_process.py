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

from fastserve.predict_process import PredictProcess, PredictProcessDied
from fastserve.registry import TRUSTED_TYPES

from conftest import status_of, write_joblib_model
from fake_models import Unruly

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
def unruly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PredictProcess]:
    # A joblib model needs its class importable in the child: fake_models, from here.
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
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
    server = serve(repo, predict_process=True)
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
