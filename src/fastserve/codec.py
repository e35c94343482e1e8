"""Wire formats: msgspec decoders and encoders, content negotiation, error bodies.

Every decoder and encoder is built once at import; a request only calls ``decode``. The
decoded rows stay as msgspec returned them (lists of floats, or raw bytes) until the queue
copies them into the model's buffer: no intermediate numpy array per request.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from fastserve.errors import BadFeatures, FastServeError, MalformedBody, UnsupportedMediaType


class WireFormat(StrEnum):
    JSON = "application/json"
    MSGPACK = "application/msgpack"


class PredictRequest(msgspec.Struct):
    """One row (``features``), many rows (``instances``), or raw float64 rows plus ``shape``."""

    features: list[float] | None = None
    instances: list[list[float]] | bytes | None = None
    shape: tuple[int, int] | None = None

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

    @property
    def n_rows(self) -> int:
        if self.features is not None:
            return 1
        if isinstance(self.instances, bytes):
            assert self.shape is not None
            return self.shape[0]
        assert self.instances is not None
        return len(self.instances)


_DECODERS: dict[
    WireFormat, msgspec.json.Decoder[PredictRequest] | msgspec.msgpack.Decoder[PredictRequest]
] = {
    WireFormat.JSON: msgspec.json.Decoder(PredictRequest),
    WireFormat.MSGPACK: msgspec.msgpack.Decoder(PredictRequest),
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


def decode(body: bytes, fmt: WireFormat) -> PredictRequest:
    """Decode and validate the shape of a predict body; feature values are checked by the queue."""
    try:
        return _DECODERS[fmt].decode(body)
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

    __slots__ = ("_json_head", "_msgpack_head")

    def __init__(self, model: str, version: str) -> None:
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

    def encode(self, predictions: list[object], fmt: WireFormat) -> bytes:
        if fmt is WireFormat.JSON:
            return self._json_head + _json_encode(predictions) + b"}"
        return self._msgpack_head + _msgpack_encode(predictions)


def error_body(error: FastServeError, fmt: WireFormat = WireFormat.JSON) -> bytes:
    return ENCODERS[fmt]({"error": {"code": error.code, "message": error.message}})
