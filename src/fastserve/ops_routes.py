"""The small routes around predict: health, readiness, /status, /metrics, model metadata and
``POST /deploy``.

They go through Starlette (routing, its exception handlers); none is on the hot path. Every
error they raise is a ``FastServeError`` answered with the standard error body.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastserve import codec
from fastserve.actions import decode_action
from fastserve.body import receive_body
from fastserve.codec import WireFormat
from fastserve.errors import FastServeError, MethodNotAllowed, UnknownModel, UnknownRoute, UnknownVersion
from fastserve.metrics import CONTENT_TYPE
from fastserve.openapi import document
from fastserve.queue import COMPILED
from fastserve.worker import Server

logger = logging.getLogger("fastserve")

# A deployment action is a few dozen bytes of JSON.
_MAX_ACTION_BYTES = 16 * 1024


def ops_routes(server: Server) -> list[Route]:
    """``/deploy/{model}``, ``/healthz``, ``/readyz``, ``/status``, ``/metrics``,
    ``/models/{model}[/versions/{version}]`` and ``/openapi.json`` of ``server``."""
    openapi = msgspec.json.encode(document())

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(_request: Request) -> Response:
        try:
            server.check_ready()
        except FastServeError as error:
            return _error_response(error)
        return JSONResponse({"status": "ready"})

    async def status(_request: Request) -> Response:
        return JSONResponse(_status(server))

    async def metrics(_request: Request) -> Response:
        # Open, like /status: Prometheus scrapes without a token.
        return Response(server.render_metrics(), headers={"content-type": CONTENT_TYPE})

    async def model(request: Request) -> Response:
        return JSONResponse(_model_metadata(server, request.path_params["model"]))

    async def version(request: Request) -> Response:
        params = request.path_params
        return JSONResponse(_version_metadata(server, params["model"], params["version"]))

    async def openapi_json(_request: Request) -> Response:
        return Response(openapi, media_type=WireFormat.JSON.value)

    async def deploy(request: Request) -> Response:
        server.check_admin(request.headers.get("authorization"))
        action = decode_action(await receive_body(request.receive, _MAX_ACTION_BYTES))
        client = request.client.host if request.client else "unknown"
        deployment = await server.act(request.path_params["model"], action, actor=f"http {client}")
        return JSONResponse(deployment.as_dict())

    return [
        Route("/deploy/{model}", deploy, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/status", status),
        Route("/metrics", metrics),
        Route("/models/{model}", model),
        Route("/models/{model}/versions/{version}", version),
        Route("/openapi.json", openapi_json),
    ]


def _error_response(error: FastServeError) -> Response:
    """The standard error body of ``error``, in JSON, with its status and headers."""
    return Response(
        codec.error_body(error),
        status_code=error.status,
        headers=error.headers,
        media_type=WireFormat.JSON.value,
    )


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette's exception carries the route's Allow header, which a 405 must have.
        return _error_response(
            MethodNotAllowed("method not allowed on this route", headers=dict(exc.headers or {}))
        )
    return _error_response(UnknownRoute("no such route"))


async def _on_fastserve_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FastServeError)
    return _error_response(exc)


async def _on_unexpected(_request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return _error_response(FastServeError("internal error"))


# Starlette's exception handlers: every error, even a bug, is the standard error body.
EXCEPTION_HANDLERS = {
    HTTPException: _on_http_error,
    FastServeError: _on_fastserve_error,
    Exception: _on_unexpected,
}


def _status(server: Server) -> dict[str, Any]:
    models = {}
    states = server.version_states()
    routable = server.store.serving_everywhere() if server.store is not None else set()
    here = server.lifecycle.states if server.lifecycle is not None else {}
    for name, entry in server.models.items():
        versions: dict[str, Any] = {}
        for version, loaded in entry.versions.items():
            batcher = server.batchers[name, version]
            stats = batcher.stats
            versions[version] = {
                "state": "serving",
                "n_features": loaded.n_features,
                "artifact": loaded.artifact,
                "predict": loaded.predict_path,
                "queue_depth_rows": batcher.queue.queued_rows,
                "batches": stats.batches,
                "rows": stats.rows,
                "requests": stats.requests,
                "mean_batch_rows": round(stats.mean_batch_rows, 3),
                "predict_seconds": round(stats.predict_seconds, 6),
                "shed": stats.shed,
                "expired": stats.expired,
                "gone": stats.gone,
                "errors": stats.errors,
                "loaded_mb": round((loaded.rss_bytes or 0) / 1e6, 1),
                "predict_running_seconds": _rounded(batcher.predict_running_s()),
                "predict_overdue": batcher.predict_overdue(),
            }
        for version, reason in entry.failed.items():
            versions[version] = {"state": "failed", "reason": reason}
        for (model, version), state in here.items():  # loading or unloading in this worker
            if model == name:
                versions[version] = {**versions.get(version, {}), "state": state}
        for (model, version), workers in states.items():
            if model == name:
                described = versions.setdefault(version, {"state": "not loaded here"})
                described["routable"] = (model, version) in routable
                described["workers"] = {
                    str(pid): {
                        "state": s.state,
                        "reason": s.reason,
                        "loaded_mb": round((s.rss_bytes or 0) / 1e6, 1),
                    }
                    for pid, s in sorted(workers.items())
                }
        route = server.router.routes.get(name)
        deployment = route.deployment if route is not None else None
        models[name] = {
            "aliases": _aliases(server, name),
            "canary": deployment.canary if deployment else 0.0,
            "shadow": deployment.shadow if deployment else False,
            "previous_stable": deployment.previous_stable if deployment else None,
            "routing_problem": (route.problem or None) if route is not None else None,
            "routed": _nested(server.router.routed.get(name, {})),
            "shadow_outcomes": _nested(server.router.shadow.outcomes.get(name, {})),
            "versions": versions,
        }
    history = server.store.history() if server.store is not None else []
    return {
        "phase": server.phase,
        "ready": server.phase == "serving" and not server.router.unservable(),  # this worker
        "ready_workers": len(server.store.ready_workers(os.getppid())) if server.store is not None else 0,
        "problem": server.problem or None,
        # Why the deployment state cannot be read or written now; serving goes on meanwhile.
        "state_problem": server.state_problem,
        "pid": os.getpid(),
        "queue_implementation": "compiled" if COMPILED else "python",
        # Objects the garbage collector no longer walks (see worker.Server._load).
        "gc_frozen_objects": gc.get_freeze_count(),
        "models": models,
        "deploy_log": [entry.as_dict() for entry in history],
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _model_metadata(server: Server, name: str) -> dict[str, Any]:
    """``GET /models/{model}``: its aliases, and each version's input, outputs and classes."""
    server.check_serving()
    entry = server.models.get(name)
    if entry is None:
        raise UnknownModel(f"no model named {name!r}")
    versions = {version: _described(server, name, version) for version in entry.versions}
    for version, reason in entry.failed.items():
        versions[version] = {"version": version, "state": "failed", "reason": reason}
    return {"model": name, "aliases": _aliases(server, name), "versions": versions}


