"""End to end, tabular models: a pipeline on named, typed columns, and class probabilities.

A real ``fastserve serve`` on Granian serves a churn pipeline (a ColumnTransformer on numbers,
a string plan, a categorical region and a bool, then a LogisticRegression) fitted on a pandas
DataFrame, a numeric forest fitted on a DataFrame, and a positional LogisticRegression on
iris. Every answer is compared with the offline estimator's on the same rows.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from test_schema import churn_frame, churn_labels

from conftest import RunningServer, assert_error, status_of
from http_load import post_many

pytestmark = pytest.mark.e2e

COLUMNS = ["age", "monthly", "plan", "region", "autopay"]
TOKEN = "tabular-test-admin-token"


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as JSON-able objects (numpy scalars to Python ones)."""
    out = []
    for row in frame.itertuples(index=False):
        out.append(
            {
                "age": int(row.age),
                "monthly": float(row.monthly),
                "plan": str(row.plan),
                "region": str(row.region),
                "autopay": bool(row.autopay),
            }
        )
    return out


@pytest.fixture(scope="module")
def churn() -> Pipeline:
    frame = churn_frame(600, seed=1)
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "monthly"]),
            ("plan", OneHotEncoder(handle_unknown="error"), ["plan"]),
            ("region", OneHotEncoder(handle_unknown="ignore"), ["region"]),
            ("autopay", "passthrough", ["autopay"]),
        ]
    )
    model = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))])
    return model.fit(frame, churn_labels(frame))


@pytest.fixture(scope="module")
def churn_v2(churn: Pipeline) -> Pipeline:
    """The same columns, another classifier: answers that mostly agree with v1's."""
    frame = churn_frame(600, seed=1)
    model = Pipeline([("prep", churn.steps[0][1]), ("clf", LogisticRegression(C=0.01, max_iter=1000))])
    return model.fit(frame, churn_labels(frame))


@pytest.fixture(scope="module")
def iris_model() -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(*load_iris(return_X_y=True))


@pytest.fixture(scope="module")
def named_forest() -> RandomForestClassifier:
    frame = churn_frame(300, seed=2)[["age", "monthly"]]
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(frame, frame["monthly"] > 50)


@pytest.fixture(scope="module")
def by_name() -> Pipeline:
    """Numbers only, but its first step selects them by name: it takes only a DataFrame."""
    frame = churn_frame(300, seed=8)[["age", "monthly"]]
    prep = ColumnTransformer([("num", StandardScaler(), ["monthly", "age"])])
    return Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame, frame["monthly"] > 50)


@pytest.fixture(scope="module")
def tabular_repo(
    tmp_path_factory: pytest.TempPathFactory,
    churn: Pipeline,
    churn_v2: Pipeline,
    iris_model: LogisticRegression,
    named_forest: RandomForestClassifier,
    by_name: Pipeline,
) -> Path:
    repo = tmp_path_factory.mktemp("tabular")
    models = {("churn", "v1"): churn, ("churn", "v2"): churn_v2, ("iris", "v1"): iris_model}
    models["scaled", "v1"] = by_name
    for (name, version), model in {**models, ("spend", "v1"): named_forest}.items():
        (repo / name / version).mkdir(parents=True)
        sio.dump(model, repo / name / version / "model.skops")
    # The pipeline cannot tell autopay's kind ("passthrough"); its example can.
    example = records(churn_frame(2, seed=3))
    for version in ("v1", "v2"):
        (repo / "churn" / version / "input_example.json").write_text(json.dumps(example))
    (repo / "churn" / "model.toml").write_text('stable = "v1"\n[input]\nregion = {kind = "category"}\n')
    return repo


