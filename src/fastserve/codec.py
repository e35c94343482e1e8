"""Wire formats: msgspec decoders and encoders, content negotiation, error bodies.

Every decoder and encoder is built once at import; a request only calls ``decode``. The
decoded rows stay as msgspec returned them (lists of floats, or raw bytes) until the queue
copies them into the model's buffer: no intermediate numpy array per request.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec

from fastserve.errors import BadFeatures, FastServeError, MalformedBody, UnsupportedMediaType


class WireFormat(StrEnum):
    JSON = "application/json"
    MSGPACK = "application/msgpack"


# What a request may ask a version for, and the key of each in the answer.
OUTPUT_KEYS = {
    "predict": "predictions",
    "predict_proba": "probabilities",
    "predict_log_proba": "log_probabilities",
    "decision_function": "scores",
}
DEFAULT_OUTPUTS = ("predict",)


class PredictRequest(msgspec.Struct):
    """One row (``features``), many rows (``instances``), or raw float64 rows plus ``shape``,
    all positional; ``outputs`` names what to answer (predictions only when absent)."""

    features: list[float] | None = None
    instances: list[list[float]] | bytes | None = None
    shape: tuple[int, int] | None = None
    outputs: list[str] | None = None

    def __post_init__(self) -> None:
        # Raised inside decode, so msgspec reports it as a ValidationError (-> 400).
        if (self.features is None) == (self.instances is None):
            raise ValueError("give exactly one of `features` or `instances`")
        if isinstance(self.instances, bytes):
            if self.shape is None:
                raise ValueError("binary `instances` need `shape: [rows, features]`")
            rows, cols = self.shape
            if rows < 1 or cols < 1:
                raise ValueError("`shape` must be two positive integers")
            if len(self.instances) != rows * cols * 8:
                raise ValueError(
                    f"`instances` holds {len(self.instances)} bytes; shape {rows}x{cols} of float64 "
                    f"needs {rows * cols * 8}"
                )
        elif self.shape is not None:
            raise ValueError("`shape` goes only with binary `instances`")
        elif self.instances is not None and not self.instances:
            raise ValueError("`instances` is empty")
        _check_outputs(self.outputs)

    @property
    def n_rows(self) -> int:
        if self.features is not None:
            return 1
        if isinstance(self.instances, bytes):
            assert self.shape is not None
            return self.shape[0]
        assert self.instances is not None
        return len(self.instances)


class DataFrameSplit(msgspec.Struct, forbid_unknown_fields=True):
    """MLflow's ``dataframe_split``: column names, and the rows as lists in that order."""

    columns: list[str]
    data: list[list[Any]]
    index: list[Any] | None = None  # pandas' "split" orient carries it; rows keep their order


class TabularRequest(msgspec.Struct):
    """Every request form a named-column version takes, decoded as plain values: the rows are
    checked against the version's schema when they are written (``inputs.py``).

    - positional, as ``PredictRequest``: ``features`` as a list, ``instances`` as lists or bytes;
    - named rows (KServe V1, TF Serving's row format): ``instances`` as objects, one row as
      ``features`` as an object;
    - columnar (TF Serving): ``inputs``, column -> values;
    - MLflow's scoring formats: ``dataframe_split`` and ``dataframe_records``.
    """

    features: list[Any] | dict[str, Any] | None = None
    instances: list[Any] | bytes | None = None
    shape: tuple[int, int] | None = None
    inputs: dict[str, list[Any]] | None = None
    dataframe_split: DataFrameSplit | None = None
    dataframe_records: list[dict[str, Any]] | None = None
    outputs: list[str] | None = None

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("features", "instances", "inputs", "dataframe_split", "dataframe_records")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `features`, `instances`, `inputs`, `dataframe_split` or "
                "`dataframe_records`"
            )
        if isinstance(self.instances, bytes):
            PredictRequest(instances=self.instances, shape=self.shape)  # the same checks
        elif self.shape is not None:
            raise ValueError("`shape` goes only with binary `instances`")
        if self.n_rows < 1:
            raise ValueError(f"`{given[0]}` holds no row")
        if self.inputs is not None and len({len(values) for values in self.inputs.values()}) != 1:
            raise ValueError("every column of `inputs` must hold the same number of values")
        if self.dataframe_split is not None:
            width = len(self.dataframe_split.columns)
            for i, row in enumerate(self.dataframe_split.data):
                if len(row) != width:
                    raise ValueError(f"`dataframe_split` row {i} has {len(row)} values for {width} columns")
        _check_outputs(self.outputs)

    @property
    def n_rows(self) -> int:
        if self.features is not None:
            return 1
        if isinstance(self.instances, bytes):
            assert self.shape is not None
            return self.shape[0]
        if self.instances is not None:
            return len(self.instances)
        if self.inputs is not None:
            return len(next(iter(self.inputs.values()), []))
        if self.dataframe_split is not None:
            return len(self.dataframe_split.data)
        assert self.dataframe_records is not None
        return len(self.dataframe_records)


