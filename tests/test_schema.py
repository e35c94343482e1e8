"""schema: a version's input, settled from the estimator, model.toml's [input] and its example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fastserve.errors import ConfigError
from fastserve.schema import Column, InputSchema, Kind, infer_schema, read_example, warm_up_rows

WHERE = "churn/model.toml"


def churn_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(18, 80, n),
            "monthly": rng.uniform(10, 100, n),
            "plan": rng.choice(["basic", "pro", "team"], n),
            "region": pd.Categorical(rng.choice(["apac", "eu", "us"], n)),
            "autopay": rng.random(n) < 0.5,
        }
    )


def churn_labels(frame: pd.DataFrame) -> np.ndarray[Any, Any]:
    return np.where((frame["monthly"] > 60) & ~frame["autopay"], "churn", "stay")


@pytest.fixture(scope="module")
def churn() -> Pipeline:
    frame = churn_frame()
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "monthly"]),
            ("plan", OneHotEncoder(handle_unknown="error"), ["plan"]),
            ("region", OneHotEncoder(handle_unknown="ignore"), ["region"]),
            ("autopay", "passthrough", ["autopay"]),
        ]
    )
    return Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))]).fit(
        frame, churn_labels(frame)
    )


def kinds(schema: InputSchema) -> dict[str, str | None]:
    return {c.name: c.kind for c in schema.columns}


def test_a_model_fitted_on_an_array_is_positional() -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    schema = infer_schema(LogisticRegression().fit(x, x[:, 0] > 0), {}, None, WHERE)
    assert schema == InputSchema(3)
    assert not schema.named and schema.buffer_width == 3 and not schema.needs_frame


def test_a_numeric_model_fitted_on_a_dataframe_takes_names_mapped_to_positions() -> None:
    frame = churn_frame()[["age", "monthly"]]
    schema = infer_schema(
        RandomForestClassifier(n_estimators=2).fit(frame, frame["age"] > 40), {}, None, WHERE
    )
    assert kinds(schema) == {"age": Kind.NUMBER, "monthly": Kind.NUMBER}
    assert not schema.needs_frame and schema.buffer_width == 2


def test_a_pipeline_shows_each_column_through_its_first_step(churn: Pipeline) -> None:
    with pytest.raises(ValueError, match=r"column 'autopay': its kind is not known from the model; add"):
        infer_schema(churn, {}, None, WHERE)
    schema = infer_schema(churn, {"autopay": "bool"}, None, WHERE)
    assert kinds(schema) == {
        "age": Kind.NUMBER,
        "monthly": Kind.NUMBER,
        "plan": Kind.STRING,
        "region": Kind.STRING,  # an encoder shows the values, not the DataFrame's dtype
        "autopay": Kind.BOOL,
    }
    assert schema.columns[2].categories == ("basic", "pro", "team")
    assert schema.needs_frame
    # Numbers and bools in the ring buffer; the strings beside it.
    assert [c.name for c in schema.numeric_columns] == ["age", "monthly", "autopay"]
    assert schema.buffer_width == 3


def test_model_toml_settles_and_overrides_kinds(churn: Pipeline) -> None:
    declared = {"autopay": "bool", "region": {"kind": "category", "categories": ["apac", "eu", "us"]}}
    schema = infer_schema(churn, declared, None, WHERE)
    region = schema.columns[3]
    assert region == Column("region", Kind.CATEGORY, False, ("apac", "eu", "us"))


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            {"autopay": "boolean"},
            r"\[input\] autopay = 'boolean' is not one of number, string, category, bool",
        ),
        ({"nope": "number"}, r"\[input\] names 'nope', which the model was not fitted on"),
        ({"autopay": {"kind": "bool", "size": 1}}, r"must be a kind, or a table"),
        ({"autopay": {"kind": "bool", "nullable": "yes"}}, r"nullable must be true or false"),
    ],
)
def test_a_wrong_input_table_is_a_config_error(
    churn: Pipeline, declared: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        infer_schema(churn, declared, None, WHERE)


def test_an_input_table_for_a_positional_model_is_a_config_error() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ConfigError, match="fitted without names"):
        infer_schema(LogisticRegression().fit(x + [[0, 1]] * 4, [0, 1, 0, 1]), {"a": "number"}, None, WHERE)


def test_the_example_settles_kinds_and_nulls(churn: Pipeline) -> None:
    example = [
        {"age": 31, "monthly": 49.5, "plan": "pro", "region": "eu", "autopay": True},
        {"age": 40, "monthly": None, "plan": "team", "region": "us", "autopay": False},
    ]
    schema = infer_schema(churn, {}, example, WHERE)
    assert kinds(schema)["autopay"] == Kind.BOOL
    assert schema.columns[1].nullable and not schema.columns[0].nullable
    assert warm_up_rows(schema, example) == example


def test_an_example_that_misses_a_column_is_refused(churn: Pipeline) -> None:
    with pytest.raises(ValueError, match=r"input_example.json row 0: missing \['autopay'\]"):
        infer_schema(churn, {}, [{"age": 1, "monthly": 2.0, "plan": "pro", "region": "eu"}], WHERE)


def test_an_imputer_allows_nulls() -> None:
    frame = churn_frame()[["age", "monthly"]]
    model = make_pipeline(SimpleImputer(), LogisticRegression()).fit(frame, frame["age"] > 40)
    schema = infer_schema(model, {}, None, WHERE)
    assert all(c.nullable and c.kind is Kind.NUMBER for c in schema.columns)


def test_hist_gradient_boosting_categories_need_a_frame() -> None:
    frame = churn_frame()[["age", "region"]]
    model = HistGradientBoostingClassifier(max_iter=5, categorical_features="from_dtype")
    schema = infer_schema(model.fit(frame, frame["age"] > 40), {}, None, WHERE)
    assert kinds(schema) == {"age": Kind.NUMBER, "region": Kind.CATEGORY}
    assert schema.needs_frame


def test_the_warm_up_row_takes_the_first_fitted_category(churn: Pipeline) -> None:
    schema = infer_schema(churn, {"autopay": "bool"}, None, WHERE)
    assert warm_up_rows(schema, None) == [
        {"age": 0.0, "monthly": 0.0, "plan": "basic", "region": "apac", "autopay": False}
    ]
    assert warm_up_rows(InputSchema(3), None) is None


def test_read_example_takes_one_row_or_a_list(tmp_path: Path) -> None:
    version = tmp_path / "m" / "v1"
    version.mkdir(parents=True)
    assert read_example(version, tmp_path) is None
    (version / "input_example.json").write_text(json.dumps({"a": 1}))
    assert read_example(version, tmp_path) == [{"a": 1}]
    (version / "input_example.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a row as an object"):
        read_example(version, tmp_path)


def test_an_example_symlinked_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("[]")
    repo = tmp_path / "repo"
    version = repo / "m" / "v1"
    version.mkdir(parents=True)
    (version / "input_example.json").symlink_to(outside)
    with pytest.raises(PermissionError, match="outside the repository"):
        read_example(version, repo.resolve())
