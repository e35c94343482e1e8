"""Reading a request body under the size and time limits, without a timer per request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import Receive

from fastserve.errors import BodyTimeout, BodyTooLarge


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