def _check_outputs(outputs: list[str] | None) -> None:
    if outputs is None:
        return
    if not outputs:
        raise ValueError("`outputs` is empty; leave it out for predictions only")
    if len(set(outputs)) != len(outputs):
        raise ValueError("`outputs` names an output twice")


_DECODERS: dict[
    WireFormat, msgspec.json.Decoder[PredictRequest] | msgspec.msgpack.Decoder[PredictRequest]
] = {
    WireFormat.JSON: msgspec.json.Decoder(PredictRequest),
    WireFormat.MSGPACK: msgspec.msgpack.Decoder(PredictRequest),
}
_TABULAR_DECODERS: dict[
    WireFormat, msgspec.json.Decoder[TabularRequest] | msgspec.msgpack.Decoder[TabularRequest]
] = {
    WireFormat.JSON: msgspec.json.Decoder(TabularRequest),
    WireFormat.MSGPACK: msgspec.msgpack.Decoder(TabularRequest),
}
_json_encode = msgspec.json.Encoder().encode
_msgpack_encode = msgspec.msgpack.Encoder().encode
ENCODERS = {WireFormat.JSON: _json_encode, WireFormat.MSGPACK: _msgpack_encode}

_MEDIA_TYPES = {
    b"application/json": WireFormat.JSON,
    b"application/msgpack": WireFormat.MSGPACK,
    b"application/x-msgpack": WireFormat.MSGPACK,
    b"application/vnd.msgpack": WireFormat.MSGPACK,
}


def request_format(content_type: bytes | None) -> WireFormat:
    """The body's format from its Content-Type; none given means JSON, anything else is 415."""
    if not content_type:
        return WireFormat.JSON
    media = content_type.split(b";", 1)[0].strip().lower()
    found = _MEDIA_TYPES.get(media)
    if found is None:
        raise UnsupportedMediaType("send application/json or application/msgpack")
    return found


def response_format(accept: bytes | None, default: WireFormat) -> WireFormat:
    """The answer's format: ours that ``Accept`` weighs highest (first on a tie), else the request's."""
    if not accept or accept == b"*/*":
        return default
    best, best_q = default, 0.0
    for item in accept.lower().split(b","):
        media, _, params = item.partition(b";")
        found = _MEDIA_TYPES.get(media.strip())
        if found is None:
            continue
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.partition(b"=")
            if key.strip() == b"q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = found, q
    return best


def decode(body: bytes, fmt: WireFormat, named: bool = False) -> PredictRequest | TabularRequest:
    """Decode and validate the shape of a predict body; feature values are checked by the queue.

    A version with named columns (``named``) takes every request form: positional rows are
    decoded as numbers first, as for any version (the fast path), then the other forms.
    """
    if named:
        try:
            return _DECODERS[fmt].decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            tabular: TabularRequest = _decode(_TABULAR_DECODERS[fmt], body, fmt)
            return tabular
    positional: PredictRequest = _decode(_DECODERS[fmt], body, fmt)
    return positional


def _decode(decoder: Any, body: bytes, fmt: WireFormat) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Number out of range"):
            raise BadFeatures("features must be finite numbers: " + text) from None
        raise MalformedBody(text) from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"body is not valid {fmt.name}: {exc}") from None
    except RecursionError:
        raise MalformedBody("body is nested too deeply") from None


class PredictionEncoder:
    """Builds prediction bodies for one (model, version): the constant part is encoded once."""

    __slots__ = ("_json_head", "_msgpack_head", "_model", "_version", "_classes")

    def __init__(self, model: str, version: str, classes: list[Any] | None = None) -> None:
        self._model, self._version, self._classes = model, version, classes
        self._json_head = b'{"model":%s,"version":%s,"predictions":' % (
            _json_encode(model),
            _json_encode(version),
        )
        # A msgpack map of three entries (0x83), the first two fixed, then the predictions.
        self._msgpack_head = (
            b"\x83"
            + _msgpack_encode("model")
            + _msgpack_encode(model)
            + _msgpack_encode("version")
            + _msgpack_encode(version)
            + _msgpack_encode("predictions")
        )

    def encode(self, result: list[Any] | dict[str, list[Any]], fmt: WireFormat) -> bytes:
        """The body of predictions (a list), or of the outputs a request named (output -> values:
        each under its key in OUTPUT_KEYS, with the version's ``classes`` beside any but predict)."""
        if type(result) is not list:
            return ENCODERS[fmt](self._outputs(result))  # type: ignore[arg-type]
        if fmt is WireFormat.JSON:
            return self._json_head + _json_encode(result) + b"}"
        return self._msgpack_head + _msgpack_encode(result)

    def _outputs(self, outputs: dict[str, list[Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "version": self._version}
        for name, values in outputs.items():
            body[OUTPUT_KEYS[name]] = values
        if self._classes is not None and any(name != "predict" for name in outputs):
            body["classes"] = self._classes
        return body


def error_body(error: FastServeError, fmt: WireFormat = WireFormat.JSON) -> bytes:
    return ENCODERS[fmt]({"error": {"code": error.code, "message": error.message}})
