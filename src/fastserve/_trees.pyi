"""Types of the compiled tree predict; ``trees.py`` documents its use."""

from typing import Any, final

import numpy as np
from numpy.typing import ArrayLike

@final
class CompiledForest:
    def __init__(
        self,
        left: ArrayLike,
        right: ArrayLike,
        feature: ArrayLike,
        threshold: ArrayLike,
        missing_go_to_left: ArrayLike,
        value: ArrayLike,
        offsets: ArrayLike,
        n_features: int,
        *,
        classifier: bool,
        average: bool,
    ) -> None: ...
    @property
    def n_trees(self) -> int: ...
    @property
    def n_nodes(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def n_values(self) -> int: ...
    @property
    def classifier(self) -> bool: ...
    @property
    def average(self) -> bool: ...
    def predict(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None: ...
    def predict_with_proba(
        self, X: np.ndarray[Any, Any]
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None: ...

@final
class CompiledBoosting:
    def __init__(
        self,
        left: ArrayLike,
        right: ArrayLike,
        feature: ArrayLike,
        threshold: ArrayLike,
        missing_go_to_left: ArrayLike,
        value: ArrayLike,
        offsets: ArrayLike,
        output: ArrayLike,
        baseline: ArrayLike,
        n_features: int,
    ) -> None: ...
    @property
    def n_trees(self) -> int: ...
    @property
    def n_nodes(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def n_outputs(self) -> int: ...
    def predict(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None: ...
