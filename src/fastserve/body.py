"""Reading a request body under the size and time limits, without a timer per request.

And reading the rest of a body that an early answer did not need. An HTTP/1.1 connection
carries the next request only once this one's body has been read off it: a server that
answers a 404, 413, 415, 429 or 503 before the body and leaves it unread makes Granian close
the connection without saying so, and the client's next request on it fails (a broken pipe
or a reset). So an early answer first reads the body and throws it away, within the time
limit and up to ``DRAIN_FACTOR`` times the size limit, and the connection stays usable;
where it cannot (a body larger than that, or one that stops arriving), the answer says
``Connection: close``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastserve.config import LimitSettings
from fastserve.errors import BodyTimeout, BodyTooLarge

# An unread body is read and thrown away up to this many times max_body_bytes (4 MiB by
# default): reading it costs less than the client's reconnecting, and a client that sends
# a little too much gets its 413 on a connection it can go on using.
DRAIN_FACTOR = 4
CLOSE = (b"connection", b"close")


class ClientGone(Exception):
    """The client disconnected before its body arrived; there is nobody to answer."""


class BodyDeadlines:
    """Cancels body reads that run past their deadline: one sweep timer per process.

    A timer per request would cost more than the rest of the read; most bodies arrive
    with the headers, so a read only registers its task and the sweep, which runs while
    any read is pending, finds the slow ones.
    """

    def __init__(self, sweep_s: float = 0.05) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._sweep_s = sweep_s
        self._timer: asyncio.TimerHandle | None = None

    async def read(self, receive: Receive, content_length: int, max_bytes: int, timeout_ms: float) -> bytes:
        """The whole body, refused with 413 as soon as it is known to pass ``max_bytes``."""
        if content_length > max_bytes:
            raise BodyTooLarge(f"body of {content_length} bytes; the limit is {max_bytes}")
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + timeout_ms / 1000
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)
        try:
            return await receive_body(receive, max_bytes)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            task.uncancel()
            raise BodyTimeout(f"the body did not arrive within {timeout_ms:g} ms") from None
        finally:
            del self._deadlines[task]

    async def drain(self, receive: Receive, content_length: int, max_bytes: int, timeout_ms: float) -> bool:
        """Read and throw away what is left of a body; whether all of it came within
        ``max_bytes`` and ``timeout_ms``, so that the connection can carry the next request.
        (Not when the body stops short: the answer still goes, to a client that half-closed
        its side and still reads, and the connection closes.)"""
        if content_length > max_bytes:
            return False
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + timeout_ms / 1000
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)
        try:
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                size += len(message.get("body", b""))
                if size > max_bytes:
                    return False
                if not message.get("more_body", False):
                    return True
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            task.uncancel()
            return False
        finally:
            del self._deadlines[task]

    def _sweep(self) -> None:
        now = time.monotonic()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._timed_out:
                self._timed_out.add(task)
                task.cancel()
        self._timer = None
        if self._deadlines:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)


async def receive_body(receive: Receive, max_bytes: int) -> bytes:
    """The body's bytes as they come (no deadline: see ``BodyDeadlines``), or 413 past ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body passed {max_bytes} bytes")
        if not message.get("more_body", False):
            # The common case, the whole body in one message, is returned without a copy.
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


class DisconnectWatch:
    """Calls ``on_gone(arg)`` if the client disconnects before ``stop``.

    Once the body is read, the next ``receive()`` resolves only when the client disconnects
    (Granian's also once the answer is sent): one call per request, with a callback on what it
    returns, and no task. Granian returns a future-like object; another server's coroutine is
    wrapped in a task.
    """

    __slots__ = ("_waiter", "_on_gone", "_arg")

    def __init__(self, receive: Receive, on_gone: Callable[[Any], None], arg: Any) -> None:
        waiter: Any = receive()
        if not hasattr(waiter, "add_done_callback"):
            waiter = asyncio.ensure_future(waiter)
        self._waiter = waiter
        self._on_gone = on_gone
        self._arg = arg
        waiter.add_done_callback(self._done)

    def _done(self, waiter: Any) -> None:
        if waiter.cancelled():
            return
        try:
            message = waiter.result()
        except Exception:  # the server's transport failed: the client is gone too
            message = {"type": "http.disconnect"}
        if message["type"] == "http.disconnect":
            self._on_gone(self._arg)

    def stop(self) -> None:
        """The answer is ready: what the client does from now on is no longer watched."""
        self._waiter.remove_done_callback(self._done)
        self._waiter.cancel()


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request carries a body: a Content-Length above 0, or chunked."""
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


class DrainUnread:
    """ASGI wrapper for the routes that do not read their body (all but predict and deploy):
    before an answer starts, what is left of the body is read and thrown away (see the module),
    or the answer says ``Connection: close``.

    The predict endpoint does the same itself, on its own error paths: a wrapper would cost
    every prediction two more calls per message.
    """

    def __init__(self, app: ASGIApp, limits: LimitSettings, bodies: BodyDeadlines) -> None:
        self._app = app
        self._limits = limits
        self._bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope["headers"]):
            return await self._app(scope, receive, send)
        finished = False  # the body has been read to its end, or the client has gone

        async def tracked() -> Message:
            nonlocal finished
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                finished = True
            return message

        async def guarded(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start" and not finished:
                limits = self._limits
                finished = await self._bodies.drain(
                    tracked, -1, DRAIN_FACTOR * limits.max_body_bytes, limits.body_timeout_ms
                )
                if not finished:
                    message = {**message, "headers": [*message.get("headers", ()), CLOSE]}
            await send(message)

        await self._app(scope, tracked, guarded)
