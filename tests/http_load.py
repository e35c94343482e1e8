"""A small keep-alive HTTP/1.1 client on asyncio streams, for concurrent correctness tests.

httpx spends about a millisecond of CPU per request; on a 2-core machine that starves the
server and the batches never fill. This client does only what the tests need: POST a body,
read the status, headers and a Content-Length body, on N persistent connections.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Reply:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


async def post_many(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    content_type: str = "application/json",
    timeout_s: float = 60.0,
) -> list[Reply]:
    """POST every body over ``concurrency`` connections; replies in the order of ``bodies``."""
    replies: list[Reply | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\n".encode()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_index:
                request = head + b"content-length: %d\r\n\r\n" % len(bodies[i]) + bodies[i]
                replies[i] = reply = await _exchange(reader, writer, request)
                if reply.headers.get("connection") == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(concurrency))), timeout_s)
    assert all(reply is not None for reply in replies), "a request got no reply"
    return replies  # type: ignore[return-value]
