"""The Open Inference Protocol (KServe "V2") over REST: its infer bodies as fastserve requests,
fastserve's answers as its infer responses, with the binary tensor extension both ways.

An infer body becomes the same ``PredictRequest`` or ``TabularRequest`` that ``POST /predict``
decodes, so it takes the same hot path (``predict_endpoint``):

- a positional version takes one numeric tensor ``[N, n_features]``; its values are converted
  to little-endian float64 bytes, which the queue copies straight into its ring buffer;
- a named-column version takes one tensor per column, ``[N]`` or ``[N, 1]``, strings as BYTES
  (MLServer's pandas codec), checked column by column as any named request is (``inputs.py``).

Binary framing: the first ``Inference-Header-Content-Length`` bytes of the (decompressed) body
are the JSON header; each input with ``parameters.binary_data_size`` has its bytes after it, in
input order, little-endian, row-major; BOOL is one byte, a BYTES element a 4-byte little-endian
length and its bytes. The answer uses the same framing for the outputs asked for in binary.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from fastserve.codec import PredictionEncoder, PredictRequest, TabularRequest
from fastserve.errors import BodyTooLarge, FastServeError, MalformedBody, UnknownOutput, UnsupportedMediaType
from fastserve.outputs import OUTPUTS
from fastserve.schema import InputSchema

if TYPE_CHECKING:
    from fastserve.batcher import Answer, Batcher
    from fastserve.predict_endpoint import Headers

# The numeric datatypes, as numpy dtypes of their little-endian binary form.
NUMERIC: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BOOL, BYTES = "BOOL", "BYTES"
_FLOAT64 = np.dtype("<f8")
_BOOL_BYTE = np.dtype("u1")

# zlib's window bits for each Content-Encoding: gzip's header, zlib's header ("deflate" means
# zlib's format, RFC 9110), or a raw deflate stream, which some clients send as "deflate".
_GZIP, _ZLIB, _RAW = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS
_JSON = b"application/json"
_OCTETS = b"application/octet-stream"


class Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    # Left undecoded until the datatype and the model say what it must hold: a positional
    # tensor's numbers are then decoded by msgspec straight into lists of floats (``_ROWS``).
    data: msgspec.Raw = msgspec.Raw()  # empty: no ``data`` (binary, or missing)


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct):
    """The JSON of an infer request; unknown keys and parameters are ignored."""

    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[RequestedOutput] | None = None


class Reply:
    """What the answer needs of its request: its ``id``, and each output asked for, in order,
    with whether it goes in binary."""

    __slots__ = ("id", "outputs")

    def __init__(self, id: str | None, outputs: list[tuple[str, bool]]) -> None:
        self.id = id
        self.outputs = outputs


_decode_request = msgspec.json.Decoder(InferRequest).decode
_decode_any = msgspec.json.Decoder().decode
# A numeric tensor's JSON ``data``, flat or nested a level (rows), as floats or as integers.
_FLAT: dict[str, Callable[[Any], list[Any]]] = {
    "f": msgspec.json.Decoder(list[float]).decode,
    "i": msgspec.json.Decoder(list[int]).decode,
}
_NESTED: dict[str, Callable[[Any], list[Any]]] = {
    "f": msgspec.json.Decoder(list[list[float]]).decode,
    "i": msgspec.json.Decoder(list[list[int]]).decode,
}
_encode = msgspec.json.Encoder().encode
encode_json = _encode


class V2Wire:
    """The Open Inference Protocol's infer route, as a ``predict_endpoint.Wire``.

    ``framing`` is (Content-Encoding, JSON header length or None). The request's Content-Type is
    ignored: tritonclient sends none, or ``application/octet-stream`` from its asyncio client.
    """

    def begin(
        self,
        content_type: bytes | None,
        accept: bytes | None,
        content_encoding: bytes | None,
        inference_header_length: bytes | None,
    ) -> tuple[int | None, int | None]:
        encoding = content_encoding
        wbits = None
        if encoding is not None:
            name = encoding.strip().lower()
            if name == b"gzip" or name == b"x-gzip":
                wbits = _GZIP
            elif name == b"deflate":
                wbits = _ZLIB
            elif name != b"identity":
                raise UnsupportedMediaType("Content-Encoding must be gzip, deflate or identity")
        length = inference_header_length
        if length is None:
            return wbits, None
        if not length.strip().isdigit():
            raise MalformedBody("Inference-Header-Content-Length must be a whole number of bytes")
        return wbits, int(length)

    def decode(
        self, body: bytes, framing: tuple[int | None, int | None], batcher: Batcher, max_body_bytes: int
    ) -> tuple[PredictRequest | TabularRequest, Reply]:
        wbits, header_length = framing
        if wbits is not None:
            body = inflate(body, wbits, max_body_bytes)
        request, tensors = split(body, header_length)
        return to_request(request, tensors, batcher.inputs.schema, batcher.outputs.names)

    def encode(
        self, encoder: PredictionEncoder, batcher: Batcher, answer: Answer, reply: Reply, framing: Any
    ) -> tuple[bytes, Headers]:
        return encode_response(batcher.model, batcher.version, answer, reply)

    def error(self, error: FastServeError, framing: Any) -> tuple[int, bytes, bytes]:
        return error_response(error)


def error_response(error: FastServeError) -> tuple[int, bytes, bytes]:
    """A V2 error: ``{"error": "<message>"}``. The protocol has no 422: input the model cannot
    take, as any other bad input, is a 400."""
    status = 400 if error.status == 422 else error.status
    return status, _JSON, _encode({"error": error.message})


# -- the request -----------------------------------------------------------------------------------


def inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """A compressed body, decompressed to at most ``limit`` bytes (413 past it): a small body that
    inflates to gigabytes (a decompression bomb) costs ``limit`` bytes of memory, no more."""
    if wbits == _ZLIB and not _has_zlib_header(body):
        wbits = _RAW
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedBody(f"the body does not decompress: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"the body decompresses past {limit} bytes")
    if not inflater.eof:
        raise MalformedBody("the compressed body is cut short")
    return out


def _has_zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def split(body: bytes, header_length: int | None) -> tuple[InferRequest, list[memoryview | msgspec.Raw]]:
    """The JSON header and each input's data: its binary bytes (a ``memoryview``), or its JSON
    ``data`` still undecoded."""
    header: bytes | memoryview
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if header_length > len(body):
            raise MalformedBody(
                f"Inference-Header-Content-Length is {header_length}, past the body's {len(body)} bytes"
            )
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    try:
        request = _decode_request(header)
    except msgspec.ValidationError as exc:
        raise MalformedBody(f"not an inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"the inference header is not valid JSON: {exc}") from None
    if not request.inputs:
        raise MalformedBody("`inputs` is empty")
    tensors: list[memoryview | msgspec.Raw] = []
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if not tensor.data:
                raise MalformedBody(f"input {tensor.name!r} has neither `data` nor `binary_data_size`")
            tensors.append(tensor.data)
            continue
        if type(size) is not int or size < 0:
            raise MalformedBody(f"input {tensor.name!r}: `binary_data_size` must be a whole number")
        if tensor.data:
            raise MalformedBody(f"input {tensor.name!r} has both `data` and `binary_data_size`")
        if offset + size > len(binary):
            raise MalformedBody(
                f"input {tensor.name!r}: binary data runs past the body "
                f"({offset + size} bytes after the header, the body has {len(binary)})"
            )
        tensors.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise MalformedBody(
            f"the inputs' binary_data_size add up to {offset} bytes, but {len(binary)} follow the header"
        )
    return request, tensors


def to_request(
    request: InferRequest, tensors: list[Any], schema: InputSchema, output_names: tuple[str, ...]
) -> tuple[PredictRequest | TabularRequest, Reply]:
    """The fastserve request of an infer body for a version of ``schema``, and what its answer needs."""
    reply, wanted = _outputs(request, output_names)
    inputs = request.inputs
    if schema.named and _columnar(request, schema):
        columns = {c.name: c for c in schema.columns}
        values: dict[str, list[Any]] = {}
        for tensor, data in zip(inputs, tensors, strict=True):
            column = columns.get(tensor.name)
            if column is None:
                raise MalformedBody(f"unknown input {tensor.name!r}; the model takes {', '.join(columns)}")
            if tensor.name in values:
                raise MalformedBody(f"input {tensor.name!r} is given twice")
            values[tensor.name] = _column(tensor, data)
        missing = [name for name in columns if name not in values]
        if missing:
            raise MalformedBody(f"input {missing[0]!r} is missing")
        try:
            return TabularRequest(inputs=values, outputs=wanted), reply
        except ValueError as exc:
            raise MalformedBody(str(exc)) from None
    if len(inputs) != 1:
        raise MalformedBody(
            f"this model takes one input tensor of shape [N, {schema.n_features}]; got {len(inputs)}"
        )
    tensor = inputs[0]
    rows = _rows(tensor, tensors[0], schema.n_features)
    if isinstance(rows, bytes):
        return PredictRequest(
            instances=rows, shape=(tensor.shape[0], schema.n_features), outputs=wanted
        ), reply
    return PredictRequest(instances=rows, outputs=wanted), reply


def _columnar(request: InferRequest, schema: InputSchema) -> bool:
    """Whether a named version's request gives its columns (else one positional tensor): said by
    ``parameters.content_type: "pd"``, or inferred from names that are the schema's."""
    content_type = (request.parameters or {}).get("content_type")
    if content_type == "pd":
        return True
    names = {c.name for c in schema.columns}
    if len(request.inputs) == 1 and request.inputs[0].name not in names and len(request.inputs[0].shape) == 2:
        return False
    return True


