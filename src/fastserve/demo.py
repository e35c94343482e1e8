"""The demo repository: two real versions of a digits classifier, trained on bundled data.

v1 is a 300-tree random forest (slow per call, so batching matters), v2 a histogram
gradient-boosting model: they disagree on some rows, so version comparisons are real.
"""

from __future__ import annotations

from pathlib import Path

import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

DEMO_MODEL = "digits"

_MODEL_TOML = """\
# Served by `POST /predict/digits`: the stable version, until a deployment moves it.
stable = "v1"

# Per-model overrides of the server's settings, for example:
# [batching]
# max_batch_rows = 64
# batch_window_ms = 2
"""


def write_demo_repository(root: Path) -> Path:
    """Train both versions and write ``root/digits/{v1,v2}/model.skops`` and ``model.toml``."""
    x, y = load_digits(return_X_y=True)
    versions = {
        "v1": RandomForestClassifier(n_estimators=300, random_state=0),
        "v2": HistGradientBoostingClassifier(max_iter=100, random_state=0),
    }
    model_dir = root / DEMO_MODEL
    for version, estimator in versions.items():
        estimator.fit(x, y)
        target = model_dir / version / "model.skops"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        sio.dump(estimator, partial)
        partial.replace(target)  # a crash mid-write never leaves a half file to load
    (model_dir / "model.toml").write_text(_MODEL_TOML)
    return root
