"""What a version can answer, and one batch's answers: predict, and the estimator's scores.

A request names its ``outputs`` (predictions only when it names none); a batch computes the
union of what its requests asked for, once, and each request gets the slices it asked for.
Where the version predicts compiled (``trees.py``), its probabilities come from the same walk
of the trees, never from scikit-learn's call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from fastserve.errors import UnknownOutput

# The estimator methods a request may name, in the order an answer lists them.
OUTPUTS = ("predict", "predict_proba", "predict_log_proba", "decision_function")
PREDICT_ONLY = frozenset({"predict"})

# One batch's outputs: the rows (an ndarray, or a DataFrame) and the names -> an array each.
Compute = Callable[[Any, Collection[str]], dict[str, np.ndarray[Any, Any]]]


class WrongShape(ValueError):
    """An output without one answer per row: the model is not what it claims."""


def estimator_outputs(estimator: Any) -> tuple[str, ...]:
    """The outputs ``estimator`` has (a pipeline has those of its last step)."""
    return tuple(name for name in OUTPUTS if callable(getattr(estimator, name, None)))


def by_methods(estimator: Any) -> Compute:
    """Each output by the estimator's own method."""

    def compute(X: Any, names: Collection[str]) -> dict[str, np.ndarray[Any, Any]]:
        return {name: np.asarray(getattr(estimator, name)(X)) for name in names}

    return compute


class Outputs:
    """The outputs of one version, and how its predict thread computes them for a batch."""

    def __init__(self, names: Sequence[str], compute: Compute) -> None:
        self.names = tuple(name for name in OUTPUTS if name in names)
        self._compute = compute
        self._known = frozenset(self.names)

    def check(self, requested: list[str] | None) -> frozenset[str]:
        """The outputs a request asked for, or ``UnknownOutput`` listing those the version has."""
        if requested is None:
            return PREDICT_ONLY
        wanted = frozenset(requested)
        if not wanted <= self._known:
            unknown = sorted(wanted - self._known)
            raise UnknownOutput(f"no output {unknown[0]!r} for this version; it has {', '.join(self.names)}")
        return wanted

    def __call__(self, X: Any, names: Collection[str]) -> dict[str, list[Any]]:
        """The outputs ``names`` for every row of ``X``, as lists (one value or row per row)."""
        n_rows = len(X)
        out = {}
        if "predict_log_proba" in names:
            # A probability of 0 has a log-probability of -inf: an answer, not a fault.
            with np.errstate(divide="ignore"):
                computed = self._compute(X, names)
        else:
            computed = self._compute(X, names)
        for name, values in computed.items():
            array = np.asarray(values)
            if array.shape[:1] != (n_rows,):
                rows = "one row" if n_rows == 1 else f"{n_rows} rows"
                raise WrongShape(f"{name} returned shape {array.shape} for {rows}")
            out[name] = array.tolist()
        return out
