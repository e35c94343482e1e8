"""The Open Inference Protocol's REST routes: ``/v2``, health, model metadata and readiness, infer.

Infer is ``predict_endpoint``'s hot path with the V2 wire format (``v2.V2Wire``): an infer with
no version is routed by the model's aliases exactly as ``POST /predict/{model}`` (stable,
canary share, shadow copy, ``X-Routing-Key``), one with a version is pinned. ``app.PredictFirst``
sends it there without Starlette, like ``/predict``; the other routes go through Starlette.
Every V2 error is ``{"error": "<message>"}`` in ``application/json``. A version's metadata
describes its input schema and outputs as V2 tensors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fastserve.errors import FastServeError, NotReady, UnknownModel, UnknownVersion
from fastserve.predict_endpoint import PredictEndpoint
from fastserve.schema import Column, InputSchema, Kind
from fastserve.v2 import BOOL, BYTES, V2Wire, encode_json, error_response, tensor_of
from fastserve.version import __version__
from fastserve.worker import Server

_MODELS = "/v2/models/"
# The protocol's extensions this server speaks (the server metadata lists them).
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "sklearn"
VERSION = __version__


class V2Infer:
    """``POST /v2/models/{model}[/versions/{version}]/infer``, as raw ASGI."""

    def __init__(self, predict: PredictEndpoint) -> None:
        self._predict = predict
        self._wire = V2Wire()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._predict(scope, receive, send, self._wire)


def infer_params(path: str) -> dict[str, str] | None:
    """The path parameters of an infer path, or None for any other path."""
    if not path.startswith(_MODELS):
        return None
    parts = path[len(_MODELS) :].split("/")
    if len(parts) == 2 and parts[0] and parts[1] == "infer":
        return {"model": parts[0]}
    if len(parts) == 4 and parts[0] and parts[1] == "versions" and parts[2] and parts[3] == "infer":
        return {"model": parts[0], "version": parts[2]}
    return None


def _json(body: Any, status: int = 200) -> Response:
    return Response(encode_json(body), status_code=status, media_type="application/json")


def _v2(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
    """A route whose errors are V2 errors, not fastserve's ``{"error": {"code", "message"}}``."""

    async def route(request: Request) -> Response:
        try:
            return _json(handler(request))
        except FastServeError as error:
            status, _, body = error_response(error)
            return Response(body, status_code=status, headers=error.headers, media_type="application/json")

    return route


def v2_routes(server: Server, predict: PredictEndpoint) -> list[Route]:
    """Every V2 route of ``server``; infer shares ``predict``'s hot path."""
    infer = V2Infer(predict)

    def server_metadata(_request: Request) -> dict[str, Any]:
        return {"name": "fastserve", "version": VERSION, "extensions": list(EXTENSIONS)}

    def live(_request: Request) -> dict[str, Any]:
        return {"live": True}

    def ready(_request: Request) -> dict[str, Any]:
        server.check_ready()
        return {"ready": True}

    def model(request: Request) -> dict[str, Any]:
        params = request.path_params
        return _metadata(server, params["model"], params.get("version"))

    def model_ready(request: Request) -> dict[str, Any]:
        params = request.path_params
        name, version = params["model"], params.get("version")
        _version_of(server, name, version)
        return {"name": name, "ready": True}

    return [
        Route("/v2", _v2(server_metadata)),
        Route("/v2/health/live", _v2(live)),
        Route("/v2/health/ready", _v2(ready)),
        Route("/v2/models/{model}", _v2(model)),
        Route("/v2/models/{model}/versions/{version}", _v2(model)),
        Route("/v2/models/{model}/ready", _v2(model_ready)),
        Route("/v2/models/{model}/versions/{version}/ready", _v2(model_ready)),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def _version_of(server: Server, name: str, version: str | None) -> str:
    """The version that would answer an infer: the pinned one, or stable's; 404 or 503 if none."""
    server.check_serving()
    if name not in server.models:
        raise UnknownModel(f"no model named {name!r}")
    if version is not None:
        if (name, version) not in server.batchers:
            raise UnknownVersion(f"model {name!r} serves no version {version!r}")
        return version
    # Read the route rather than route a request: metadata is neither counted nor a canary draw.
    route = server.router.routes.get(name)
    if route is None or route.stable is None:
        raise NotReady(f"model {name!r}: {route.problem if route is not None else 'not routed yet'}")
    return route.stable.version


def _metadata(server: Server, name: str, version: str | None) -> dict[str, Any]:
    """A model's V2 metadata: its versions, and the inputs and outputs of the one asked for
    (stable's, with no version; a canary must take the same inputs to get traffic)."""
    chosen = _version_of(server, name, version)
    loaded = server.models[name].versions[chosen]
    outputs = loaded.outputs.names if loaded.outputs is not None else ("predict",)
    versions = [chosen] if version is not None else list(server.models[name].versions)
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": input_metadata(loaded.schema),
        "outputs": output_metadata(outputs, loaded.classes),
    }


def input_metadata(schema: InputSchema) -> list[dict[str, Any]]:
    """The inputs a version takes, as V2 tensor metadata (-1 for the batch dimension)."""
    if not schema.named:
        return [{"name": "input-0", "datatype": "FP64", "shape": [-1, schema.n_features]}]
    return [{"name": c.name, "datatype": _column_datatype(c), "shape": [-1]} for c in schema.columns]


def _column_datatype(column: Column) -> str:
    if column.kind is Kind.BOOL:
        return BOOL
    if column.kind is Kind.NUMBER:
        return "FP64"
    categories = column.categories or ()
    if categories and all(isinstance(c, int | float) and not isinstance(c, bool) for c in categories):
        return "FP64"
    return BYTES


def output_metadata(outputs: tuple[str, ...], classes: list[Any] | None) -> list[dict[str, Any]]:
    """The outputs a version has: predict as labels (or numbers), the others as FP64 scores."""
    described = []
    n_classes = len(classes) if classes is not None else 0
    for name in outputs:
        if name == "predict":
            datatype = tensor_of(classes[:1])[0] if classes else "FP64"
            described.append({"name": name, "datatype": datatype, "shape": [-1]})
        elif name == "decision_function" and n_classes <= 2:
            described.append({"name": name, "datatype": "FP64", "shape": [-1]})
        else:
            described.append({"name": name, "datatype": "FP64", "shape": [-1, n_classes or -1]})
    return described
