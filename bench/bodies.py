"""What the tabular scenario sends each server, and the check that its answers are the model's.

The bodies: fastserve's named rows and features, MLServer's V2 pandas-codec and tensor forms,
one row each as wrk sends them (``wrk/post.lua`` posts the file). Before a server is loaded,
``check_answers`` sends it 64 rows (wrk's own among them) and compares its predictions and
probabilities with the offline estimator's on the same rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compute_ceiling import CHURN, DIGITS
from bench.harness import HarnessError, NotServed, Record, Server, http_post

# The row wrk sends (issue 16's example); the checks send it with 63 rows of the churn table.
CHURN_ROW = {"age": 31, "tenure_months": 12, "monthly": 49.5, "plan": "pro", "region": "eu", "autopay": True}
CHECK_ROWS = 64  # a full batch: no server splits or refuses it
_V2_DATATYPES = {"int64": "INT64", "float64": "FP64", "object": "BYTES", "category": "BYTES", "bool": "BOOL"}


# --- request bodies ----------------------------------------------------------------------


def named_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """fastserve's named-row form (KServe V1 / TF Serving): ``{"instances": [{column: value}]}``."""
    return {"instances": list(rows)}


def v2_pandas(rows: Sequence[dict[str, Any]], outputs: Sequence[str] = ()) -> dict[str, Any]:
    """MLServer's pandas codec: one V2 input per column, strings as BYTES, ``content_type: "pd"``.

    Each ``data`` is a list even for one row: MLServer's adaptive batcher merges a string
    ``data`` by concatenating the strings (``"pro" + "team"``), a list by joining the lists.
    """
    from fastserve.demo import CHURN_COLUMNS

    inputs = [
        {
            "name": column,
            "datatype": _V2_DATATYPES[dtype],
            "shape": [len(rows)],
            "data": [row[column] for row in rows],
        }
        for column, dtype in CHURN_COLUMNS.items()
    ]
    return _v2({"parameters": {"content_type": "pd"}, "inputs": inputs}, outputs)


def v2_tensor(x: np.ndarray[Any, Any], outputs: Sequence[str] = ()) -> dict[str, Any]:
    """One FP64 V2 input of ``x``'s shape: MLServer's scikit-learn runtime decodes it as a NumPy array."""
    tensor = {"name": "input-0", "datatype": "FP64", "shape": list(x.shape), "data": x.ravel().tolist()}
    return _v2({"inputs": [tensor]}, outputs)


