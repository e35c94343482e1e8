"""The benchmark's model files: RF-300 and a trivial LogisticRegression, trained on digits,
and the demo's churn pipeline (``fastserve.demo.write_churn_model``, needs pandas).

The baselines load these; fastserve gets the same estimators as a model repository
(``<repo>/digits/v1/model.skops``). Files are cached: training RF-300 takes seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

MODELS_DIR = Path(__file__).parent / "results" / "models"
N_FEATURES = 64


def _estimators() -> dict[str, Any]:
    return {
        "rf300": RandomForestClassifier(n_estimators=300, random_state=0),
        # Unscaled pixels (0..16): lbfgs needs more than its default 100 iterations to converge.
        "logreg": LogisticRegression(max_iter=2000),
    }


def model_path(name: str, directory: Path = MODELS_DIR) -> Path:
    """Path of ``name``'s skops file (``rf300`` or ``logreg``), training it on first use."""
    target = directory / f"{name}.skops"
    if not target.exists():
        estimator = _estimators()[name]
        x, y = load_digits(return_X_y=True)
        estimator.fit(x, y)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        sio.dump(estimator, partial)
        partial.replace(target)
    return target


def repository(name: str, directory: Path = MODELS_DIR) -> Path:
    """A one-model fastserve repository serving ``name`` as ``digits`` v1 (stable)."""
    root = directory / f"repo-{name}"
    target = root / "digits" / "v1" / "model.skops"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(model_path(name, directory).read_bytes())
        (root / "digits" / "model.toml").write_text('stable = "v1"\n')
    return root


def churn_repository(directory: Path = MODELS_DIR) -> Path:
    """A fastserve repository holding only the demo's churn pipeline (``churn/v1``), written once."""
    from fastserve.demo import write_churn_model

    root = directory / "repo-churn"
    if not (root / "churn" / "v1" / "model.skops").exists():
        write_churn_model(root)
    return root


def churn_model_path(directory: Path = MODELS_DIR) -> Path:
    """The churn pipeline's skops file (see ``churn_repository``)."""
    return churn_repository(directory) / "churn" / "v1" / "model.skops"


def load(path: Path | str) -> object:
    """Load a skops file we wrote ourselves: every type in it is trusted."""
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["rf300", "logreg"])
    parser.add_argument("--directory", type=Path, default=MODELS_DIR)
    args = parser.parse_args()
    for name in args.names:
        print(model_path(name, args.directory))


if __name__ == "__main__":
    main()
