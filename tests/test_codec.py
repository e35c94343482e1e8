"""codec: content negotiation, decoding and validation of predict bodies, response and error bodies."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve.codec import (
    PredictionEncoder,
    PredictRequest,
    WireFormat,
    decode,
    error_body,
    request_format,
    response_format,
)
from fastserve.errors import (
    BadFeatures,
    FastServeError,
    MalformedBody,
    QueueFull,
    TooManyRows,
    UnknownModel,
    UnsupportedMediaType,
)

JSON = WireFormat.JSON
MSGPACK = WireFormat.MSGPACK
BOTH = pytest.mark.parametrize("fmt", [JSON, MSGPACK], ids=["json", "msgpack"])


def encode(value: object, fmt: WireFormat) -> bytes:
    if fmt is JSON:
        return msgspec.json.encode(value)
    return msgspec.msgpack.encode(value)


def unpack(body: bytes, fmt: WireFormat) -> object:
    if fmt is JSON:
        return msgspec.json.decode(body)
    return msgspec.msgpack.decode(body)


def binary_body(rows: list[list[float]], shape: list[int] | None = None) -> bytes:
    raw = np.asarray(rows, dtype="<f8").tobytes()
    body: dict[str, object] = {"instances": raw}
    body["shape"] = list(np.asarray(rows).shape) if shape is None else shape
    return msgspec.msgpack.encode(body)


def assert_malformed(body: bytes, fmt: WireFormat, match: str) -> MalformedBody:
    with pytest.raises(MalformedBody, match=match) as info:
        decode(body, fmt)
    assert info.value.status == 400
    assert info.value.code == "malformed_body"
    return info.value


# --- request_format -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, b""])
def test_request_format_defaults_to_json_without_content_type(content_type: bytes | None) -> None:
    assert request_format(content_type) is JSON


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/json;charset=UTF-8",
        b"Application/JSON",
        b"  application/json  ; charset=utf-8",
    ],
)
def test_request_format_json_with_parameters_and_any_case(content_type: bytes) -> None:
    assert request_format(content_type) is JSON


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/msgpack",
        b"application/x-msgpack",
        b"application/vnd.msgpack",
        b"application/MsgPack",
        b"application/x-msgpack; charset=binary",
    ],
)
def test_request_format_msgpack_variants(content_type: bytes) -> None:
    assert request_format(content_type) is MSGPACK


@pytest.mark.parametrize(
    "content_type",
    [
        b"text/plain",
        b"text/plain; charset=utf-8",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=xyz",
        b"application/python-pickle",
        b"application/x-python-pickle",
        b"application/octet-stream",
        b"application/json-seq",
        b"text/json",
        b"application/xml",
    ],
)
def test_request_format_refuses_anything_else_with_415(content_type: bytes) -> None:
    with pytest.raises(UnsupportedMediaType, match="send application/json or application/msgpack") as info:
        request_format(content_type)
    assert info.value.status == 415
    assert info.value.code == "unsupported_media_type"


# --- response_format ----------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("accept", [None, b"", b"*/*", b"*/*;q=0.8", b"text/html", b"text/html,*/*;q=0.8"])
def test_response_format_falls_back_to_the_request_format(accept: bytes | None, fmt: WireFormat) -> None:
    assert response_format(accept, fmt) is fmt


@BOTH
@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"application/json", JSON),
        (b"application/msgpack", MSGPACK),
        (b"application/x-msgpack", MSGPACK),
        (b"application/vnd.msgpack", MSGPACK),
        (b"Application/MsgPack", MSGPACK),
        (b"application/json; charset=utf-8", JSON),
        (b"text/html, application/msgpack;q=0.9, */*;q=0.1", MSGPACK),
    ],
)
def test_response_format_follows_accept(accept: bytes, expected: WireFormat, fmt: WireFormat) -> None:
    assert response_format(accept, fmt) is expected


@BOTH
@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"application/msgpack, application/json", MSGPACK),
        (b"application/json, application/msgpack", JSON),
        (b"application/x-msgpack;q=0.9, application/json;q=0.9", MSGPACK),
    ],
)
def test_response_format_equal_preference_takes_the_first_named(
    accept: bytes, expected: WireFormat, fmt: WireFormat
) -> None:
    assert response_format(accept, fmt) is expected


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"application/json;q=0.5, application/msgpack", MSGPACK),
        (b"application/json;q=0.5, application/msgpack;q=0.9", MSGPACK),
        (b"application/msgpack;q=0.1, application/json;q=0.9", JSON),
        (b"application/msgpack;q=0.2, application/json", JSON),
    ],
)
def test_response_format_orders_by_q_values_not_position(accept: bytes, expected: WireFormat) -> None:
    # RFC 9110 §12.5.1: the q weight, not the position in the header, says which is preferred.
    # The request's format is the other one, so only Accept can give the expected answer.
    other = JSON if expected is MSGPACK else MSGPACK
    assert response_format(accept, other) is expected


# --- decode: the good shapes --------------------------------------------------------------------


@BOTH
def test_decode_one_row(fmt: WireFormat) -> None:
    request = decode(encode({"features": [1.5, -2, 0, 3e10]}, fmt), fmt)
    assert request.features == [1.5, -2.0, 0.0, 3e10]
    assert all(isinstance(value, float) for value in request.features)
    assert request.instances is None
    assert request.shape is None
    assert request.n_rows == 1


@BOTH
def test_decode_many_rows(fmt: WireFormat) -> None:
    rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-7.25, 0.0, 1e-300]]
    request = decode(encode({"instances": rows}, fmt), fmt)
    assert request.instances == rows
    assert request.features is None
    assert request.n_rows == 3


@BOTH
def test_decode_ignores_unknown_keys(fmt: WireFormat) -> None:
    request = decode(encode({"id": "abc", "features": [1.0], "meta": {"a": [1, 2]}}, fmt), fmt)
    assert request.features == [1.0]


def test_decode_binary_msgpack_rows() -> None:
    rows = [[1.0, 2.0], [3.5, -4.0], [0.0, 1e308]]
    request = decode(binary_body(rows), MSGPACK)
    assert request.shape == (3, 2)
    assert isinstance(request.instances, bytes)
    assert request.instances == np.asarray(rows, dtype="<f8").tobytes()
    assert np.frombuffer(request.instances, dtype="<f8").reshape(3, 2).tolist() == rows
    assert request.n_rows == 3


def test_decode_binary_single_row_single_feature() -> None:
    request = decode(binary_body([[42.0]]), MSGPACK)
    assert request.n_rows == 1
    assert request.shape == (1, 1)


def test_n_rows_for_each_form() -> None:
    assert PredictRequest(features=[1.0, 2.0]).n_rows == 1
    assert PredictRequest(instances=[[1.0], [2.0], [3.0], [4.0]]).n_rows == 4
    assert PredictRequest(instances=b"\0" * 8 * 6, shape=(3, 2)).n_rows == 3


# --- decode: undecodable bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"features": [1, 2',
        b'{"features": [1, 2]',
        b"{",
        b'{"features": [1]} trailing',
        b"\xff\xfe\x00",
    ],
    ids=["empty", "truncated-array", "truncated-object", "brace", "trailing", "binary"],
)
def test_decode_undecodable_json_is_malformed(body: bytes) -> None:
    assert_malformed(body, JSON, r"^body is not valid JSON: ")


def test_decode_json_nan_literal_is_malformed() -> None:
    assert_malformed(b'{"features": [NaN]}', JSON, r"^body is not valid JSON: ")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        msgspec.msgpack.encode({"features": [1.0, 2.0]})[:-3],
        msgspec.msgpack.encode({"features": [1.0]}) + b"\x00",
        b"\xc1",
    ],
    ids=["empty", "truncated", "trailing", "invalid-opcode"],
)
def test_decode_undecodable_msgpack_is_malformed(body: bytes) -> None:
    assert_malformed(body, MSGPACK, r"^body is not valid MSGPACK: ")


def test_decode_truncated_binary_body_is_malformed() -> None:
    body = binary_body([[1.0, 2.0], [3.0, 4.0]])
    for cut in (1, 5, 17, len(body) - 1):
        with pytest.raises(MalformedBody) as info:
            decode(body[:cut], MSGPACK)
        assert info.value.status == 400


@BOTH
def test_decode_deeply_nested_unknown_key_is_malformed(fmt: WireFormat) -> None:
    # 10 KB of nesting under a key the struct ignores: a client error, not a RecursionError (500).
    depth = 5_000
    if fmt is JSON:
        body = b'{"x":' + b"[" * depth + b"]" * depth + b',"features":[1]}'
    else:
        body = b"\x82\xa1x" + b"\x91" * depth + b"\x90" + b"\xa8features\x91\x01"
    with pytest.raises(MalformedBody) as info:
        decode(body, fmt)
    assert info.value.status == 400


# --- decode: wrong shapes and types -------------------------------------------------------------


@BOTH
@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"features": None},
        {"instances": None},
        {"shape": [1, 1]},
        {"features": [1.0], "instances": [[1.0]]},
    ],
    ids=["empty", "features-null", "instances-null", "shape-only", "both"],
)
def test_decode_needs_exactly_one_of_features_or_instances(
    payload: dict[str, object], fmt: WireFormat
) -> None:
    assert_malformed(encode(payload, fmt), fmt, r"give exactly one of `features` or `instances`")


@BOTH
def test_decode_empty_instances_is_malformed(fmt: WireFormat) -> None:
    assert_malformed(encode({"instances": []}, fmt), fmt, r"`instances` is empty")


@BOTH
@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"features": ["1.0"]}, r"Expected `float`, got `str` - at `\$\.features\[0\]`"),
        ({"features": [1.0, True]}, r"Expected `float`, got `bool` - at `\$\.features\[1\]`"),
        ({"features": [None]}, r"Expected `float`, got `(null|None)` - at `\$\.features\[0\]`"),
        ({"features": [[1.0]]}, r"Expected `float`, got `array` - at `\$\.features\[0\]`"),
        ({"features": {"a": 1.0}}, r"Expected `array \| null`, got `object` - at `\$\.features`"),
        ({"features": 1.0}, r"Expected `array \| null`, got `float` - at `\$\.features`"),
        ({"instances": [1.0, 2.0]}, r"Expected `array`, got `float` - at `\$\.instances\[0\]`"),
        ({"instances": [[[1.0]]]}, r"Expected `float`, got `array` - at `\$\.instances\[0\]\[0\]`"),
        ({"instances": [[1.0], ["x"]]}, r"Expected `float`, got `str` - at `\$\.instances\[1\]\[0\]`"),
        ({"instances": [[False]]}, r"Expected `float`, got `bool` - at `\$\.instances\[0\]\[0\]`"),
        ({"features": [1.0], "shape": [1]}, r"Expected `array` of length 2.* - at `\$\.shape`"),
        ({"features": [1.0], "shape": ["1", "1"]}, r"Expected `int`, got `str` - at `\$\.shape\[0\]`"),
    ],
)
def test_decode_wrong_types_are_malformed(payload: dict[str, object], match: str, fmt: WireFormat) -> None:
    assert_malformed(encode(payload, fmt), fmt, match)


@BOTH
@pytest.mark.parametrize("body", [[1.0, 2.0], "features", 3, None], ids=["array", "string", "int", "null"])
def test_decode_top_level_must_be_an_object(body: object, fmt: WireFormat) -> None:
    assert_malformed(encode(body, fmt), fmt, r"Expected `object`, got `\w+`")


def test_decode_msgpack_string_instead_of_binary_rows_is_malformed() -> None:
    body = msgspec.msgpack.encode({"instances": "x" * 8, "shape": [1, 1]})
    assert_malformed(body, MSGPACK, r"got `str` - at `\$\.instances`")


def test_decode_binary_without_shape_is_malformed() -> None:
    body = msgspec.msgpack.encode({"instances": b"\0" * 16})
    assert_malformed(body, MSGPACK, r"binary `instances` need `shape: \[rows, features\]`")


@pytest.mark.parametrize(
    ("n_bytes", "shape"),
    [(8, [2, 1]), (16, [1, 1]), (23, [1, 3]), (0, [1, 1]), (8, [2**62, 2])],
)
def test_decode_binary_shape_and_length_must_agree(n_bytes: int, shape: list[int]) -> None:
    body = msgspec.msgpack.encode({"instances": b"\0" * n_bytes, "shape": shape})
    rows, cols = shape
    error = assert_malformed(
        body,
        MSGPACK,
        rf"`instances` holds {n_bytes} bytes; shape {rows}x{cols} of float64 needs {rows * cols * 8}",
    )
    assert str(error) == error.message


@pytest.mark.parametrize("shape", [[0, 1], [1, 0], [0, 0], [-1, -8], [-2, -1]])
def test_decode_binary_shape_must_be_positive(shape: list[int]) -> None:
    body = msgspec.msgpack.encode({"instances": b"\0" * 8, "shape": shape})
    assert_malformed(body, MSGPACK, r"`shape` must be two positive integers")


def test_decode_binary_shape_of_bools_is_malformed() -> None:
    body = msgspec.msgpack.encode({"instances": b"\0" * 8, "shape": [True, True]})
    assert_malformed(body, MSGPACK, r"Expected `int`, got `bool` - at `\$\.shape\[0\]`")


@pytest.mark.parametrize(
    "body",
    [
        b'{"features": [1e999]}',
        b'{"features": [1.0, -1e999]}',
        b'{"instances": [[1.0], [1' + b"0" * 400 + b"]]}",
    ],
    ids=["inf", "minus-inf", "huge-int"],
)
def test_decode_json_number_out_of_range_is_bad_features(body: bytes) -> None:
    with pytest.raises(
        BadFeatures, match=r"^features must be finite numbers: Number out of range - at `\$\."
    ) as info:
        decode(body, JSON)
    assert info.value.status == 422
    assert info.value.code == "bad_features"


# --- responses ----------------------------------------------------------------------------------

NAMES = [
    ("digits", "v1"),
    ('say "hi"', 'v"2\\'),
    ("modèle-ünïcödé", "版本-3"),
    ("emoji-🚀", "v\n\t\x00"),
    ("m" * 40, "v" * 300),
]


@BOTH
@pytest.mark.parametrize(("model", "version"), NAMES)
@pytest.mark.parametrize(
    "predictions",
    [[3], [0, 1, -2, 2**62], [0.25, -1.5, 1e-300, 1e300], ["setosa", 'quo"te', "ünï\\"], [], [1, 2.5, "x"]],
    ids=["one-int", "ints", "floats", "strings", "none", "mixed"],
)
def test_prediction_encoder_body_decodes_to_exactly_the_three_keys(
    model: str, version: str, predictions: list[object], fmt: WireFormat
) -> None:
    body = PredictionEncoder(model, version).encode(predictions, fmt)
    decoded = unpack(body, fmt)
    assert decoded == {"model": model, "version": version, "predictions": predictions}
    assert isinstance(decoded, dict)
    assert list(decoded) == ["model", "version", "predictions"]


@BOTH
def test_prediction_encoder_is_reusable(fmt: WireFormat) -> None:
    encoder = PredictionEncoder("iris", "v10")
    first = encoder.encode([1, 2], fmt)
    second = encoder.encode(["a"], fmt)
    assert unpack(first, fmt) == {"model": "iris", "version": "v10", "predictions": [1, 2]}
    assert unpack(second, fmt) == {"model": "iris", "version": "v10", "predictions": ["a"]}


def test_prediction_encoder_json_is_plain_utf8_json() -> None:
    import json

    body = PredictionEncoder('a"b', "ü").encode([1.5], JSON)
    assert json.loads(body.decode("utf-8")) == {"model": 'a"b', "version": "ü", "predictions": [1.5]}


@BOTH
@pytest.mark.parametrize(
    "error",
    [
        MalformedBody("body is not valid JSON: truncated"),
        BadFeatures("features must be finite numbers"),
        UnsupportedMediaType("send application/json or application/msgpack"),
        TooManyRows("2000 rows; at most 1024 per request"),
        UnknownModel('no model "x\\y" ü'),
        QueueFull("queue is full", retry_after_s=3),
        FastServeError("internal"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_error_body_has_code_and_message(error: FastServeError, fmt: WireFormat) -> None:
    decoded = unpack(error_body(error, fmt), fmt)
    assert decoded == {"error": {"code": error.code, "message": error.message}}


def test_error_body_defaults_to_json() -> None:
    error = MalformedBody("nope")
    assert msgspec.json.decode(error_body(error)) == {"error": {"code": "malformed_body", "message": "nope"}}


# --- properties ---------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def row_blocks(draw: st.DrawFn) -> list[list[float]]:
    n_rows = draw(st.integers(min_value=1, max_value=20))
    n_features = draw(st.integers(min_value=1, max_value=12))
    row = st.lists(finite, min_size=n_features, max_size=n_features)
    return draw(st.lists(row, min_size=n_rows, max_size=n_rows))


def same_floats(left: list[float], right: list[float]) -> bool:
    return all(
        math.copysign(1.0, a) == math.copysign(1.0, b) and a == b for a, b in zip(left, right, strict=True)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=row_blocks())
def test_property_every_form_decodes_to_the_same_rows(rows: list[list[float]]) -> None:
    n_rows, n_features = len(rows), len(rows[0])
    for fmt in (JSON, MSGPACK):
        request = decode(encode({"instances": rows}, fmt), fmt)
        assert request.n_rows == n_rows
        assert isinstance(request.instances, list)
        for got, sent in zip(request.instances, rows, strict=True):
            assert same_floats(got, sent)

        one = decode(encode({"features": rows[0]}, fmt), fmt)
        assert one.n_rows == 1
        assert one.features is not None and same_floats(one.features, rows[0])

    binary = decode(binary_body(rows), MSGPACK)
    assert binary.n_rows == n_rows
    assert binary.shape == (n_rows, n_features)
    assert isinstance(binary.instances, bytes)
    values = np.frombuffer(binary.instances, dtype="<f8").reshape(n_rows, n_features).tolist()
    for got, sent in zip(values, rows, strict=True):
        assert same_floats(got, sent)


def assert_decodes_or_client_error(body: bytes, fmt: WireFormat) -> None:
    try:
        request = decode(body, fmt)
    except (MalformedBody, BadFeatures) as exc:
        assert isinstance(exc, FastServeError)
        assert 400 <= exc.status < 500
        assert exc.code in {"malformed_body", "bad_features"}
    else:
        assert isinstance(request, PredictRequest)
        assert request.n_rows >= 1


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), fmt=st.sampled_from([JSON, MSGPACK]))
def test_property_garbage_bytes_only_raise_client_errors(body: bytes, fmt: WireFormat) -> None:
    assert_decodes_or_client_error(body, fmt)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["features", "instances", "shape", "x"]), inner, max_size=4)
    ),
    max_leaves=20,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | finite
    | st.text(max_size=5)
    | st.binary(max_size=24),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["features", "instances", "shape", "x"]), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_property_wellformed_json_of_any_shape_only_raises_client_errors(value: object) -> None:
    assert_decodes_or_client_error(msgspec.json.encode(value), JSON)


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values, cut=st.integers(min_value=0, max_value=8))
def test_property_msgpack_of_any_shape_or_truncated_only_raises_client_errors(
    value: object, cut: int
) -> None:
    body = msgspec.msgpack.encode(value)
    assert_decodes_or_client_error(body, MSGPACK)
    assert_decodes_or_client_error(body[: max(0, len(body) - cut)], MSGPACK)
