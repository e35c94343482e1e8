"""``POST /predict/{model}[/versions/{version}]``: the hot path of one request, as raw ASGI.

headers -> route (stable, canary share, shadow copy, or a pinned version) -> refuse at once
if the queue is full -> body (under the size and time limits) -> codec -> batcher -> bytes.
An answer given before the body was read (a 404, 413, 415, 429 or 503) first reads the rest
of the body, so that the connection stays usable, or closes it (see ``body``).
It answers every one of its own errors, so it runs without Starlette's middleware (see
``app.PredictFirst``): each request gets exactly one answer, a bug included.

The path is the same for every wire format; a ``Wire`` says how a body becomes a request and
an answer becomes a body. ``NativeWire`` is fastserve's own JSON and MessagePack; the Open
Inference Protocol (``v2.V2Wire``) takes the same path, so it gets the same routing, limits,
batching, metrics and refusals.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import Receive, Scope, Send

from fastserve import codec
from fastserve.body import CLOSE, DRAIN_FACTOR, BodyDeadlines, ClientGone
from fastserve.codec import PredictionEncoder, PredictRequest, TabularRequest, WireFormat
from fastserve.config import LimitSettings
from fastserve.errors import BodyTimeout, FastServeError, MalformedBody, QueueFull, TooManyRows
from fastserve.worker import Server

if TYPE_CHECKING:
    from fastserve.batcher import Answer, Batcher

logger = logging.getLogger("fastserve")

_request_ids = itertools.count()
_ID_PREFIX = os.urandom(4).hex().encode()
# An echoed X-Request-ID is visible ASCII, at most 128 bytes; anything else gets a fresh one.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_CONTENT_TYPE = {fmt: fmt.value.encode() for fmt in WireFormat}

Headers = list[tuple[bytes, bytes]]


class Wire(Protocol):
    """How one wire format reads requests and writes answers; the hot path does the rest.

    ``framing`` is what ``begin`` read from the headers (``None`` until it has), handed back to
    each later call; ``reply`` is what ``decode`` kept of the body for ``encode``.
    """

    def begin(
        self,
        content_type: bytes | None,
        accept: bytes | None,
        content_encoding: bytes | None,
        inference_header_length: bytes | None,
    ) -> Any:
        """The request's framing from its headers; each wire format reads the ones it has."""
        ...

    def decode(
        self, body: bytes, framing: Any, batcher: Batcher, max_body_bytes: int
    ) -> tuple[PredictRequest | TabularRequest, Any]: ...

    def encode(
        self, encoder: PredictionEncoder, batcher: Batcher, answer: Answer, reply: Any, framing: Any
    ) -> tuple[bytes, Headers]: ...

    def error(self, error: FastServeError, framing: Any) -> tuple[int, bytes, bytes]:
        """The status, Content-Type and body that answer ``error``."""
        ...


class NativeWire:
    """``POST /predict``'s JSON and MessagePack; ``framing`` is (request format, answer format)."""

    def begin(
        self,
        content_type: bytes | None,
        accept: bytes | None,
        content_encoding: bytes | None,
        inference_header_length: bytes | None,
    ) -> tuple[WireFormat, WireFormat]:
        in_format = codec.request_format(content_type)
        return in_format, codec.response_format(accept, in_format)

    def decode(
        self, body: bytes, framing: tuple[WireFormat, WireFormat], batcher: Batcher, max_body_bytes: int
    ) -> tuple[PredictRequest | TabularRequest, None]:
        return codec.decode(body, framing[0], batcher.inputs.named), None

    def encode(
        self,
        encoder: PredictionEncoder,
        batcher: Batcher,
        answer: Answer,
        reply: None,
        framing: tuple[WireFormat, WireFormat],
    ) -> tuple[bytes, Headers]:
        fmt = framing[1]
        payload = encoder.encode(answer, fmt)
        return payload, [(b"content-type", _CONTENT_TYPE[fmt])]

    def error(
        self, error: FastServeError, framing: tuple[WireFormat, WireFormat] | None
    ) -> tuple[int, bytes, bytes]:
        # Before the formats are known (a 415 among them), errors are JSON.
        fmt = framing[1] if framing is not None else WireFormat.JSON
        return error.status, _CONTENT_TYPE[fmt], codec.error_body(error, fmt)


NATIVE = NativeWire()


