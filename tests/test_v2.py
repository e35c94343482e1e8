"""The Open Inference Protocol (KServe V2) over REST, end to end: the real clients (tritonclient's
``InferenceServerClient``, KServe's ``InferenceRESTClient``) and raw bodies against a real
``fastserve serve`` on Granian, serving the demo repository (digits v1 and v2, churn)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import math
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent.pool
import httpx
import numpy as np
import pytest
import skops.io as sio
import tritonclient.http as triton
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

import fastserve
from fastserve.repository import TRUSTED_TYPES

from conftest import RunningServer, free_port, running, serve_command, server_env, write_joblib_model
from fake_models import SleepyModel

pytestmark = pytest.mark.e2e

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module: loading the demo models is most of a test's time."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("v2")
    with running(serve_command(demo_repo, port), server_env(admin_token=TOKEN), port, tmp) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def rows() -> np.ndarray[Any, Any]:
    return load_digits().data  # type: ignore[no-any-return]


@functools.cache
def offline(repo: Path, model: str, version: str) -> Any:
    return sio.load(repo / model / version / "model.skops", trusted=list(TRUSTED_TYPES))


@pytest.fixture
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8) as c:
        yield c


def digits_input(x: np.ndarray[Any, Any], binary: bool, dtype: str = "FP64") -> triton.InferInput:
    numpy_type = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}[dtype]
    tensor = triton.InferInput("input-0", list(x.shape), dtype)
    tensor.set_data_from_numpy(x.astype(numpy_type), binary_data=binary)
    return tensor


def deploy(server: RunningServer, **action: object) -> None:
    response = httpx.post(f"{server.url}/deploy/digits", json=action, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text


# -- health and metadata ---------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "v2")
    assert not client.is_model_ready("digits", "v9")
    assert not client.is_model_ready("no-such-model")

    meta = client.get_server_metadata()
    assert meta["name"] == "fastserve" and "binary_tensor_data" in meta["extensions"]
    assert meta["version"] == fastserve.__version__

    model = client.get_model_metadata("digits")
    assert model["name"] == "digits" and sorted(model["versions"]) == ["v1", "v2"]
    assert model["platform"] == "sklearn"
    assert model["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 64]}]
    assert {"name": "predict", "datatype": "INT64", "shape": [-1]} in model["outputs"]
    assert {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 10]} in model["outputs"]
    assert client.get_model_metadata("digits", "v2")["versions"] == ["v2"]
    with pytest.raises(InferenceServerException, match="no version 'v9'"):
        client.get_model_metadata("digits", "v9")


def test_named_columns_metadata(server: RunningServer) -> None:
    meta = httpx.get(f"{server.url}/v2/models/churn", timeout=5).json()
    by_name = {t["name"]: t for t in meta["inputs"]}
    assert by_name["plan"] == {"name": "plan", "datatype": "BYTES", "shape": [-1]}
    assert by_name["age"]["datatype"] == "FP64"
    assert {"name": "predict", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]


def test_health_bodies_and_errors_are_v2_json(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    missing = httpx.get(f"{server.url}/v2/models/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json() == {"error": "no model named 'nope'"}


# -- infer through tritonclient --------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("version", [None, "v2"], ids=["routed", "pinned"])
def test_infer_matches_offline_predict(
    client: triton.InferenceServerClient,
    demo_repo: Path,
    rows: np.ndarray[Any, Any],
    binary_in: bool,
    binary_out: bool,
    version: str | None,
) -> None:
    x = rows[:5]
    model = offline(demo_repo, "digits", version or "v1")
    outputs = [
        triton.InferRequestedOutput("predict", binary_data=binary_out),
        triton.InferRequestedOutput("predict_proba", binary_data=binary_out),
    ]
    result = client.infer(
        "digits", [digits_input(x, binary_in)], model_version=version or "", outputs=outputs, request_id="r-1"
    )
    response = result.get_response()
    assert response["model_name"] == "digits" and response["model_version"] == (version or "v1")
    assert response["id"] == "r-1"
    predicted = result.as_numpy("predict")
    assert predicted.dtype == np.int64 and predicted.tolist() == model.predict(x).tolist()
    np.testing.assert_allclose(result.as_numpy("predict_proba"), model.predict_proba(x), rtol=1e-12)
    for output in response["outputs"]:
        assert ("binary_data_size" in output.get("parameters", {})) == binary_out


def test_default_output_is_predict_in_binary(
    client: triton.InferenceServerClient, demo_repo: Path, rows: Any
) -> None:
    # With no outputs named, tritonclient asks for every output in binary (binary_data_output).
    result = client.infer("digits", [digits_input(rows[:3], True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict"]
    assert (
        result.as_numpy("predict").tolist() == offline(demo_repo, "digits", "v1").predict(rows[:3]).tolist()
    )


@pytest.mark.parametrize("dtype", ["FP32", "INT64", "UINT8"])
def test_other_numeric_datatypes_become_float64_rows(
    client: triton.InferenceServerClient, demo_repo: Path, rows: Any, dtype: str
) -> None:
    x = rows[10:14]  # digits are whole numbers 0-16: exact in every one of these types
    for binary in (True, False):
        result = client.infer("digits", [digits_input(x, binary, dtype)])
        assert result.as_numpy("predict").tolist() == offline(demo_repo, "digits", "v1").predict(x).tolist()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    client: triton.InferenceServerClient, demo_repo: Path, rows: Any, algorithm: str
) -> None:
    x = rows[20:30]
    for binary in (True, False):
        result = client.infer("digits", [digits_input(x, binary)], request_compression_algorithm=algorithm)
        assert result.as_numpy("predict").tolist() == offline(demo_repo, "digits", "v1").predict(x).tolist()


def test_an_error_reaches_the_client_with_the_servers_message(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input-0", [1, 3], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 3)), binary_data=True)
    with pytest.raises(
        InferenceServerException, match=r"shape \[1, 3\]; the model takes \[N, 64\]"
    ) as raised:
        client.infer("digits", [tensor])
    assert raised.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no output 'transform'"):
        client.infer(
            "digits",
            [digits_input(np.zeros((1, 64)), True)],
            outputs=[triton.InferRequestedOutput("transform")],
        )
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as raised:
        client.infer("nope", [digits_input(np.zeros((1, 64)), True)])
    assert raised.value.status() == "404"


def test_named_columns_with_bytes_and_bool(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    records = [
        {"age": 31, "tenure_months": 12, "monthly": 49.5, "plan": "pro", "region": "eu", "autopay": True},
        {"age": 52, "tenure_months": 40, "monthly": 20.0, "plan": "basic", "region": "us", "autopay": False},
    ]
    native = httpx.post(
        f"{server.url}/predict/churn", json={"instances": records, "outputs": ["predict", "predict_proba"]}
    ).json()
    for binary in (True, False):
        tensors = []
        for name in records[0]:
            values = [r[name] for r in records]
            if isinstance(values[0], str):
                data, datatype = np.array([v.encode() for v in values], dtype=object), "BYTES"
            elif isinstance(values[0], bool):
                data, datatype = np.array(values, dtype=bool), "BOOL"
            else:
                data, datatype = np.array(values, dtype=np.float64), "FP64"
            tensor = triton.InferInput(name, [len(records)], datatype)
            tensor.set_data_from_numpy(data, binary_data=binary)
            tensors.append(tensor)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("predict", "predict_proba")]
        result = client.infer("churn", tensors, outputs=outputs, parameters={"content_type": "pd"})
        labels = result.as_numpy("predict").tolist()  # bytes in binary, str from JSON
        assert [v.decode() if isinstance(v, bytes) else v for v in labels] == native["predictions"]
        np.testing.assert_allclose(result.as_numpy("predict_proba"), native["probabilities"], rtol=1e-12)


# -- load and routing ------------------------------------------------------------------------------


def _infer_all(client: triton.InferenceServerClient, x: np.ndarray[Any, Any], concurrency: int) -> list[Any]:
    """One binary infer a row, ``concurrency`` in flight: tritonclient's own request, HTTP client
    and result parsing, each call in a greenlet. (Its ``async_infer`` sleeps 10 ms after every
    send, so it never has more than one request in flight against a fast server.)"""
    outputs = [triton.InferRequestedOutput("predict", binary_data=True)]

    def one(row: np.ndarray[Any, Any]) -> Any:
        return client.infer("digits", [digits_input(row[None, :], True)], outputs=outputs)

    return list(gevent.pool.Pool(concurrency).imap(one, x))


def test_concurrent_binary_infers_each_get_their_own_row(
    server: RunningServer, demo_repo: Path, rows: np.ndarray[Any, Any]
) -> None:
    rng = np.random.default_rng(17)
    x = rows[rng.integers(0, len(rows), 2000)] + rng.integers(0, 2, (2000, 64))
    before = _v1_totals(server)
    with triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=32) as client:
        results = _infer_all(client, x, 32)
    rows_after, batches_after = _v1_totals(server)
    expected = offline(demo_repo, "digits", "v1").predict(x).tolist()
    got = [int(r.as_numpy("predict")[0]) for r in results]
    assert got == expected
    # They were in flight together, and batched (the status is one worker's; there is one).
    assert rows_after - before[0] == 2000
    assert (rows_after - before[0]) / (batches_after - before[1]) > 1.5  # 8.5 on a busy 2-core machine


def _v1_totals(server: RunningServer) -> tuple[int, int]:
    v1 = httpx.get(f"{server.url}/status").json()["models"]["digits"]["versions"]["v1"]
    return v1["rows"], v1["batches"]


def test_canary_share_on_v2_traffic(
    server: RunningServer, demo_repo: Path, rows: np.ndarray[Any, Any]
) -> None:
    deploy(server, action="candidate", version="v2", canary=0.25)
    try:
        n = 2000
        x = rows[np.arange(n) % len(rows)]
        with triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16) as client:
            results = _infer_all(client, x, 16)
    finally:
        deploy(server, action="clear_candidate")
    expected = {v: offline(demo_repo, "digits", v).predict(x).tolist() for v in ("v1", "v2")}
    versions: Counter[str] = Counter()
    for i, result in enumerate(results):
        version = result.get_response()["model_version"]
        assert int(result.as_numpy("predict")[0]) == expected[version][i]
        versions[version] += 1
    # Binomial(2000, 0.25): 4.5 standard deviations either side cannot flake.
    assert abs(versions["v2"] - n * 0.25) < 4.5 * math.sqrt(n * 0.25 * 0.75), versions


def test_a_routing_key_keeps_its_version_on_v2(server: RunningServer, rows: np.ndarray[Any, Any]) -> None:
    deploy(server, action="candidate", version="v2", canary=0.5)
    try:
        with triton.InferenceServerClient(server.url.removeprefix("http://")) as client:
            seen: dict[str, set[str]] = {}
            for i in range(60):
                key = f"user-{i % 20}"
                result = client.infer(
                    "digits", [digits_input(rows[i : i + 1], True)], headers={"X-Routing-Key": key}
                )
                seen.setdefault(key, set()).add(result.get_response()["model_version"])
    finally:
        deploy(server, action="clear_candidate")
    assert all(len(versions) == 1 for versions in seen.values()), seen
    # Half the keys on each side: all 20 on one would be a 2**-19 chance.
    assert {v for versions in seen.values() for v in versions} == {"v1", "v2"}


def test_shadow_copies_v2_traffic_and_stable_answers(
    server: RunningServer, rows: np.ndarray[Any, Any]
) -> None:
    def mirrored() -> int:
        outcomes = httpx.get(f"{server.url}/status").json()["models"]["digits"]["shadow_outcomes"]
        return sum(outcomes.get("v2", {}).values())

    before = mirrored()
    deploy(server, action="candidate", version="v2", shadow=True)
    try:
        with triton.InferenceServerClient(server.url.removeprefix("http://")) as client:
            versions = {
                client.infer("digits", [digits_input(rows[i : i + 1], True)]).get_response()["model_version"]
                for i in range(30)
            }
        deadline = time.monotonic() + 10
        while mirrored() < before + 30:
            assert time.monotonic() < deadline, "the shadow copies were not counted"
            time.sleep(0.1)
    finally:
        deploy(server, action="clear_candidate")
    assert versions == {"v1"}  # stable answers; v2 only sees copies


def test_a_full_queue_and_a_queue_deadline_answer_in_v2(serve: Any, tmp_path: Path) -> None:
    write_joblib_model(tmp_path, "slow", "v1", SleepyModel(4, delay_s=1.0))
    server = serve(tmp_path, trusted_repository=1, max_queue_depth=1, max_batch_rows=1, queue_timeout_ms=500)
    url = server.url + "/v2/models/slow/infer"
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [7, 0, 0, 0]}]})

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            in_predict = asyncio.create_task(client.post(url, content=body))  # predicts for 1 s
            await asyncio.sleep(0.3)
            queued = asyncio.create_task(client.post(url, content=body))  # waits past 500 ms: 504
            await asyncio.sleep(0.2)
            refused = await client.post(url, content=body)  # the queue of one row is full: 429
            return [await in_predict, await queued, refused]

    answered, expired, refused = asyncio.run(scenario())
    assert answered.status_code == 200, answered.text
    assert answered.json()["outputs"][0]["data"] == [7]
    for response, status in ((expired, 504), (refused, 429)):
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert list(response.json()) == ["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.elapsed.total_seconds() < 0.5  # refused at once, not after the predict


# -- KServe's client -------------------------------------------------------------------------------


def test_kserve_rest_client(server: RunningServer, demo_repo: Path, rows: np.ndarray[Any, Any]) -> None:
    kserve = pytest.importorskip("kserve")
    x = rows[:4]

    async def scenario() -> Any:
        client = kserve.InferenceRESTClient(config=kserve.RESTConfig(protocol="v2"))
        try:
            assert await client.is_server_live(server.url)
            assert await client.is_server_ready(server.url)
            assert await client.is_model_ready(server.url, "digits")
            tensor = kserve.InferInput("input-0", list(x.shape), "FP64")
            tensor.set_data_from_numpy(x, binary_data=False)
            json_answer = await client.infer(
                server.url, kserve.InferRequest("digits", [tensor]), model_name="digits"
            )
            tensor = kserve.InferInput("input-0", list(x.shape), "FP64")
            tensor.set_data_from_numpy(x, binary_data=True)
            binary_answer = await client.infer(
                server.url, kserve.InferRequest("digits", [tensor]), model_name="digits"
            )
            return json_answer, binary_answer
        finally:
            await client.close()

    expected = offline(demo_repo, "digits", "v1").predict(x).tolist()
    for answer in asyncio.run(scenario()):
        assert answer.model_name == "digits"
        assert answer.outputs[0].name == "predict"
        assert answer.outputs[0].as_numpy().tolist() == expected


# -- the wire format, byte for byte ----------------------------------------------------------------


def post(
    server: RunningServer, body: bytes, headers: dict[str, str] | None = None, path: str = "digits"
) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{path}/infer", content=body, headers=headers or {}, timeout=10)


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"inference-header-content-length": str(len(head))}


def test_binary_response_layout_is_exact(server: RunningServer, rows: Any, demo_repo: Path) -> None:
    x = rows[:2]
    body, headers = binary_body(
        {
            "id": "exact",
            "inputs": [
                {"name": "x", "shape": [2, 64], "datatype": "FP64", "parameters": {"binary_data_size": 1024}}
            ],
            "outputs": [{"name": "predict", "parameters": {"binary_data": True, "classification": 3}}],
            "parameters": {"whatever": 1},
        },
        x.astype("<f8").tobytes(),
    )
    response = post(server, body, {**headers, "content-type": "application/x-anything"})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    assert int(response.headers["content-length"]) == len(response.content) == length + 16
    head = json.loads(response.content[:length])
    assert head == {
        "model_name": "digits",
        "model_version": "v1",
        "id": "exact",
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}
        ],
    }
    labels = offline(demo_repo, "digits", "v1").predict(x)
    assert response.content[length:] == labels.astype("<i8").tobytes()


def test_json_data_may_be_nested_or_flat(server: RunningServer, rows: Any, demo_repo: Path) -> None:
    x = rows[:2]
    expected = offline(demo_repo, "digits", "v1").predict(x).tolist()
    for data in (x.tolist(), x.reshape(-1).tolist()):
        tensor = {"name": "x", "shape": [2, 64], "datatype": "FP32", "data": data}
        response = post(server, json.dumps({"inputs": [tensor]}).encode())
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["outputs"] == [
            {"name": "predict", "datatype": "INT64", "shape": [2], "data": expected}
        ]


def test_bytes_columns_in_binary_byte_for_byte(server: RunningServer) -> None:
    def packed(*values: bytes) -> bytes:
        return b"".join(struct.pack("<I", len(v)) + v for v in values)

    columns = [
        ("age", "FP64", np.array([31.0]).tobytes()),
        ("tenure_months", "INT32", np.array([12], dtype="<i4").tobytes()),
        ("monthly", "FP64", np.array([49.5]).tobytes()),
        ("plan", "BYTES", packed(b"pro")),
        ("region", "BYTES", packed(b"eu")),
        ("autopay", "BOOL", b"\x01"),
    ]
    inputs = [
        {"name": n, "shape": [1, 1], "datatype": t, "parameters": {"binary_data_size": len(b)}}
        for n, t, b in columns
    ]
    body, headers = binary_body(
        {"inputs": inputs, "outputs": [{"name": "predict", "parameters": {"binary_data": True}}]},
        *(b for *_, b in columns),
    )
    response = post(server, body, headers, path="churn")
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    assert head["outputs"][0]["datatype"] == "BYTES"
    label = response.content[length + 4 :]
    assert struct.unpack("<I", response.content[length : length + 4])[0] == len(label)
    native = httpx.post(
        f"{server.url}/predict/churn",
        json={
            "features": {
                "age": 31,
                "tenure_months": 12,
                "monthly": 49.5,
                "plan": "pro",
                "region": "eu",
                "autopay": True,
            }
        },
    ).json()
    assert label.decode() == native["predictions"][0]


def test_json_columns_as_n_by_1_are_inferred_from_their_names(server: RunningServer) -> None:
    records = [
        {"age": 31, "tenure_months": 12, "monthly": 49.5, "plan": "pro", "region": "eu", "autopay": True},
        {"age": 52, "tenure_months": 40, "monthly": 20.0, "plan": "basic", "region": "us", "autopay": False},
    ]
    datatypes = {
        "age": "INT64",
        "tenure_months": "INT64",
        "monthly": "FP32",
        "plan": "BYTES",
        "region": "BYTES",
    }
    inputs = [
        {
            "name": name,
            "shape": [2, 1],
            "datatype": datatypes.get(name, "BOOL"),
            "data": [[r[name]] for r in records],
        }
        for name in records[0]
    ]
    response = post(server, json.dumps({"inputs": inputs}).encode(), path="churn")  # no content_type
    assert response.status_code == 200, response.text
    native = httpx.post(f"{server.url}/predict/churn", json={"instances": records}).json()
    (output,) = response.json()["outputs"]
    assert output == {"name": "predict", "datatype": "BYTES", "shape": [2], "data": native["predictions"]}


def _tensor(size: int | None = None, **fields: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "x", "shape": [1, 64], "datatype": "FP64"}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    return {**tensor, **fields}


ROW = np.zeros(64).tobytes()
MALFORMED = {
    "sizes that do not add up": binary_body({"inputs": [_tensor(512)]}, ROW, b"\0" * 8),
    "a size past the body": binary_body({"inputs": [_tensor(1024)]}, ROW),
    "a header length past the body": (b'{"inputs": []}', {"inference-header-content-length": "999"}),
    "a header that is not JSON": binary_body({"inputs": [_tensor(512)]}, ROW)[0][:-600] + ROW,
    "a wrong datatype": json.dumps({"inputs": [_tensor(datatype="BYTES", data=["a"] * 64)]}).encode(),
    "strings in a numeric tensor": json.dumps({"inputs": [_tensor(data=["1.5"] * 64)]}).encode(),
    "floats in an integer tensor": json.dumps(
        {"inputs": [_tensor(datatype="INT64", data=[1.5] * 64)]}
    ).encode(),
    "a wrong shape": json.dumps({"inputs": [_tensor(shape=[1, 63], data=[0] * 63)]}).encode(),
    "data that does not fill its shape": json.dumps({"inputs": [_tensor(data=[0] * 60)]}).encode(),
    "ragged rows": json.dumps({"inputs": [_tensor(shape=[2, 64], data=[[0] * 64, [0] * 63])]}).encode(),
    "binary bytes that do not fill the shape": binary_body({"inputs": [_tensor(504)]}, ROW[:504]),
    "two tensors for a positional model": json.dumps({"inputs": [_tensor(data=[0] * 64)] * 2}).encode(),
    "no data at all": json.dumps({"inputs": [_tensor()]}).encode(),
    "not an inference request": b'{"instances": [[1, 2]]}',
    "NaN in binary rows": binary_body({"inputs": [_tensor(512)]}, np.full(64, np.nan).tobytes()),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_bodies_get_400_with_a_v2_error(server: RunningServer, case: str) -> None:
    body = MALFORMED[case]
    content, headers = body if isinstance(body, tuple) else (body, {})
    response = post(server, content, headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]


def _column(name: str, datatype: str, blob: bytes) -> dict[str, Any]:
    return {"name": name, "shape": [1], "datatype": datatype, "parameters": {"binary_data_size": len(blob)}}


CHURN_ROW = [
    ("age", "FP64", np.array([31.0]).tobytes()),
    ("tenure_months", "FP64", np.array([12.0]).tobytes()),
    ("monthly", "FP64", np.array([49.5]).tobytes()),
    ("region", "BYTES", struct.pack("<I", 2) + b"eu"),
    ("autopay", "BOOL", b"\x01"),
]


@pytest.mark.parametrize(
    "plan, expected",
    [
        (("plan", "BYTES", struct.pack("<I", 50) + b"pro"), "runs past"),
        (("plan", "BYTES", struct.pack("<I", 3) + b"pro" + b"??"), "left after"),
        (("plan", "BYTES", struct.pack("<I", 2) + b"\xff\xfe"), "not UTF-8"),
        (("plan", "FP64", np.array([1.0]).tobytes()), "expected a string"),
        (("plans", "BYTES", struct.pack("<I", 3) + b"pro"), "unknown input 'plans'"),
    ],
    ids=[
        "bytes-length-past-buffer",
        "bytes-left-over",
        "bytes-not-utf8",
        "wrong-datatype",
        "unknown-input-name",
    ],
)
def test_malformed_column_tensors_get_400(
    server: RunningServer, plan: tuple[str, str, bytes], expected: str
) -> None:
    columns = [*CHURN_ROW, plan]
    body, headers = binary_body({"inputs": [_column(*c) for c in columns]}, *(c[2] for c in columns))
    response = post(server, body, headers, path="churn")
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


def test_a_decompression_bomb_gets_413(server: RunningServer) -> None:
    bomb = gzip.compress(b'{"inputs": [' + b" " * (64 * 1024 * 1024) + b"]}")  # 64 MiB in about 64 KiB
    assert len(bomb) < 1024 * 1024
    response = post(server, bomb, {"content-encoding": "gzip"})
    assert response.status_code == 413, response.text
    assert "decompresses past" in response.json()["error"]
    # A stream cut short, or not compressed at all, is bad input.
    whole = zlib.compress(json.dumps({"inputs": [_tensor(data=[0] * 64)]}).encode())
    assert post(server, whole, {"content-encoding": "deflate"}).status_code == 200
    assert post(server, whole[:-10], {"content-encoding": "deflate"}).status_code == 400
    assert post(server, b"not gzip", {"content-encoding": "gzip"}).status_code == 400
    assert post(server, whole, {"content-encoding": "br"}).status_code == 415


def test_metrics_count_v2_answers_like_predict(server: RunningServer) -> None:
    def ok_count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        for line in text.splitlines():
            if (
                line.startswith("fastserve_requests_total{")
                and 'model="digits"' in line
                and 'version="v1"' in line
                and 'code="200"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = ok_count()
    body = json.dumps({"inputs": [_tensor(data=[0] * 64)]}).encode()
    for _ in range(3):
        assert post(server, body).status_code == 200
    deadline = time.monotonic() + 10
    while ok_count() < before + 3:
        assert time.monotonic() < deadline, "the V2 answers were not counted"
        time.sleep(0.2)
