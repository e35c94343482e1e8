"""Estimators with controlled behaviour, for the servers the end-to-end tests start.

They are saved with joblib into a trusted repository, so the server process imports this
module by name (the tests put this folder on its PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


class SleepyModel:
    """Predicts the row's first feature (as an int) after sleeping per call: a slow model."""

    def __init__(self, n_features: int, delay_s: float, warmup_delay_s: float = 0.0) -> None:
        self.n_features_in_ = n_features
        self.delay_s = delay_s
        self.warmup_delay_s = warmup_delay_s
        self.calls = 0

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.calls += 1
        time.sleep(self.warmup_delay_s if self.calls == 1 else self.delay_s)
        return rows[:, 0].astype(np.int64)


class BusyModel:
    """Predicts the row's first feature (as an int) after spinning ``cpu_s_per_row`` of its
    thread's CPU per row in Python, holding the GIL throughout: a GIL-heavy model."""

    def __init__(self, n_features: int, cpu_s_per_row: float) -> None:
        self.n_features_in_ = n_features
        self.cpu_s_per_row = cpu_s_per_row

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        until = time.thread_time() + self.cpu_s_per_row * len(rows)
        while time.thread_time() < until:
            pass
        return rows[:, 0].astype(np.int64)


class FailOnNegative:
    """Echoes the first feature, and fails the whole call when any row's first feature is < 0."""

    def __init__(self, n_features: int) -> None:
        self.n_features_in_ = n_features

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if (rows[:, 0] < 0).any():
            raise RuntimeError("negative input: the model cannot predict this batch")
        return rows[:, 0].astype(np.int64)


class BreaksOnNegative:
    """Echoes the first feature until it sees a negative one; from then on every call raises:
    a model that breaks while it serves (its warm-up rows fail too)."""

    def __init__(self, n_features: int) -> None:
        self.n_features_in_ = n_features
        self.broken = False

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.broken or (rows[:, 0] < 0).any():
            self.broken = True
            raise RuntimeError("the model is broken")
        return rows[:, 0].astype(np.int64)


class EchoUnless:
    """Echoes the first feature, except that rows whose first feature is ``odd_one_out`` get -1:
    a candidate that disagrees with an echoing stable on exactly the rows a test chooses."""

    def __init__(self, n_features: int, odd_one_out: float, delay_s: float = 0.0) -> None:
        self.n_features_in_ = n_features
        self.odd_one_out = odd_one_out
        self.delay_s = delay_s

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        time.sleep(self.delay_s)
        first = rows[:, 0].astype(np.int64)
        return np.where(rows[:, 0] == self.odd_one_out, -1, first)


class SlowToWarmInOneProcess:
    """Echoes the first feature. The first process to warm it up sleeps ``delay_s`` doing so (a
    marker file decides which): the workers of one server become ready at different times."""

    def __init__(self, n_features: int, marker: str, delay_s: float) -> None:
        self.n_features_in_ = n_features
        self.marker = marker
        self.delay_s = delay_s
        self.warmed = False

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if not self.warmed:
            self.warmed = True
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                time.sleep(self.delay_s)
            except FileExistsError:
                pass
        return rows[:, 0].astype(np.int64)


class Unruly:
    """Echoes the first feature and prints to stdout on every call; raises ValueError when a
    first feature is above 1000, and kills its own process when one is negative: what a
    predict process must survive or report."""

    def __init__(self, n_features: int) -> None:
        self.n_features_in_ = n_features

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        print("predicting", len(rows), "rows")  # on stdout, where a careless child replies
        if (rows[:, 0] < 0).any():
            os._exit(3)
        if (rows[:, 0] > 1000).any():
            raise ValueError("first feature above 1000")
        return rows[:, 0].astype(np.int64)


class HoldsOn:
    """Predicts the row's first feature (as an int) after sleeping as many seconds as the batch's
    largest second feature says: a test decides which request holds the model, and how long
    (a long hold is a predict that hangs)."""

    def __init__(self, n_features: int) -> None:
        self.n_features_in_ = n_features

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        time.sleep(float(rows[:, 1].max()))
        return rows[:, 0].astype(np.int64)
