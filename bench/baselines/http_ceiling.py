"""The HTTP ceiling: fastserve's stack (Granian + Starlette + msgspec) with no model.

``POST /predict/{model}`` decodes the body into a msgspec Struct and answers a constant
prediction of the same shape as fastserve's; nothing else. No server on this stack can
answer faster on this machine, so fastserve's RPS over this one is its own overhead.

    python -m bench.baselines.http_ceiling --port 8003
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.baselines import serve_on_granian


class Row(msgspec.Struct):
    features: list[float]


_decode = msgspec.json.Decoder(Row).decode
_ANSWER = b'{"model":"digits","version":"v1","predictions":[0]}'
_BAD = b'{"error":{"code":"malformed_body","message":"not a row"}}'


async def predict(request: Request) -> Response:
    try:
        _decode(await request.body())
    except msgspec.DecodeError:
        return Response(_BAD, status_code=400, media_type="application/json")
    return Response(_ANSWER, media_type="application/json")


async def readyz(request: Request) -> Response:
    return Response(b"ready", media_type="text/plain")


app = Starlette(routes=[Route("/predict/{model}", predict, methods=["POST"]), Route("/readyz", readyz)])


def main() -> None:
    serve_on_granian("bench.baselines.http_ceiling:app", __doc__.splitlines()[0], 8003)


if __name__ == "__main__":
    main()
