"""The refusal floor: Granian refusing every predict with a 429, as cheaply as ASGI allows.

A raw ASGI callable, no framework: ``POST /predict/{model}`` gets fastserve's 429 (same
headers, same JSON error) at once, without its body being read; ``/readyz`` answers 200.
No server on this Granian can refuse faster on this machine, so under the overload's open
load its times are the floor under fastserve's time-to-429, which also runs a model and
answers the requests it admits on the same core.

    python -m bench.baselines.refusal_floor --port 8004
"""

from __future__ import annotations

from typing import Any

from bench.baselines import serve_on_granian

_REFUSAL = b'{"error":{"code":"queue_full","message":"digits v1: queue is full (64 rows waiting)"}}'
_REFUSED = {
    "type": "http.response.start",
    "status": 429,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_REFUSAL)).encode()),
        (b"retry-after", b"1"),
    ],
}
_READY = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan: nothing to start or stop
        return
    if scope["path"] == "/readyz":
        await send(_READY)
        await send({"type": "http.response.body", "body": b"ready"})
        return
    await send(_REFUSED)
    await send({"type": "http.response.body", "body": _REFUSAL})


def main() -> None:
    serve_on_granian("bench.baselines.refusal_floor:app", __doc__.splitlines()[0], 8004)


if __name__ == "__main__":
    main()