def _outputs(request: InferRequest, known: tuple[str, ...]) -> tuple[Reply, list[str] | None]:
    all_binary = (request.parameters or {}).get("binary_data_output") is True
    if not request.outputs:
        return Reply(request.id, [("predict", all_binary)]), None
    chosen = []
    for output in request.outputs:
        if output.name not in known:
            have = ", ".join(name for name in OUTPUTS if name in known)
            raise UnknownOutput(f"no output {output.name!r} for this version; it has {have}")
        binary = (output.parameters or {}).get("binary_data", all_binary)
        chosen.append((output.name, binary is True))
    names = [name for name, _ in chosen]
    if len(set(names)) != len(names):
        raise MalformedBody("`outputs` names an output twice")
    return Reply(request.id, chosen), names


def _n_elements(tensor: Tensor) -> int:
    if any(type(d) is not int or d < 0 for d in tensor.shape):
        raise MalformedBody(f"input {tensor.name!r}: shape must be whole numbers, got {tensor.shape}")
    return math.prod(tensor.shape)


def _rows(tensor: Tensor, data: memoryview | msgspec.Raw, n_features: int) -> bytes | list[list[Any]]:
    """One positional tensor ``[N, n_features]``: binary data as little-endian float64 bytes,
    JSON data as rows of numbers (which the queue copies into its buffer as it does /predict's)."""
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != n_features or type(shape[0]) is not int or shape[0] < 1:
        raise MalformedBody(f"input {tensor.name!r} has shape {shape}; the model takes [N, {n_features}]")
    dtype = NUMERIC.get(tensor.datatype)
    if dtype is None:
        raise MalformedBody(
            f"input {tensor.name!r} is {tensor.datatype}; the model takes FP64, FP32, FP16, INT* or UINT*"
        )
    if isinstance(data, memoryview):
        array = _binary(tensor, data, dtype)
        return array.tobytes() if array.dtype == _FLOAT64 else array.astype(_FLOAT64).tobytes()
    n_rows = shape[0]
    values = _json_numbers(tensor, data)
    if values and type(values[0]) is list:
        if len(values) != n_rows:
            raise MalformedBody(f"input {tensor.name!r}: `data` holds {len(values)} rows for shape {shape}")
        return values
    if len(values) != n_rows * n_features:
        raise MalformedBody(f"input {tensor.name!r}: `data` holds {len(values)} values for shape {shape}")
    if n_rows == 1:
        return [values]
    return [values[i * n_features : (i + 1) * n_features] for i in range(n_rows)]