class PredictEndpoint:
    """``POST /predict/{model}`` and ``/predict/{model}/versions/{version}``, as raw ASGI; called
    with a ``Wire``, the same path for another wire format."""

    def __init__(self, server: Server) -> None:
        self.server = server
        # One set of body deadlines (one sweep timer) for every wire format.
        self._bodies = BodyDeadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, wire: Wire = NATIVE) -> None:
        """Answer one predict request whose body and answer are in ``wire``'s format (an ASGI
        call is ``/predict``'s own; the wire is a parameter, not a second call, on the hot path)."""
        started = time.perf_counter()
        content_type = accept = request_id = routing_key = content_encoding = header_length = None
        content_length = -1
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
            elif name == b"accept":
                accept = value
            elif name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                request_id = value
            elif name == b"x-routing-key":
                routing_key = value
            elif name == b"content-encoding":
                content_encoding = value
            elif name == b"inference-header-content-length":
                header_length = value
            elif name == b"transfer-encoding":
                chunked = True
        if request_id is None:
            request_id = b"%s-%x" % (_ID_PREFIX, next(_request_ids))

        framing = None
        params = scope["path_params"]
        chosen = ""  # the version that answers, once routing has chosen it
        unread = content_length > 0 or chunked  # a body is still on the connection
        limits = self.server.settings.limits  # the version's own, once routing has chosen it
        try:
            framing = wire.begin(content_type, accept, content_encoding, header_length)
            server = self.server
            server.check_serving()
            version = params.get("version")
            if version is None:
                batcher, mirror = server.router.route(params["model"], routing_key)
            else:
                batcher, mirror = server.router.pinned(params["model"], version), None
            chosen = batcher.version
            # Taken now, with the route: a version unloaded while this request waits keeps
            # answering what it had queued, but leaves the encoders at once.
            encoder = server.encoders[batcher.model, chosen]
            limits = server.models[batcher.model].limits
            if batcher.full:
                # Under overload most requests end here: no exception, no generic error path.
                refusal = batcher.shed()
                close = unread and not await self._drained(receive, content_length, limits)
                await _send_refusal(send, wire, refusal, framing, request_id, close)
                self._refused(params["model"], chosen, 429)
                return
            try:
                body = await self._bodies.read(
                    receive, content_length, limits.max_body_bytes, limits.body_timeout_ms
                )
            except ClientGone:
                # The body stopped short: answered for a client that half-closed its side and
                # still reads (a gone one never sees it), and the connection closes.
                unread = False
                raise MalformedBody(
                    "the body ended before it was complete", headers={"connection": "close"}
                ) from None
            unread = False
            request, reply = wire.decode(body, framing, batcher, limits.max_body_bytes)
            n_rows = request.n_rows
            if n_rows > limits.max_rows_per_request or n_rows > batcher.queue.max_queue_depth:
                limit = min(limits.max_rows_per_request, batcher.queue.max_queue_depth)
                raise TooManyRows(f"{n_rows} rows in one request; the limit is {limit}")
            answer = batcher.admit(request)
            if mirror is not None:
                server.router.shadow.mirror(mirror, request, answer, request_id)
            # A client that leaves while its request waits takes it out of its batch (see
            # Batcher.waiting: a request answered within _WATCH_AFTER_S is never watched).
            waiting = batcher.waiting(receive, answer)
            try:
                predictions = await answer
            finally:
                if waiting.watch is not None:
                    waiting.watch.stop()
            payload, response_headers = wire.encode(encoder, batcher, predictions, reply, framing)
        except FastServeError as error:
            # A body that stopped arriving is not waited for again.
            close = unread and (
                type(error) is BodyTimeout or not await self._drained(receive, content_length, limits)
            )
            status = await _send_error(send, wire, error, framing, request_id, close)
            self._refused(params["model"], chosen, status)
            return
        except ClientGone:
            return
        except Exception:
            # Predict requests skip Starlette's error middleware (see PredictFirst): a bug
            # here must still give the client one clean answer and leave a traceback in the log.
            logger.exception("unhandled error in predict")
            await _send_error(send, wire, FastServeError("internal error"), framing, request_id)
            self._refused(params["model"], chosen, 500)
            return
        response_headers.append((b"x-model-version", batcher.version.encode()))
        response_headers.append((b"x-request-id", request_id))
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        if batcher.meter is not None:
            batcher.meter.answered(time.perf_counter() - started)

    async def _drained(self, receive: Receive, content_length: int, limits: LimitSettings) -> bool:
        """Read and throw away the body an early answer did not need; whether the connection
        can carry the next request (see ``body``)."""
        return await self._bodies.drain(
            receive, content_length, DRAIN_FACTOR * limits.max_body_bytes, limits.body_timeout_ms
        )

    def _refused(self, model: str, version: str, code: int) -> None:
        # Labels come from the repository: a request for an unknown model leaves no series.
        metrics = self.server.metrics
        if metrics is not None and model in self.server.models:
            metrics.refused(model, version, code)


async def _send_error(
    send: Send, wire: Wire, error: FastServeError, framing: Any, request_id: bytes, close: bool = False
) -> int:
    """Send the answer to ``error``; its status, which the wire format may map (V2 has no 422)."""
    status, content_type, body = wire.error(error, framing)
    headers = [
        (b"content-type", content_type),
        (b"x-request-id", request_id),
        *((name.encode(), value.encode()) for name, value in error.headers.items()),
    ]
    if close:
        headers.append(CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def _send_refusal(
    send: Send, wire: Wire, error: QueueFull, framing: Any, request_id: bytes, close: bool
) -> None:
    """``_send_error`` for the 429 of a full queue, the error sent most under overload."""
    status, content_type, body = wire.error(error, framing)
    headers = [
        (b"content-type", content_type),
        (b"x-request-id", request_id),
        (b"retry-after", b"%d" % error.retry_after_s),
    ]
    if close:
        headers.append(CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
