"""The demo repository: two real versions of a digits classifier, trained on bundled data,
and a tabular pipeline on a synthetic churn table.

digits v1 is a 300-tree random forest (slow per call, so batching matters), v2 a histogram
gradient-boosting model: they disagree on some rows, so version comparisons are real.
churn v1 is a scikit-learn Pipeline fitted on a pandas DataFrame of mixed types (numbers,
a string plan, a categorical region, a bool), the kind of model most teams serve.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fastserve.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

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
    """Train both digits versions and write ``root/digits/{v1,v2}/model.skops`` and ``model.toml``;
    and, where pandas is installed (``fastserve[pandas]``), the churn pipeline (``write_churn_model``)."""
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
    if importlib.util.find_spec("pandas") is not None:
        write_churn_model(root)
        (root / CHURN_MODEL / "model.toml").write_text(_CHURN_TOML)
    return root


CHURN_MODEL = "churn"
_CHURN_TOML = """\
stable = "v1"

# The pipeline one-hot encodes region; it was fitted as a pandas categorical. Declared so, each
# batch gets it as one, and a region that is not one of its categories is a 422 naming the row.
[input]
region = "category"
"""
CHURN_ROWS = 4000
CHURN_CLASSES = ("churn", "stay")
# The fitted pipeline's input: a column per name, of the dtype the table has.
CHURN_COLUMNS = {
    "age": "int64",
    "tenure_months": "int64",
    "monthly": "float64",
    "plan": "object",
    "region": "category",
    "autopay": "bool",
}
CHURN_PLANS = ("basic", "pro", "team")
CHURN_REGIONS = ("apac", "eu", "us")
PANDAS_MISSING = "the churn model is trained on a pandas DataFrame: pip install 'fastserve[pandas]'"


def _pandas() -> Any:
    """pandas, the one optional dependency of the churn model; a clear error where it is missing."""
    try:
        import pandas
    except ImportError as exc:
        raise ConfigError(PANDAS_MISSING) from exc
    return pandas


def churn_table(rows: int = CHURN_ROWS, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray[Any, Any]]:
    """A synthetic, seeded customer table and its labels (``"churn"`` / ``"stay"``).

    The label is drawn from a logistic model of the columns, so the relationships are real
    but noisy: churn falls with tenure, with autopay and on the team plan, rises with a bill
    above the plan's base price, and differs a little by region and age. About 44% churn;
    a fitted pipeline gets about 81% right, against 56% for always answering "stay".
    """
    pandas = _pandas()
    rng = np.random.default_rng(seed)
    plan = rng.choice(CHURN_PLANS, size=rows, p=[0.5, 0.35, 0.15])
    region = rng.choice(CHURN_REGIONS, size=rows, p=[0.25, 0.35, 0.4])
    age = rng.integers(18, 81, size=rows)
    tenure = np.minimum(rng.geometric(1 / 20, size=rows) - 1, 72)
    base_price = np.select([plan == "basic", plan == "pro"], [19.0, 49.0], 99.0)
    monthly = np.round(base_price + rng.gamma(2.0, 5.0, size=rows), 2)  # the plan plus add-ons
    autopay = rng.random(rows) < 0.35 + 0.004 * (age - 18)
    logit = (
        1.0
        - 0.12 * tenure
        + 0.06 * (monthly - base_price)
        + 0.02 * monthly
        - 2.0 * autopay
        - 1.5 * (plan == "team")
        + 0.6 * (region == "us")
        - 0.4 * (region == "eu")
        - 0.03 * (age - 45)
    )
    churned = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pandas.DataFrame(
        {
            "age": age.astype(np.int64),
            "tenure_months": tenure.astype(np.int64),
            "monthly": monthly,
            # object, not pandas' own string dtype (the default from pandas 3): what most
            # tables fitted in production hold, and what skops and older pandas read back.
            "plan": pandas.Series(plan, dtype=object),
            "region": pandas.Categorical(region, categories=list(CHURN_REGIONS)),
            "autopay": autopay,
        }
    )
    return frame, np.where(churned, "churn", "stay").astype(object)


def churn_pipeline() -> Pipeline:
    """The churn model, unfitted: scaled numbers, one-hot plan and region, then a logistic regression.

    An unseen plan is an error (the model cannot price it); an unseen region is ignored.
    """
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "tenure_months", "monthly"]),
            ("plan", OneHotEncoder(handle_unknown="error"), ["plan"]),
            ("region", OneHotEncoder(handle_unknown="ignore"), ["region"]),
            ("autopay", "passthrough", ["autopay"]),
        ]
    )
    return Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))])


def churn_examples(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Three rows of the table as JSON objects, one per plan: every plan is seen at warm-up."""
    firsts = [int(np.flatnonzero(frame["plan"].to_numpy() == plan)[0]) for plan in CHURN_PLANS]
    records: list[dict[str, Any]] = frame.iloc[firsts].to_dict(orient="records")
    return records


def write_churn_model(directory: Path) -> Path:
    """Train the churn pipeline and write ``directory/churn/v1/model.skops`` and ``input_example.json``.

    ``directory`` is a model repository. Needs pandas (``fastserve[pandas]``). The model file
    is written last and atomically: where it exists, its example does too.
    """
    frame, labels = churn_table()
    pipeline = churn_pipeline().fit(frame, labels)
    target = directory / CHURN_MODEL / "v1" / "model.skops"
    target.parent.mkdir(parents=True, exist_ok=True)
    example = json.dumps(churn_examples(frame), indent=2) + "\n"
    (target.parent / "input_example.json").write_text(example)
    partial = target.with_suffix(".partial")
    sio.dump(pipeline, partial)
    partial.replace(target)
    return target
