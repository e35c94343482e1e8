"""A version's input schema, settled when it loads: positional, or named columns with kinds.

Where it comes from, in order:

- the estimator: ``n_features_in_``, and ``feature_names_in_`` when it was fitted on a
  DataFrame. For a pipeline, its first step says how each column is used: a
  ``ColumnTransformer``'s transformers, an encoder's fitted ``categories_`` (strings or
  numbers), a numeric transformer (a scaler: numbers), an imputer (nulls allowed), and
  ``"passthrough"``, which says nothing of the kind;
- ``model.toml``'s ``[input]`` table, column -> kind (``number``, ``string``, ``category``,
  ``bool``), or a table ``{kind = "...", nullable = true, categories = [...]}``: it settles a
  kind the estimator cannot tell, and overrides one it guessed;
- ``input_example.json`` beside the version (a list of rows as objects): each value's JSON
  type settles a kind still unknown, and the rows are the warm-up.

A version that is left with a column of unknown kind does not load; the message names the
column and the line to add to ``model.toml``.

A model needs a DataFrame when it takes strings or categories, or its first step selects
columns by name. Any other named model takes its rows as numbers in its fitted order:
names are mapped to positions once, here, and the rows go into the ring buffer as usual.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from fastserve.errors import ConfigError

EXAMPLE_FILE = "input_example.json"


class Kind(StrEnum):
    """What a named column holds."""

    NUMBER = "number"
    STRING = "string"
    CATEGORY = "category"
    BOOL = "bool"


# Kinds that live in the ring buffer as float64 (a bool as 0 or 1).
NUMERIC_KINDS = frozenset({Kind.NUMBER, Kind.BOOL})


@dataclass(frozen=True)
class Column:
    """One named input column."""

    name: str
    kind: Kind | None  # None: not settled yet (see settle)
    nullable: bool = False
    # The values a string or category column was fitted on (an encoder's categories_), for
    # the warm-up row and the metadata; a category column admits only these.
    categories: tuple[Any, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "kind": self.kind, "nullable": self.nullable}
        if self.categories is not None:
            described["categories"] = list(self.categories)
        return described


@dataclass(frozen=True)
class InputSchema:
    """What one version takes: ``n_features`` positional values, or the named ``columns``."""

    n_features: int
    columns: tuple[Column, ...] = ()  # empty: positional only
    needs_frame: bool = False  # each batch goes to predict as a pandas DataFrame

    @property
    def named(self) -> bool:
        return bool(self.columns)

    @property
    def numeric_columns(self) -> tuple[Column, ...]:
        """The columns that go into the ring buffer, in their fitted order (all of them unless
        the model needs a DataFrame, where strings, categories and nullable numbers do not)."""
        if not self.needs_frame:
            return self.columns
        return tuple(c for c in self.columns if c.kind in NUMERIC_KINDS and not c.nullable)

    @property
    def buffer_width(self) -> int:
        """Float64 values per row in the ring buffer (at least 1: a row must take a place)."""
        if not self.named:
            return self.n_features
        return max(1, len(self.numeric_columns))

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "columns": [c.as_dict() for c in self.columns] if self.named else None,
            "dataframe": self.needs_frame,
        }


def infer_schema(
    estimator: Any, declared: Mapping[str, Any], example: list[dict[str, Any]] | None, where: str
) -> InputSchema:
    """The settled schema of ``estimator``, with ``model.toml``'s ``[input]`` table and the
    example rows; ``ValueError`` naming the column when it cannot be settled."""
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int | np.integer) or n_features < 1:
        raise ValueError("the estimator has no n_features_in_; fit it before saving")
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        if declared:
            raise ConfigError(f"{where}: [input] names columns, but the model was fitted without names")
        return InputSchema(int(n_features))
    first = _first_step(estimator)
    columns = _columns_of(first, [str(name) for name in names])
    columns = _declare(columns, declared, where)
    if example is not None:
        columns = _from_example(columns, example)
    unsettled = [c.name for c in columns if c.kind is None]
    if unsettled:
        name = unsettled[0]
        raise ValueError(
            f'column {name!r}: its kind is not known from the model; add `{name} = "number"` '
            f'(or "string", "category", "bool") under [input] in {where}, or an {EXAMPLE_FILE}'
        )
    needs_frame = _selects_by_name(first) or any(c.kind not in NUMERIC_KINDS for c in columns)
    return InputSchema(int(n_features), tuple(columns), needs_frame)


def read_example(version_dir: Path, root: Path) -> list[dict[str, Any]] | None:
    """The rows of a version's ``input_example.json``, or None without one."""
    path = version_dir / EXAMPLE_FILE
    if not path.exists():
        return None
    if not path.resolve().is_relative_to(root) or not path.is_file():
        raise PermissionError(f"{EXAMPLE_FILE} resolves outside the repository")
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{EXAMPLE_FILE} is not JSON: {exc}") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{EXAMPLE_FILE} must hold a row as an object, or a list of them")
    return rows


