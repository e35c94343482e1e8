"""A decoded request's rows, checked against its version's schema and written into its queue.

Positional rows go straight into the ring buffer, as they always have. Named rows (every form
of ``codec.TabularRequest``) are checked value by value before the request is admitted: a
missing or unknown column, a value of the wrong kind, a null where none is allowed or a
category the model does not have is a 422 naming the row and the column, and the request
never reaches a batch. Then:

- a version that takes numbers only gets them in its fitted column order, in the ring buffer:
  the names were mapped to positions once, when it loaded;
- a version that needs a DataFrame gets its numeric columns in the ring buffer too, and its
  strings, categories and nullable columns beside the request, in its waiter (``Side``); each
  batch becomes one DataFrame in the fitted column order (``frame``), in the predict thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from fastserve.codec import PredictRequest, TabularRequest
from fastserve.errors import BadFeatures
from fastserve.schema import Column, InputSchema, Kind

if TYPE_CHECKING:
    from fastserve.queue import RingQueue

# The columns of one request that do not live in the ring buffer: name -> its values, a value
# per row.
Side = dict[str, list[Any]]

_TYPE_NAMES = {bool: "a bool", int: "a number", float: "a number", str: "a string", type(None): "null"}


class Inputs:
    """How one version's requests become its rows (see the module's docstring)."""

    def __init__(self, schema: InputSchema) -> None:
        self.schema = schema
        self.width = schema.buffer_width
        self._columns = schema.columns
        self._names = [c.name for c in schema.columns]
        self._known = set(self._names)
        buffered = schema.numeric_columns
        self._buffered = [self._names.index(c.name) for c in buffered]
        self._bools = [j for j, c in enumerate(buffered) if c.kind is Kind.BOOL]
        self._beside = [c for c in schema.columns if c not in buffered] if schema.needs_frame else []
        self._categories = {
            c.name: frozenset(c.categories)
            for c in schema.columns
            if c.kind is Kind.CATEGORY and c.categories
        }

    @property
    def named(self) -> bool:
        return self.schema.named

    def write(self, queue: RingQueue, slot: int, request: PredictRequest | TabularRequest) -> Side | None:
        """Write ``request``'s rows into ``slot``; its ``Side`` columns, if the version has any.

        Raises ``BadFeatures`` (and leaves the slot to be aborted) when a row is wrong.
        """
        if type(request) is PredictRequest and not self._beside:
            try:  # the positional hot path, as it always was
                if request.features is not None:
                    queue.write_one(slot, request.features)
                elif isinstance(request.instances, bytes):
                    assert request.shape is not None
                    if request.shape[1] != queue.n_features:
                        raise ValueError(
                            f"shape has {request.shape[1]} features, expected {queue.n_features}"
                        )
                    queue.write_bytes(slot, request.instances)
                else:
                    queue.write(slot, request.instances)  # type: ignore[arg-type]
            except (ValueError, TypeError) as exc:
                raise BadFeatures(str(exc)) from None
            return None
        if not self.named:
            raise BadFeatures(
                f"this version takes {self.schema.n_features} positional values a row "
                "(it was fitted without column names)"
            )
        rows, side = self.convert(request)
        try:
            queue.write(slot, rows)
        except (ValueError, TypeError) as exc:
            raise BadFeatures(str(exc)) from None
        return side

    def convert(self, request: PredictRequest | TabularRequest) -> tuple[list[list[float]], Side | None]:
        """The rows of a named version's request: the ring buffer's values a row, and its Side."""
        columns = self._columnar(request)
        for column, values in zip(self._columns, columns, strict=True):
            self._check(column, values)
        n_rows = request.n_rows
        if self._buffered:
            picked = [columns[i] for i in self._buffered]
            for j in self._bools:
                picked[j] = [1.0 if v else 0.0 for v in picked[j]]
            rows = [list(row) for row in zip(*picked, strict=True)]
        else:  # nothing numeric: a row still takes one place in the buffer
            rows = [[0.0]] * n_rows
        side = {c.name: columns[self._names.index(c.name)] for c in self._beside} if self._beside else None
        return rows, side

    def frame(self, rows: np.ndarray[Any, Any], sides: Sequence[Side]) -> Any:
        """One batch as the DataFrame the model was fitted on: columns in the fitted order, numbers
        as float64, bools as bool, categories as categorical with the fitted categories."""
        import pandas as pd

        buffered = {self._names[i]: j for j, i in enumerate(self._buffered)}
        data: dict[str, Any] = {}
        for column in self._columns:
            if column.name in buffered:
                values = rows[:, buffered[column.name]]
                data[column.name] = values.astype(bool) if column.kind is Kind.BOOL else values
                continue
            joined = list(chain.from_iterable(side[column.name] for side in sides))
            if column.kind is Kind.CATEGORY:
                data[column.name] = pd.Categorical(joined, categories=column.categories)
            elif column.kind is Kind.NUMBER:
                data[column.name] = np.array([math.nan if v is None else v for v in joined], dtype=np.float64)
            else:
                data[column.name] = joined
        return pd.DataFrame(data, copy=False)

    # -- the request's forms, as one list of values per fitted column --------------------------

    def _columnar(self, request: PredictRequest | TabularRequest) -> list[list[Any]]:
        n = self.schema.n_features
        if isinstance(request.instances, bytes):
            if self._beside:
                raise BadFeatures(
                    f"binary rows carry numbers only; column {self._beside[0].name!r} is a "
                    f"{self._beside[0].kind}: send it as JSON or msgpack values"
                )
            assert request.shape is not None
            if request.shape[1] != n:
                raise BadFeatures(f"shape has {request.shape[1]} features, expected {n}")
            flat = np.frombuffer(request.instances, dtype="<f8").reshape(request.shape)
            return [flat[:, j].tolist() for j in range(n)]
        if type(request) is PredictRequest or isinstance(request.features, list):
            return self._positional(request)
        assert isinstance(request, TabularRequest)
        if isinstance(request.instances, list) and not all(isinstance(r, dict) for r in request.instances):
            return self._positional(request)
        if request.inputs is not None:
            self._check_names(request.inputs, "`inputs`")
            return [request.inputs[name] for name in self._names]
        if request.dataframe_split is not None:
            split = request.dataframe_split
            positions = {name: j for j, name in enumerate(split.columns)}
            if len(positions) != len(split.columns):
                raise BadFeatures("`dataframe_split` names a column twice")
            self._check_names(positions, "`dataframe_split`")
            return [[row[positions[name]] for row in split.data] for name in self._names]
        records: list[dict[str, Any]]
        if request.features is not None:
            records = [request.features]
        elif request.dataframe_records is not None:
            records = request.dataframe_records
        else:
            records = request.instances  # type: ignore[assignment]
        for i, record in enumerate(records):
            self._check_names(record, f"row {i}")
        return [[record[name] for record in records] for name in self._names]

    def _positional(self, request: PredictRequest | TabularRequest) -> list[list[Any]]:
        rows: list[Any] = [request.features] if request.features is not None else request.instances  # type: ignore[assignment]
        n = self.schema.n_features
        for i, row in enumerate(rows):
            if not isinstance(row, list):
                raise BadFeatures(f"row {i} is not a list of values (or every row an object)")
            if len(row) != n:
                raise BadFeatures(f"row {i} has {len(row)} values, expected {n} ({', '.join(self._names)})")
        return [[row[j] for row in rows] for j in range(n)]

    def _check_names(self, given: Any, where: str) -> None:
        if not isinstance(given, dict):
            raise BadFeatures(f"{where} is not an object of column -> value")
        if given.keys() != self._known:
            missing = [name for name in self._names if name not in given]
            if missing:
                raise BadFeatures(f"{where}: column {missing[0]!r} is missing")
            unknown = sorted(set(given) - self._known)
            raise BadFeatures(f"{where}: column {unknown[0]!r} is not one the model takes")

    def _check(self, column: Column, values: list[Any]) -> None:
        kind = column.kind
        for i, value in enumerate(values):
            if value is None:
                if column.nullable:
                    continue
                raise BadFeatures(f"row {i}, column {column.name!r}: null, and the column takes none")
            kind_of = type(value)
            if kind is Kind.NUMBER:
                ok = (kind_of is float or kind_of is int) and math.isfinite(value)
            elif kind is Kind.BOOL:  # 0 and 1 too: a positional row, or binary rows, hold numbers
                ok = kind_of is bool or ((kind_of is float or kind_of is int) and value in (0, 1))
            elif kind is Kind.STRING:
                ok = kind_of is str
            else:
                allowed = self._categories.get(column.name)
                ok = kind_of is not bool and (value in allowed if allowed is not None else kind_of is str)
            if not ok:
                raise BadFeatures(f"row {i}, column {column.name!r}: {_describe(value, column)}")


def _describe(value: Any, column: Column) -> str:
    got = _TYPE_NAMES.get(type(value), "a " + type(value).__name__)
    if column.kind is Kind.NUMBER and isinstance(value, float):
        return f"{value!r} is not a finite number"
    if column.kind is Kind.CATEGORY and column.categories and isinstance(value, str):
        shown = ", ".join(repr(c) for c in column.categories[:10])
        return f"{value!r} is not one of its categories ({shown})"
    expected = {Kind.NUMBER: "a number", Kind.BOOL: "true or false (or 0 or 1)", Kind.STRING: "a string"}
    return f"expected {expected.get(column.kind, 'a category')}, got {got}"  # type: ignore[arg-type]
