"""A latency probe that times every request and keeps the times apart per status.

wrk has no clock in its Lua API (4.1 has no ``wrk.time_us``) and mixes all statuses in
one latency histogram, so during an overload run its figures cannot tell the p99 of
accepted requests from the time it takes to be refused. This probe runs beside wrk, on
a few keep-alive connections of its own, and reports percentiles per status.

    taskset -c 1 nice -n -10 python -m bench.probe 127.0.0.1 8000 /predict/digits body.json --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path


async def _connection(
    host: str,
    port: int,
    request: bytes,
    start_at: float,
    deadline: float,
    times: dict[int, list[float]],
    errors: list[str],
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    # Connect first, like wrk's connections: under overload some servers starve new connections,
    # which is worth knowing but is not the time to be admitted or refused.
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection(host, port)
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    while time.perf_counter() < deadline:
        try:
            if reader is None or writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").lower().split("\r\n")
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            await reader.readexactly(int(headers.get("content-length", "0")))
            times.setdefault(int(lines[0].split()[1]), []).append(time.perf_counter() - start)
            if headers.get("connection", "").strip() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    percentiles = {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": at(1.0)}
    return {"count": len(ordered), **percentiles}


async def probe(
    host: str, port: int, path: str, body: bytes, seconds: float, connections: int = 8, delay: float = 0.0
) -> dict[str, object]:
    """Connect now; after ``delay``, POST ``body`` on ``connections`` keep-alive connections for ``seconds``.

    Returns latency percentiles per status, in milliseconds.
    """
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    times: dict[int, list[float]] = {}
    errors: list[str] = []
    start_at = time.perf_counter() + delay
    deadline = start_at + seconds
    tasks = [_connection(host, port, request, start_at, deadline, times, errors) for _ in range(connections)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks), delay + seconds + 10)
    return {
        "connections": connections,
        "statuses": {str(status): _percentiles(t) for status, t in sorted(times.items())},
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("body_file", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before the first request")
    args = parser.parse_args()
    body = args.body_file.read_bytes()
    result = asyncio.run(
        probe(args.host, args.port, args.path, body, args.seconds, args.connections, args.delay)
    )
    print("PROBE_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