def warm_up_rows(schema: InputSchema, example: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Rows to warm a named version on: its example, or one row built from the schema (zero,
    the first fitted category, false). None for a positional version (it warms on zeros)."""
    if not schema.named:
        return None
    if example is not None:
        return example
    row: dict[str, Any] = {}
    for column in schema.columns:
        if column.categories:
            row[column.name] = column.categories[0]
        elif column.kind is Kind.BOOL:
            row[column.name] = False
        elif column.kind is Kind.NUMBER:
            row[column.name] = 0.0
        else:
            row[column.name] = ""
    return [row]


# -- what the estimator tells ----------------------------------------------------------------


def _first_step(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    if isinstance(steps, list) and steps:
        return _first_step(steps[0][1])
    return estimator


def _is_column_transformer(step: Any) -> bool:
    return hasattr(step, "transformers_") and hasattr(step, "_transformer_to_input_indices")


def _columns_of(first: Any, names: list[str]) -> list[Column]:
    """Each fitted column with the kind its first step shows, or None where it shows none."""
    if _is_column_transformer(first):
        columns = [Column(name, None) for name in names]
        transformers = {name: transformer for name, transformer, _ in first.transformers_}
        for name, indices in first._transformer_to_input_indices.items():
            transformer = transformers.get(name, first.remainder if name == "remainder" else None)
            if transformer is None or transformer == "drop":
                continue
            for position, index in enumerate(indices):
                columns[index] = _used_by(transformer, names[index], position)
        return columns
    categorical = getattr(first, "is_categorical_", None)  # HistGradientBoosting's own categories
    if categorical is not None and categorical.any():
        return [
            Column(name, Kind.CATEGORY) if categorical[i] else Column(name, Kind.NUMBER)
            for i, name in enumerate(names)
        ]
    return [_used_by(first, name, i) for i, name in enumerate(names)]


def _used_by(transformer: Any, name: str, position: int) -> Column:
    """The column ``name``, ``position``-th of those ``transformer`` takes, as it shows it."""
    steps = [step for _, step in transformer.steps] if hasattr(transformer, "steps") else [transformer]
    nullable = any(type(step).__name__ in _IMPUTERS for step in steps)
    for step in steps:
        categories = getattr(step, "categories_", None)
        if categories is not None and position < len(categories):
            fitted = categories[position]
            values = tuple(v for v in fitted.tolist() if not _is_missing(v))
            kind = Kind.STRING if any(isinstance(v, str) for v in values) else Kind.NUMBER
            return Column(name, kind, nullable or len(values) < len(fitted), values)
        if _passes_through(step):
            continue  # says nothing: the next step may
        if isinstance(step, str):
            return Column(name, None, nullable)
        return Column(name, Kind.NUMBER, nullable)
    return Column(name, None, nullable)


# Imputers fill a missing value: the column may hold nulls.
_IMPUTERS = frozenset({"SimpleImputer", "KNNImputer", "IterativeImputer", "MissingIndicator"})


def _passes_through(step: Any) -> bool:
    # "passthrough" as fitted is a FunctionTransformer with no function.
    if step == "passthrough":
        return True
    return type(step).__name__ == "FunctionTransformer" and getattr(step, "func", None) is None


def _selects_by_name(first: Any) -> bool:
    """Whether the first step picks its columns by name (then it only takes a DataFrame)."""
    if not _is_column_transformer(first):
        return False
    for _, _, selection in first.transformers:
        if callable(selection) or isinstance(selection, str):
            return True
        if isinstance(selection, Sequence) and any(isinstance(item, str) for item in selection):
            return True
    return False


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# -- what the repository tells ---------------------------------------------------------------


def _declare(columns: list[Column], declared: Mapping[str, Any], where: str) -> list[Column]:
    """``columns`` as ``model.toml``'s ``[input]`` table declares them."""
    known = {c.name: i for i, c in enumerate(columns)}
    out = list(columns)
    for name, spec in declared.items():
        if name not in known:
            raise ConfigError(f"{where}: [input] names {name!r}, which the model was not fitted on")
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict) or set(spec) - {"kind", "nullable", "categories"}:
            raise ConfigError(
                f"{where}: [input] {name} must be a kind, or a table of kind, nullable, categories"
            )
        column = out[known[name]]
        kind = spec.get("kind", column.kind)
        try:
            kind = Kind(kind) if kind is not None else None
        except ValueError:
            raise ConfigError(
                f"{where}: [input] {name} = {kind!r} is not one of {', '.join(k.value for k in Kind)}"
            ) from None
        nullable = spec.get("nullable", column.nullable)
        categories = spec.get("categories", column.categories)
        if not isinstance(nullable, bool):
            raise ConfigError(f"{where}: [input] {name}: nullable must be true or false")
        if categories is not None and not isinstance(categories, list | tuple):
            raise ConfigError(f"{where}: [input] {name}: categories must be a list")
        out[known[name]] = replace(
            column, kind=kind, nullable=nullable, categories=tuple(categories) if categories else None
        )
    return out


def _from_example(columns: list[Column], example: list[dict[str, Any]]) -> list[Column]:
    """Kinds still unknown, from the JSON types of the example's values."""
    names = {c.name for c in columns}
    for i, row in enumerate(example):
        missing, unknown = names - set(row), set(row) - names
        if missing or unknown:
            raise ValueError(
                f"{EXAMPLE_FILE} row {i}: "
                + (f"missing {sorted(missing)}" if missing else f"unknown columns {sorted(unknown)}")
            )
    out = []
    for column in columns:
        values = [row[column.name] for row in example]
        present = [v for v in values if v is not None]
        if column.kind is None and present:
            kinds = {_kind_of(v) for v in present}
            if len(kinds) != 1 or None in kinds:
                raise ValueError(f"{EXAMPLE_FILE}: column {column.name!r} holds values of several kinds")
            column = replace(column, kind=kinds.pop())
        if len(present) < len(values):
            column = replace(column, nullable=True)
        out.append(column)
    return out


def _kind_of(value: Any) -> Kind | None:
    if isinstance(value, bool):
        return Kind.BOOL
    if isinstance(value, int | float):
        return Kind.NUMBER
    if isinstance(value, str):
        return Kind.STRING
    return None