def _version_metadata(server: Server, name: str, version: str) -> dict[str, Any]:
    """``GET /models/{model}/versions/{version}``."""
    server.check_serving()
    entry = server.models.get(name)
    if entry is None:
        raise UnknownModel(f"no model named {name!r}")
    if version not in entry.versions:
        raise UnknownVersion(f"model {name!r} serves no version {version!r}")
    aliases = [alias for alias, at in _aliases(server, name).items() if at == version]
    return {"model": name, **_described(server, name, version), "aliases": aliases}


def _described(server: Server, name: str, version: str) -> dict[str, Any]:
    loaded = server.models[name].versions[version]
    outputs = loaded.outputs.names if loaded.outputs is not None else ("predict",)
    return {
        "version": version,
        "state": "serving",
        "input": loaded.schema.as_dict(),
        "outputs": list(outputs),
        "classes": loaded.classes,
        "predict": loaded.predict_path,
    }


def _aliases(server: Server, name: str) -> dict[str, str | None]:
    route = server.router.routes.get(name)
    deployment = route.deployment if route is not None else None
    return {
        "stable": deployment.stable if deployment else None,
        "candidate": deployment.candidate if deployment else None,
    }


def _nested(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(version, label): n}`` as ``{version: {label: n}}``, for JSON."""
    nested: dict[str, dict[str, int]] = {}
    for (version, label), n in sorted(counts.items()):
        nested.setdefault(version, {})[label] = n
    return nested