@pytest.fixture(scope="module")
def server(tabular_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import free_port, running, serve_command, server_env

    port = free_port()
    tmp = tmp_path_factory.mktemp("tabular-server")
    env = server_env(admin_token=TOKEN)
    with running(serve_command(tabular_repo, port), env, port, tmp) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return churn_frame(40, seed=4)


def predict(server: RunningServer, body: dict[str, Any], msgpack: bool = False, path: str = "churn") -> Any:
    if msgpack:
        reply = httpx.post(
            f"{server.url}/predict/{path}",
            content=msgspec.msgpack.encode(body),
            headers={"content-type": "application/msgpack"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.content
        return msgspec.msgpack.decode(reply.content)
    reply = httpx.post(f"{server.url}/predict/{path}", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def forms(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    rows = records(frame)
    return {
        "named instances": {"instances": rows},
        "columnar inputs": {"inputs": {name: [row[name] for row in rows] for name in COLUMNS}},
        # (Not pandas' to_json: it rounds floats to 10 digits unless told otherwise.)
        "dataframe_split": {
            "dataframe_split": {"columns": COLUMNS, "data": [list(r.values()) for r in rows]}
        },
        "dataframe_records": {"dataframe_records": rows},
        "positional rows": {"instances": [list(row.values()) for row in rows]},
    }


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
@pytest.mark.parametrize(
    "form", ["named instances", "columnar inputs", "dataframe_split", "dataframe_records", "positional rows"]
)
def test_every_form_answers_as_the_pipeline_does_offline(
    server: RunningServer, churn: Pipeline, rows: pd.DataFrame, form: str, msgpack: bool
) -> None:
    body = {**forms(rows)[form], "outputs": ["predict", "predict_proba"]}
    answer = predict(server, body, msgpack)
    assert answer["predictions"] == churn.predict(rows).tolist()
    assert answer["probabilities"] == churn.predict_proba(rows).tolist()  # the same bits
    assert answer["classes"] == ["churn", "stay"]
    assert answer["model"] == "churn" and answer["version"] == "v1"


def test_one_named_row_and_predictions_only_by_default(
    server: RunningServer, churn: Pipeline, rows: pd.DataFrame
) -> None:
    answer = predict(server, {"features": records(rows.head(1))[0]})
    assert answer == {"model": "churn", "version": "v1", "predictions": churn.predict(rows.head(1)).tolist()}


def test_a_numeric_model_fitted_with_names_takes_named_rows(
    server: RunningServer, named_forest: RandomForestClassifier
) -> None:
    frame = churn_frame(20, seed=5)[["age", "monthly"]]
    named = [
        {"monthly": float(m), "age": int(a)} for a, m in zip(frame["age"], frame["monthly"], strict=True)
    ]
    answer = predict(server, {"instances": named, "outputs": ["predict_proba"]}, path="spend")
    assert answer["probabilities"] == named_forest.predict_proba(frame).tolist()
    positional = predict(server, {"instances": frame.to_numpy().tolist()}, path="spend")
    assert positional["predictions"] == named_forest.predict(frame).tolist()
    assert status_of(server)["models"]["spend"]["versions"]["v1"]["predict"] == "compiled"


def test_a_model_that_selects_numbers_by_name_gets_a_dataframe(
    server: RunningServer, by_name: Pipeline
) -> None:
    frame = churn_frame(10, seed=9)[["age", "monthly"]]
    named = predict(server, {"dataframe_records": frame.to_dict(orient="records")}, path="scaled")
    positional = predict(server, {"instances": frame.to_numpy().tolist()}, path="scaled")
    assert named["predictions"] == positional["predictions"] == by_name.predict(frame).tolist()
    assert httpx.get(server.url + "/models/scaled/versions/v1").json()["input"]["dataframe"] is True


def test_probabilities_of_a_positional_classifier(
    server: RunningServer, iris_model: LogisticRegression
) -> None:
    x, _ = load_iris(return_X_y=True)
    answer = predict(
        server, {"instances": x[:5].tolist(), "outputs": ["predict_proba", "decision_function"]}, path="iris"
    )
    assert answer["probabilities"] == iris_model.predict_proba(x[:5]).tolist()
    assert answer["scores"] == iris_model.decision_function(x[:5]).tolist()
    assert answer["classes"] == [0, 1, 2]
    assert "predictions" not in answer  # only what was asked for


def test_an_unknown_output_is_400_listing_what_the_version_has(server: RunningServer) -> None:
    reply = httpx.post(server.url + "/predict/churn", json={"features": [1] * 5, "outputs": ["transform"]})
    assert_error(reply, 400, "unknown_output")
    assert "predict, predict_proba, predict_log_proba, decision_function" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": None}, "row 1, column 'plan': null"),
        ({"age": "old"}, "row 1, column 'age': expected a number, got a string"),
        ({"region": "mars"}, "row 1, column 'region': 'mars' is not one of its categories"),
        ({"extra": 1}, "row 1: column 'extra' is not one the model takes"),
    ],
)
def test_bad_rows_get_422_naming_the_row_and_column_while_good_requests_succeed(
    server: RunningServer, churn: Pipeline, rows: pd.DataFrame, change: dict[str, Any], message: str
) -> None:
    good = records(rows)
    bad = {"instances": [good[0], {**good[1], **change}]}
    bodies = [msgspec.json.encode({"features": row}) for row in good] + [msgspec.json.encode(bad)]
    replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/churn", bodies, concurrency=16))
    for reply, expected in zip(replies[:-1], churn.predict(rows).tolist(), strict=True):
        assert reply.status == 200 and msgspec.json.decode(reply.body)["predictions"] == [expected]
    assert replies[-1].status == 422
    error = msgspec.json.decode(replies[-1].body)["error"]
    assert error["code"] == "bad_features" and message in error["message"]


def test_a_missing_column_is_422(server: RunningServer, rows: pd.DataFrame) -> None:
    row = records(rows.head(1))[0]
    del row["autopay"]
    reply = httpx.post(server.url + "/predict/churn", json={"dataframe_records": [row]})
    assert_error(reply, 422, "bad_features")
    assert "row 0: column 'autopay' is missing" in reply.json()["error"]["message"]


def test_a_poisoned_request_fails_alone_in_its_batch(
    server: RunningServer, churn: Pipeline, rows: pd.DataFrame
) -> None:
    # An unseen plan passes the schema (a string), but the encoder refuses it
    # (handle_unknown="error"): only the model can tell, so the batch is split to find it.
    good = records(rows)
    poisoned = {**good[0], "plan": "platinum"}
    bodies = [msgspec.json.encode({"features": row}) for row in good]
    bodies.insert(20, msgspec.json.encode({"features": poisoned}))
    before = status_of(server)["models"]["churn"]["versions"]["v1"]
    replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/churn", bodies, concurrency=41))
    after = status_of(server)["models"]["churn"]["versions"]["v1"]
    expected = churn.predict(rows).tolist()
    answers = [msgspec.json.decode(r.body) for r in replies]
    assert replies[20].status == 422 and answers[20]["error"]["code"] == "model_rejected_input"
    assert "Found unknown categories ['platinum']" in answers[20]["error"]["message"]
    del replies[20], answers[20]
    assert [r.status for r in replies] == [200] * len(good)
    assert [a["predictions"][0] for a in answers] == expected
    assert after["errors"] - before["errors"] == 1
    # Some batch held the poisoned request with others (else this test shows nothing).
    assert (after["requests"] - before["requests"]) / (after["batches"] - before["batches"]) > 1


def assert_same_probabilities(answered: list[list[float]], expected: np.ndarray[Any, Any]) -> None:
    """Each row's answer is the offline predict's, to the last bits BLAS leaves alone.

    A logistic regression's scores go through a matrix product whose rounding depends on how
    many rows it multiplies at once (numpy picks kernels by size), so a row predicted in a
    batch of 17 may differ from the same row in a frame of 1,000 in the last ulp. Which rows
    share a batch depends on timing; the compiled trees, which are exact, are held to equality
    elsewhere.
    """
    np.testing.assert_allclose(np.array(answered), expected, rtol=1e-12, atol=1e-15)


def test_a_thousand_concurrent_named_rows_are_batched_and_each_gets_its_own_answer(
    server: RunningServer, churn: Pipeline
) -> None:
    frame = churn_frame(1000, seed=6)
    bodies = [
        msgspec.json.encode({"instances": [row], "outputs": ["predict_proba"]}) for row in records(frame)
    ]
    before = status_of(server)["models"]["churn"]["versions"]["v1"]
    replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/churn", bodies, concurrency=64))
    after = status_of(server)["models"]["churn"]["versions"]["v1"]
    assert Counter(r.status for r in replies) == {200: 1000}
    answered = [msgspec.json.decode(r.body)["probabilities"][0] for r in replies]
    assert_same_probabilities(answered, churn.predict_proba(frame))
    mean_batch = (after["rows"] - before["rows"]) / (after["batches"] - before["batches"])
    assert mean_batch > 4, mean_batch


def test_model_metadata(server: RunningServer) -> None:
    described = httpx.get(server.url + "/models/churn").json()
    assert described["aliases"] == {"stable": "v1", "candidate": None}
    v1 = described["versions"]["v1"]
    assert v1["outputs"] == ["predict", "predict_proba", "predict_log_proba", "decision_function"]
    assert v1["classes"] == ["churn", "stay"]
    assert v1["input"]["dataframe"] is True
    assert [(c["name"], c["kind"]) for c in v1["input"]["columns"]] == [
        ("age", "number"),
        ("monthly", "number"),
        ("plan", "string"),
        ("region", "category"),
        ("autopay", "bool"),
    ]
    assert v1["input"]["columns"][2]["categories"] == ["basic", "pro", "team"]
    version = httpx.get(server.url + "/models/iris/versions/v1").json()
    assert version["model"] == "iris" and version["aliases"] == ["stable"]
    assert version["input"] == {"n_features": 4, "columns": None, "dataframe": False}
    assert_error(httpx.get(server.url + "/models/nope"), 404, "unknown_model")
    assert_error(httpx.get(server.url + "/models/iris/versions/v9"), 404, "unknown_version")


def deploy(server: RunningServer, action: dict[str, Any]) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    reply = httpx.post(server.url + "/deploy/churn", json=action, headers=headers)
    assert reply.status_code == 200, reply.text


def test_shadow_and_canary_on_named_rows(server: RunningServer, churn: Pipeline, churn_v2: Pipeline) -> None:
    frame = churn_frame(200, seed=7)
    bodies = [msgspec.json.encode({"features": row, "outputs": ["predict_proba"]}) for row in records(frame)]
    deploy(server, {"action": "candidate", "version": "v2", "shadow": True})
    try:
        replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/churn", bodies, concurrency=16))
        # Users get stable's answers; the copies go to v2 and are compared.
        answered = [msgspec.json.decode(r.body)["probabilities"][0] for r in replies]
        assert_same_probabilities(answered, churn.predict_proba(frame))
        assert {r.headers["x-model-version"] for r in replies} == {"v1"}
        outcomes: dict[str, int] = {}
        for _ in range(100):
            outcomes = status_of(server)["models"]["churn"]["shadow_outcomes"].get("v2", {})
            if sum(outcomes.values()) == len(bodies):
                break
            asyncio.run(asyncio.sleep(0.05))
        # Other probabilities on every row: each compared copy disagrees; none failed.
        assert sum(outcomes.values()) == len(bodies), outcomes
        assert outcomes.get("disagree", 0) > 0 and outcomes.get("error", 0) == 0, outcomes
        # The whole canary: every answer is v2's, computed on the same named rows.
        deploy(server, {"action": "candidate", "version": "v2", "canary": 1.0})
        replies = asyncio.run(post_many("127.0.0.1", server.port, "/predict/churn", bodies, concurrency=16))
        assert {r.headers["x-model-version"] for r in replies} == {"v2"}
        answered = [msgspec.json.decode(r.body)["probabilities"][0] for r in replies]
        assert_same_probabilities(answered, churn_v2.predict_proba(frame))
    finally:
        deploy(server, {"action": "clear_candidate"})