def _json_numbers(tensor: Tensor, data: msgspec.Raw) -> list[Any]:
    """A numeric tensor's JSON ``data``: flat, or nested one level (its rows); integers only for
    an INT or UINT datatype, any number for a float one."""
    kind = "i" if tensor.datatype[0] in "IU" else "f"
    try:
        return _FLAT[kind](data)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"input {tensor.name!r}: `data` is not valid JSON: {exc}") from None
    try:
        return _NESTED[kind](data)
    except msgspec.ValidationError:
        raise MalformedBody(
            f"input {tensor.name!r}: `data` must be {tensor.datatype} numbers, flat or in rows"
        ) from None


def _binary(tensor: Tensor, data: memoryview, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    n = _n_elements(tensor)
    if len(data) != n * dtype.itemsize:
        raise MalformedBody(
            f"input {tensor.name!r}: {len(data)} bytes of binary data; shape {tensor.shape} of "
            f"{tensor.datatype} needs {n * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype)


def _column(tensor: Tensor, data: memoryview | msgspec.Raw) -> list[Any]:
    """One column tensor, ``[N]`` or ``[N, 1]``, as a list of values (strings for BYTES)."""
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise MalformedBody(f"input {tensor.name!r} has shape {shape}; a column is [N] or [N, 1]")
    n = _n_elements(tensor)
    if n < 1:
        raise MalformedBody(f"input {tensor.name!r} holds no value")
    datatype = tensor.datatype
    dtype = NUMERIC.get(datatype)
    if dtype is None and datatype != BYTES and datatype != BOOL:
        raise MalformedBody(f"input {tensor.name!r}: unknown datatype {datatype!r}")
    if isinstance(data, memoryview):
        if datatype == BYTES:
            return _strings(tensor.name, unpack_bytes(data, n, tensor.name))
        array = _binary(tensor, data, _BOOL_BYTE if datatype == BOOL else dtype)  # type: ignore[arg-type]
        values: list[Any] = (array != 0 if datatype == BOOL else array).tolist()
        return values
    try:
        flat = _flat(_decode_any(data))
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"input {tensor.name!r}: `data` is not valid JSON: {exc}") from None
    if datatype == BYTES:
        ok = all(type(v) is str for v in flat)
    elif datatype == BOOL:
        ok = all(type(v) is bool for v in flat)
    elif datatype[0] in "IU":
        ok = all(type(v) is int for v in flat)
    else:
        ok = all(type(v) is int or type(v) is float for v in flat)
    if len(flat) != n or not ok:
        raise MalformedBody(f"input {tensor.name!r}: `data` must be {n} {datatype} values")
    return flat


def _flat(data: Any) -> list[Any]:
    """Values given flat, or as ``[N, 1]`` rows of one value each."""
    if not isinstance(data, list):
        return [data]
    if data and all(isinstance(row, list) and len(row) == 1 for row in data):
        return [row[0] for row in data]
    return data


def unpack_bytes(data: memoryview, n: int, name: str) -> list[bytes]:
    """``n`` BYTES elements, each a 4-byte little-endian length and its bytes."""
    out = []
    offset, end = 0, len(data)
    for _ in range(n):
        if offset + 4 > end:
            raise MalformedBody(f"input {name!r}: BYTES data ends before its {n} elements")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > end:
            raise MalformedBody(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
        out.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != end:
        raise MalformedBody(f"input {name!r}: {end - offset} bytes left after its {n} BYTES elements")
    return out


def _strings(name: str, values: list[bytes]) -> list[str]:
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError:
        raise MalformedBody(f"input {name!r}: a BYTES element is not UTF-8") from None


def pack_bytes(values: list[Any]) -> bytes:
    """BYTES elements in binary: each a 4-byte little-endian length and its (UTF-8) bytes."""
    parts = []
    for value in values:
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


# -- the response ----------------------------------------------------------------------------------


def encode_response(model: str, version: str, answer: Answer, reply: Reply) -> tuple[bytes, Headers]:
    """The infer response's body and headers: JSON, then the binary outputs' bytes in order."""
    outputs = []
    blobs: list[bytes] = []
    for name, binary in reply.outputs:
        values = answer[name] if isinstance(answer, dict) else answer
        datatype = _datatype(values)
        if binary or datatype is None:  # a row of values a row (probabilities), or in binary
            datatype, shape, array = tensor_of(values)
            data: Any = array.reshape(-1).tolist()
        else:  # a value a row, in JSON: as the batch gave it, no array
            shape, data = [len(values)], values
        described: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = pack_bytes(data) if datatype == BYTES else array.tobytes()
            described["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            described["data"] = data
        outputs.append(described)
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if reply.id is not None:
        head["id"] = reply.id
    head["outputs"] = outputs
    header = _encode(head)
    if not blobs:
        return header, [(b"content-type", _JSON), (b"content-length", b"%d" % len(header))]
    body = b"".join((header, *blobs))
    return body, [
        (b"content-type", _OCTETS),
        (b"inference-header-content-length", b"%d" % len(header)),
        (b"content-length", b"%d" % len(body)),
    ]


# The datatype of a flat list of values, from its first (a batch's outputs are uniform).
_SCALARS = {bool: BOOL, int: "INT64", float: "FP64", str: BYTES}


def _datatype(values: list[Any]) -> str | None:
    """The datatype of a value a row, or None for rows of values (or nothing to tell by)."""
    return _SCALARS.get(type(values[0])) if values else None


def tensor_of(values: list[Any]) -> tuple[str, list[int], np.ndarray[Any, Any]]:
    """An output's datatype, shape and values: INT64 labels, FP64 scores, BYTES for strings."""
    array = np.asarray(values)
    kind = array.dtype.kind
    if kind == "b":
        return BOOL, list(array.shape), array
    if kind in "iu":
        return "INT64", list(array.shape), array.astype("<i8", copy=False)
    if kind == "f":
        return "FP64", list(array.shape), array.astype(_FLOAT64, copy=False)
    return BYTES, list(array.shape), array
