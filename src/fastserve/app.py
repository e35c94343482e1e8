"""The ASGI application: ``app`` for ``granian --interface asgi fastserve.app:app``.

``app`` is built from ``FASTSERVE_*`` environment variables, so ``granian --interface asgi
fastserve.app:app`` and ``fastserve serve`` (which exports its flags) serve the same thing
in every worker process.

One request's trip: ``PredictFirst`` -> ``predict_endpoint`` (headers, routing) -> ``body``
(read under the limits) -> ``codec`` (decode) -> ``router`` (which version) -> ``batcher``
(admission into the ``queue``, batched predict) -> bytes back. Everything else (health,
readiness, status, metrics, deploy) is a Starlette route in ``ops_routes``; the worker's
lifecycle, which loads the models and follows the shared state, is ``worker.Server``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fastserve.body import BodyDeadlines, DrainUnread
from fastserve.config import Settings
from fastserve.ops_routes import EXCEPTION_HANDLERS, ops_routes
from fastserve.predict_endpoint import PredictEndpoint
from fastserve.v2_routes import V2Infer, infer_params, v2_routes
from fastserve.worker import Server

_PREDICT = "/predict/"


class PredictFirst:
    """The ASGI entry point: ``POST /predict/...`` goes straight to its endpoint, the rest to Starlette.

    Starlette's error and exception middleware and its route matching cost about a tenth of
    a bare request's time, on every prediction; the predict endpoint answers all of its own
    errors, so it needs none of them. Anything that is not a well-formed predict path (wrong
    method, extra segments) falls through to Starlette, which owns the 404s and 405s; a body
    its routes leave unread is drained first, so that the connection stays usable.
    """

    def __init__(self, starlette: Starlette, predict: PredictEndpoint, others: ASGIApp | None = None) -> None:
        self.starlette = starlette
        self.state = starlette.state
        self._predict = predict
        self._others = others or starlette
        self._v2_infer = V2Infer(predict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(_PREDICT):
            parts = scope["path"][len(_PREDICT) :].split("/")
            if len(parts) == 1 and parts[0]:
                scope["path_params"] = {"model": parts[0]}
                return await self._predict(scope, receive, send)
            if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
                scope["path_params"] = {"model": parts[0], "version": parts[2]}
                return await self._predict(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            # The Open Inference Protocol's infer: the same hot path, the same reasons (v2_routes).
            params = infer_params(scope["path"])
            if params is not None:
                scope["path_params"] = params
                return await self._v2_infer(scope, receive, send)
        await self._others(scope, receive, send)


def create_app(settings: Settings | None = None) -> PredictFirst:
    """The fastserve ASGI application; settings default to the ``FASTSERVE_*`` environment."""
    server = Server(settings or Settings.from_env())
    predict = PredictEndpoint(server)
    app = Starlette(
        routes=[
            Route("/predict/{model}", predict, methods=["POST"]),
            Route("/predict/{model}/versions/{version}", predict, methods=["POST"]),
            *ops_routes(server),
            *v2_routes(server, predict),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=server.lifespan,
    )
    # An API answers a path it does not have with a 404, never with a redirect: Starlette's
    # slash redirect builds its Location from the request's Host header.
    app.router.redirect_slashes = False
    app.state.server = server
    return PredictFirst(app, predict, DrainUnread(app, server.settings.limits, BodyDeadlines()))


app = create_app()

__all__ = ["PredictFirst", "app", "create_app"]
