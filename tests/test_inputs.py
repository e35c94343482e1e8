"""inputs: every request form, checked row by row against the schema, into the ring buffer."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from fastserve.codec import PredictRequest, TabularRequest, WireFormat, decode
from fastserve.errors import BadFeatures
from fastserve.inputs import Inputs
from fastserve.queue import RingQueue
from fastserve.schema import Column, InputSchema, Kind

CHURN = InputSchema(
    5,
    (
        Column("age", Kind.NUMBER),
        Column("monthly", Kind.NUMBER, nullable=True),
        Column("plan", Kind.STRING),
        Column("region", Kind.CATEGORY, categories=("apac", "eu", "us")),
        Column("autopay", Kind.BOOL),
    ),
    needs_frame=True,
)
NUMERIC = InputSchema(3, (Column("a", Kind.NUMBER), Column("b", Kind.NUMBER), Column("c", Kind.BOOL)))

ROWS = [
    {"age": 31, "monthly": 49.5, "plan": "pro", "region": "eu", "autopay": True},
    {"age": 52, "monthly": None, "plan": "basic", "region": "us", "autopay": False},
]
NAMES = list(ROWS[0])

# One body per form, each carrying ROWS.
FORMS = {
    "instances as objects": {"instances": ROWS},
    "dataframe_records": {"dataframe_records": ROWS},
    "inputs (columnar)": {"inputs": {name: [row[name] for row in ROWS] for name in NAMES}},
    "dataframe_split": {"dataframe_split": {"columns": NAMES, "data": [list(row.values()) for row in ROWS]}},
    "dataframe_split, other column order": {
        "dataframe_split": {"columns": NAMES[::-1], "data": [list(row.values())[::-1] for row in ROWS]}
    },
    "positional rows": {"instances": [list(row.values()) for row in ROWS]},
}


def queue_for(inputs: Inputs) -> RingQueue:
    return RingQueue(inputs.width, max_batch_rows=16, max_queue_depth=64, timeout_ns=10**9)


def written(inputs: Inputs, request: PredictRequest | TabularRequest) -> tuple[np.ndarray[Any, Any], Any]:
    queue = queue_for(inputs)
    slot = queue.reserve(request.n_rows)
    side = inputs.write(queue, slot, request)
    return queue.rows(slot).copy(), side


@pytest.mark.parametrize("fmt", list(WireFormat))
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_gives_the_same_rows_and_columns(form: str, fmt: WireFormat) -> None:
    encode = msgspec.json.encode if fmt is WireFormat.JSON else msgspec.msgpack.encode
    request = decode(encode(FORMS[form]), fmt, named=True)
    inputs = Inputs(CHURN)
    rows, side = written(inputs, request)
    # age and autopay in the buffer (monthly is nullable, so it goes beside the rows).
    np.testing.assert_array_equal(rows, [[31.0, 1.0], [52.0, 0.0]])
    assert side == {"monthly": [49.5, None], "plan": ["pro", "basic"], "region": ["eu", "us"]}


def test_one_row_as_an_object() -> None:
    rows, side = written(Inputs(CHURN), TabularRequest(features=ROWS[0]))
    np.testing.assert_array_equal(rows, [[31.0, 1.0]])
    assert side == {"monthly": [49.5], "plan": ["pro"], "region": ["eu"]}


def test_a_batch_becomes_a_dataframe_in_the_fitted_order_and_dtypes() -> None:
    inputs = Inputs(CHURN)
    first = written(inputs, TabularRequest(instances=ROWS))
    second = written(inputs, TabularRequest(features=ROWS[0]))
    frame = inputs.frame(np.vstack([first[0], second[0]]), [first[1], second[1]])
    assert list(frame.columns) == NAMES
    assert frame["age"].tolist() == [31.0, 52.0, 31.0]
    assert frame["monthly"].isna().tolist() == [False, True, False]
    assert frame["autopay"].dtype == bool and frame["autopay"].tolist() == [True, False, True]
    assert isinstance(frame["region"].dtype, pd.CategoricalDtype)
    assert list(frame["region"].cat.categories) == ["apac", "eu", "us"]
    assert frame["plan"].tolist() == ["pro", "basic", "pro"]


def test_a_numeric_named_version_takes_names_in_any_order_into_its_positions() -> None:
    inputs = Inputs(NUMERIC)
    rows, side = written(inputs, TabularRequest(instances=[{"c": True, "b": 2.5, "a": 1}]))
    np.testing.assert_array_equal(rows, [[1.0, 2.5, 1.0]])
    assert side is None
    rows, _ = written(inputs, PredictRequest(features=[4.0, 5.0, 0.0]))  # the fast path
    np.testing.assert_array_equal(rows, [[4.0, 5.0, 0.0]])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"instances": [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "plan"}]},
            r"row 1: column 'plan' is missing",
        ),
        ({"instances": [{**ROWS[0], "extra": 1}]}, r"row 0: column 'extra' is not one the model takes"),
        ({"instances": [{**ROWS[0], "age": "31"}]}, r"row 0, column 'age': expected a number, got a string"),
        (
            {"instances": [ROWS[1], {**ROWS[0], "age": True}]},
            r"row 1, column 'age': expected a number, got a bool",
        ),
        ({"instances": [{**ROWS[0], "age": None}]}, r"row 0, column 'age': null, and the column takes none"),
        ({"instances": [{**ROWS[0], "plan": 3}]}, r"row 0, column 'plan': expected a string, got a number"),
        ({"instances": [{**ROWS[0], "autopay": 2}]}, r"row 0, column 'autopay': expected true or false"),
        ({"instances": [{**ROWS[0], "autopay": "yes"}]}, r"row 0, column 'autopay': expected true or false"),
        (
            {"instances": [{**ROWS[0], "region": "mars"}]},
            r"row 0, column 'region': 'mars' is not one of its categories",
        ),
        ({"instances": [[1, 2, 3]]}, r"row 0 has 3 values, expected 5"),
        ({"inputs": {"age": [1]}}, r"`inputs`: column 'monthly' is missing"),
        ({"dataframe_split": {"columns": ["age", "age"], "data": [[1, 2]]}}, r"names a column twice"),
        ({"instances": [ROWS[0], [1, 2, 3, 4, 5]]}, r"row 0 is not a list of values"),
    ],
)
def test_a_bad_row_is_refused_naming_the_row_and_the_column(body: dict[str, Any], message: str) -> None:
    request = decode(msgspec.json.encode(body), WireFormat.JSON, named=True)
    inputs = Inputs(CHURN)
    queue = queue_for(inputs)
    slot = queue.reserve(request.n_rows)
    with pytest.raises(BadFeatures, match=message):
        inputs.write(queue, slot, request)


def test_a_non_finite_number_is_refused() -> None:
    request = TabularRequest(instances=[{"a": float("inf"), "b": 0.0, "c": False}])
    with pytest.raises(BadFeatures, match=r"row 0, column 'a': inf is not a finite number"):
        written(Inputs(NUMERIC), request)


def test_binary_rows_cannot_carry_strings() -> None:
    request = TabularRequest(instances=np.zeros((1, 5)).tobytes(), shape=(1, 5))
    with pytest.raises(BadFeatures, match="binary rows carry numbers only; column 'monthly'"):
        written(Inputs(CHURN), request)
    request = TabularRequest(instances=np.array([[1.0, 2.0, 1.0]]).tobytes(), shape=(1, 3))
    rows, _ = written(Inputs(NUMERIC), request)
    np.testing.assert_array_equal(rows, [[1.0, 2.0, 1.0]])


def test_a_positional_version_says_it_takes_no_names() -> None:
    with pytest.raises(BadFeatures, match="fitted without column names"):
        written(Inputs(InputSchema(2)), TabularRequest(instances=[{"a": 1, "b": 2}]))