def _v2(body: dict[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def write_json(path: Path, body: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


def churn_frame(rows: Sequence[dict[str, Any]]) -> Any:
    """Rows as the DataFrame the churn pipeline was fitted on: its columns, order and dtypes."""
    import pandas as pd

    from fastserve.demo import CHURN_COLUMNS, CHURN_REGIONS

    frame = pd.DataFrame(list(rows), columns=list(CHURN_COLUMNS))
    dtypes: dict[str, Any] = dict(CHURN_COLUMNS)
    dtypes["region"] = pd.CategoricalDtype(list(CHURN_REGIONS))
    return frame.astype(dtypes)


# --- answers checked against the offline estimator ---------------------------------------


@dataclasses.dataclass
class Case:
    """One model on one server: what wrk sends, and the rows its answers are checked on."""

    suite: str  # churn | digits
    label: str  # the body, for the table
    body: dict[str, Any]  # what wrk sends
    check_rows: Any  # a DataFrame (churn) or an array (digits), including the body's row
    check_body: Callable[[Any], dict[str, Any]]
    outputs: tuple[str, ...] = ("predict",)  # what wrk's body asks for
    v2: bool = False  # the Open Inference Protocol's answers (MLServer), else fastserve's


def _post(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = http_post(server.url(server.predict_path), json.dumps(body).encode(), timeout_s=60)
    if status != 200:
        raise HarnessError(f"{server.name}: POST {server.predict_path} answered {status}: {answer[:300]!r}")
    decoded: dict[str, Any] = json.loads(answer)
    return decoded


def check_answers(server: Server, case: Case, estimator: Any) -> Record:
    """The server's answers on the check rows and on wrk's body, against ``estimator``'s own;
    a HarnessError where they differ.

    Predictions must be equal, probabilities within 1e-12. A fastserve that ignores
    ``outputs`` (before issue 16's server side) answers without probabilities: that is
    NotServed, with the reason, not a wrong answer.
    """
    rows = case.check_rows
    expected = {"predict": estimator.predict(rows), "predict_proba": estimator.predict_proba(rows)}
    answer = _post(server, case.check_body(rows))
    got = _answers(server, case, answer)
    missing = [name for name in case.outputs if name not in got]
    if missing:
        raise HarnessError(f"{server.name}: no {missing} in {str(answer)[:300]}")
    record: Record = {"kind": "check", "suite": case.suite, "server": server.name, "rows": len(rows)}
    for name, value in got.items():
        want = expected[name]
        if value.size != want.size:
            raise HarnessError(f"{server.name}: {name} of shape {value.shape} for {want.shape}")
        value = value.reshape(want.shape)
        if name == "predict":
            record["predict_equal"] = bool(np.array_equal(value.astype(want.dtype), want))
        else:
            record["predict_proba_max_abs_diff"] = float(np.max(np.abs(value - want)))
    # wrk's own body, as it is sent: its first output, against the estimator's on its row.
    first = case.outputs[0]
    body_got = _answers(server, case, _post(server, case.body))[first]
    body_want = expected[first][:1]
    record["body_equal"] = bool(
        np.allclose(body_got.reshape(body_want.shape).astype(body_want.dtype), body_want)
        if first == "predict_proba"
        else np.array_equal(body_got.ravel().astype(body_want.dtype), body_want)
    )
    wrong = not record.get("predict_equal", True) or record.get("predict_proba_max_abs_diff", 0.0) > 1e-12
    if wrong or not record["body_equal"]:
        raise HarnessError(f"{server.name}: answers differ from the offline {case.suite} model: {record}")
    return record


def _answers(server: Server, case: Case, answer: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """The outputs of an answer by name (predict, predict_proba), in either protocol."""
    if case.v2:
        return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    got = {}
    if "predictions" in answer:
        got["predict"] = np.asarray(answer["predictions"])
    if "probabilities" in answer:
        got["predict_proba"] = np.asarray(answer["probabilities"], dtype=float)
    elif "predict_proba" in case.outputs:
        raise NotServed(
            f'{server.name} answered {sorted(answer)} to "outputs": {list(case.outputs)}, '
            "without probabilities: it does not serve outputs yet (issue 16)"
        )
    return got


def cases() -> dict[str, Case]:
    """Every (server, model, body) of the run, by name: ``<server>-<model>[-proba]``."""
    from sklearn.datasets import load_digits

    from fastserve.demo import churn_table as table_of_churn

    frame, _ = table_of_churn()
    churn_rows = churn_frame([CHURN_ROW, *frame.head(CHECK_ROWS - 1).to_dict(orient="records")])
    digits = load_digits().data[:CHECK_ROWS]

    def named(rows: Any) -> dict[str, Any]:
        return named_rows(rows.astype({"region": str}).to_dict(orient="records"))

    def pandas_codec(rows: Any) -> dict[str, Any]:
        records = rows.astype({"region": str}).to_dict(orient="records")
        return v2_pandas(records, ("predict", "predict_proba"))

    def features(rows: Any, outputs: Sequence[str] = ()) -> dict[str, Any]:
        body: dict[str, Any] = {"instances": rows.tolist()}
        if outputs:
            body["outputs"] = list(outputs)
        return body

    return {
        "fastserve-churn": Case(CHURN, "named rows", named_rows([CHURN_ROW]), churn_rows, named),
        "mlserver-churn": Case(
            CHURN, "V2, pandas codec", v2_pandas([CHURN_ROW]), churn_rows, pandas_codec, v2=True
        ),
        "fastserve-digits": Case(DIGITS, "features", {"features": digits[0].tolist()}, digits, features),
        "fastserve-digits-proba": Case(
            DIGITS,
            'features, outputs ["predict_proba"]',
            {"features": digits[0].tolist(), "outputs": ["predict_proba"]},
            digits,
            lambda rows: features(rows, ["predict_proba"]),
            ("predict_proba",),
        ),
        "mlserver-digits": Case(
            DIGITS,
            "V2 tensor [1, 64]",
            v2_tensor(digits[:1]),
            digits,
            lambda rows: v2_tensor(rows, ("predict", "predict_proba")),
            v2=True,
        ),
    }
