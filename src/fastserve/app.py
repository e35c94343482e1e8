"""The Starlette application: routes, lifespan, and the predict hot path.

``app`` is built from ``FASTSERVE_*`` environment variables, so ``granian --interface asgi
fastserve.app:app`` and ``fastserve serve`` (which exports its flags) serve the same thing
in every worker process.

The predict endpoint is a raw ASGI callable: it reads the body itself under the size and
time limits, decodes it once with msgspec, hands it to the model's batcher and sends bytes
back. Starlette does the routing and the small JSON routes, and ``POST /deploy``.

Deployment state lives in the shared store (``state.py``); each worker polls it and swaps
its routes when another process acted, so every worker follows the same aliases.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fastserve import codec
from fastserve.batcher import Batcher, Turns
from fastserve.codec import PredictionEncoder, WireFormat
from fastserve.config import Settings, resolve_repository
from fastserve.errors import (
    BodyTimeout,
    BodyTooLarge,
    ConfigError,
    DeployDisabled,
    Draining,
    FastServeError,
    MethodNotAllowed,
    NotReady,
    QueueFull,
    TooManyRows,
    Unauthorized,
    UnknownModel,
    UnknownRoute,
    without_path,
)
from fastserve.metrics import ALIASES, CONTENT_TYPE, Metrics
from fastserve.queue import COMPILED
from fastserve.registry import ModelEntry, Registry
from fastserve.router import Router
from fastserve.state import ACTION_NAMES, Action, Deployment, DeploymentStore, decode_action, state_path

logger = logging.getLogger("fastserve")

# How long shutdown waits for queued requests to be answered before giving up on them.
_DRAIN_TIMEOUT_S = 10.0
# How often a worker looks for actions taken through other processes: an action governs
# every worker within about this long.
_STATE_POLL_S = 0.05
# A deployment action is a few dozen bytes of JSON.
_MAX_ACTION_BYTES = 16 * 1024


class _ClientGone(Exception):
    """The client disconnected before its body arrived; there is nobody to answer."""


class Server:
    """What one worker process serves: the loaded models, their batchers, routes and readiness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelEntry] = {}
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self.encoders: dict[tuple[str, str], PredictionEncoder] = {}
        self.router = Router(self.batchers)
        self.metrics = Metrics() if settings.metrics.metrics else None
        if self.metrics is not None:
            self.metrics.follow(self.router)
        self.store: DeploymentStore | None = None
        self.phase = "loading"  # loading -> serving | failed -> draining
        self.problem = "models are loading"
        token = settings.deploy.admin_token
        self._admin_token = token.encode() if token else None
        self._loader: asyncio.Task[None] | None = None
        self._poller: asyncio.TimerHandle | None = None
        self._poll_failing = False

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # Load in the background so /healthz answers and /readyz says 503 while models load.
        self._loader = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            await self._stop()

    async def _load(self) -> None:
        repo = resolve_repository(self.settings.repository)
        registry = Registry(repo, self.settings.repository, self.settings.batching, self.settings.limits)
        try:
            models = await asyncio.to_thread(registry.load_all)
            if not models:
                raise ConfigError("the repository holds no model")
            store = DeploymentStore(state_path(self.settings))
            stables = {name: entry.stable for name, entry in models.items() if entry.stable is not None}
            await asyncio.to_thread(store.seed, stables, f"server pid {os.getpid()}")
        except Exception as exc:
            # The problem reaches /readyz and every predict.
            self.phase, self.problem = "failed", f"loading the repository failed: {without_path(exc)}"
            logger.error("%s", self.problem)
            return
        loop = asyncio.get_running_loop()
        turns = Turns()
        for entry in models.values():
            for version, loaded in entry.versions.items():
                key = (entry.name, version)
                self.batchers[key] = Batcher(
                    entry.name,
                    version,
                    loaded.predict,
                    loaded.n_features,
                    entry.batching,
                    loop,
                    self.metrics,
                    turns,
                )
                self.encoders[key] = PredictionEncoder(entry.name, version)
        self.models = models
        self.store = store
        self._refresh_routes()
        self._poller = loop.call_later(_STATE_POLL_S, self._poll)
        if self.metrics is not None:
            self.metrics.start(loop)
        # Everything alive now (the libraries, the models) lives until the process ends. Left
        # in the collector's care, each full collection walks it all: 50-100 ms pauses of the
        # event loop every few seconds under load, the whole p99. Frozen, it is never walked.
        gc.collect()
        gc.freeze()
        self.phase, self.problem = "serving", ""
        try:  # workers of one server share the main process (Granian's) as their parent
            await asyncio.to_thread(store.worker_ready, os.getpid(), os.getppid())
        except (ConfigError, sqlite3.Error):
            logger.exception("could not record this worker as ready; /readyz will say 503")
        broken = self.router.unservable()
        if broken:
            logger.error("not ready: no servable stable version for: %s", ", ".join(broken))

    def _refresh_routes(self) -> None:
        assert self.store is not None
        # Note the data version before reading: a commit in between is seen by the next poll.
        self.store.changed()
        self.router.update(self.store.deployments(), self.models)

    def _poll(self) -> None:
        assert self.store is not None
        try:
            if self.store.changed():
                self.router.update(self.store.deployments(), self.models)
            self._poll_failing = False
        except Exception:  # a locked or vanished file must not stop the polling
            if not self._poll_failing:  # once per outage, not 20 times a second
                logger.exception("reading the deployment state failed; keeping the current routes")
            self._poll_failing = True
        self._poller = asyncio.get_running_loop().call_later(_STATE_POLL_S, self._poll)

    async def _stop(self) -> None:
        self.phase, self.problem = "draining", "the server is shutting down"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self._poller is not None:
            self._poller.cancel()
        await asyncio.gather(*(b.drain_and_stop(_DRAIN_TIMEOUT_S) for b in self.batchers.values()))
        for entry in self.models.values():
            for loaded in entry.versions.values():
                loaded.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.store is not None:
            with contextlib.suppress(ConfigError, OSError, sqlite3.Error):
                self.store.worker_gone(os.getpid())
            self.store.close()

    def check_ready(self) -> None:
        """Readiness of the whole server: every model has its stable version serving, in every
        worker. Each worker loads its own models; the one that answers the probe being ready
        says nothing of the others, which would answer 503 to the requests they take."""
        if self.phase == "serving":
            broken = self.router.unservable()
            if broken:
                raise NotReady(f"no servable stable version for: {', '.join(broken)}")
            assert self.store is not None
            expected = self.settings.server.workers
            ready = len(self.store.ready_workers(os.getppid()))
            if ready < expected:
                raise NotReady(f"{ready} of {expected} workers have loaded their models")
            return
        raise (Draining if self.phase == "draining" else NotReady)(self.problem)

    def check_serving(self) -> None:
        """Whether predictions are taken at all; a broken model does not stop the healthy ones."""
        if self.phase != "serving":
            raise (Draining if self.phase == "draining" else NotReady)(self.problem)

    def check_admin(self, authorization: str | None) -> None:
        """``/deploy`` is off without a configured token, and needs exactly that token."""
        if self._admin_token is None:
            raise DeployDisabled("deployment actions are off: set FASTSERVE_ADMIN_TOKEN to enable them")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._admin_token):
            raise Unauthorized("a valid `Authorization: Bearer <admin token>` header is required")

    def render_metrics(self) -> bytes:
        """The Prometheus exposition; ``model_info`` and the action counts come from the shared state."""
        if self.metrics is None:
            return b"# fastserve: metrics are off (FASTSERVE_METRICS=0)\n"
        info = []
        for name, entry in self.models.items():
            route = self.router.routes.get(name)
            deployment = route.deployment if route is not None else None
            for version in entry.versions:
                for alias in ALIASES:
                    current = deployment is not None and getattr(deployment, alias) == version
                    info.append((name, version, alias, current))
        actions = self.store.action_counts() if self.store is not None else {}
        known = {(model, action) for model in self.models for action in ACTION_NAMES}
        return self.metrics.render(info, {key: n for key, n in actions.items() if key in known})

    async def act(self, model: str, action: Action, actor: str) -> Deployment:
        """Apply a deployment action for every worker; this one follows it at once."""
        self.check_serving()
        if model not in self.models:
            raise UnknownModel(f"no model named {model!r}")
        assert self.store is not None
        servable = {version: loaded.n_features for version, loaded in self.models[model].versions.items()}
        deployment = await asyncio.to_thread(self.store.act, model, action, servable, actor)
        self._refresh_routes()
        logger.info("deploy %s by %s: %s", model, actor, deployment.as_dict())
        return deployment


_request_ids = itertools.count()
_ID_PREFIX = os.urandom(4).hex().encode()
# An echoed X-Request-ID is visible ASCII, at most 128 bytes; anything else gets a fresh one.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_CONTENT_TYPE = {fmt: fmt.value.encode() for fmt in WireFormat}


class PredictEndpoint:
    """``POST /predict/{model}`` and ``/predict/{model}/versions/{version}``, as raw ASGI."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._bodies = _BodyDeadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        content_type = accept = request_id = routing_key = None
        content_length = -1
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
        if request_id is None:
            request_id = b"%s-%x" % (_ID_PREFIX, next(_request_ids))

        out_format = WireFormat.JSON
        params = scope["path_params"]
        chosen = ""  # the version that answers, once routing has chosen it
        try:
            in_format = codec.request_format(content_type)
            out_format = codec.response_format(accept, in_format)
            server = self.server
            server.check_serving()
            version = params.get("version")
            if version is None:
                batcher, mirror = server.router.route(params["model"], routing_key)
            else:
                batcher, mirror = server.router.pinned(params["model"], version), None
            chosen = batcher.version
            if batcher.full:
                # Under overload most requests end here: no exception, no generic error path.
                await _send_refusal(send, batcher.shed(), out_format, request_id)
                self._refused(params["model"], chosen, 429)
                return
            limits = server.models[batcher.model].limits
            body = await self._bodies.read(
                receive, content_length, limits.max_body_bytes, limits.body_timeout_ms
            )
            request = codec.decode(body, in_format)
            n_rows = request.n_rows
            if n_rows > limits.max_rows_per_request or n_rows > batcher.queue.max_queue_depth:
                limit = min(limits.max_rows_per_request, batcher.queue.max_queue_depth)
                raise TooManyRows(f"{n_rows} rows in one request; the limit is {limit}")
            answer = batcher.admit(request)
            if mirror is not None:
                server.router.shadow.mirror(mirror, request, answer, request_id)
            predictions = await answer
            payload = server.encoders[batcher.model, batcher.version].encode(predictions, out_format)
        except FastServeError as error:
            await _send_error(send, error, out_format, request_id)
            self._refused(params["model"], chosen, error.status)
            return
        except _ClientGone:
            return
        except Exception:
            # Predict requests skip Starlette's error middleware (see PredictFirst): a bug
            # here must still give the client one clean answer and leave a traceback in the log.
            logger.exception("unhandled error in predict")
            await _send_error(send, FastServeError("internal error"), out_format, request_id)
            self._refused(params["model"], chosen, 500)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _CONTENT_TYPE[out_format]),
                    (b"x-model-version", batcher.version.encode()),
                    (b"x-request-id", request_id),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        if batcher.meter is not None:
            batcher.meter.answered(time.perf_counter() - started)

    def _refused(self, model: str, version: str, code: int) -> None:
        # Labels come from the repository: a request for an unknown model leaves no series.
        metrics = self.server.metrics
        if metrics is not None and model in self.server.models:
            metrics.refused(model, version, code)


class _BodyDeadlines:
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
            return await _receive_body(receive, max_bytes)
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


async def _receive_body(receive: Receive, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body passed {max_bytes} bytes")
        if not message.get("more_body", False):
            # The common case, the whole body in one message, is returned without a copy.
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


async def _send_error(send: Send, error: FastServeError, fmt: WireFormat, request_id: bytes) -> None:
    headers = [
        (b"content-type", _CONTENT_TYPE[fmt]),
        (b"x-request-id", request_id),
        *((name.encode(), value.encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": codec.error_body(error, fmt)})


async def _send_refusal(send: Send, error: QueueFull, fmt: WireFormat, request_id: bytes) -> None:
    """``_send_error`` for the 429 of a full queue, the error sent most under overload."""
    headers = [
        (b"content-type", _CONTENT_TYPE[fmt]),
        (b"x-request-id", request_id),
        (b"retry-after", b"%d" % error.retry_after_s),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": codec.error_body(error, fmt)})


def _error_response(error: FastServeError) -> Response:
    return Response(
        codec.error_body(error),
        status_code=error.status,
        headers=error.headers,
        media_type=WireFormat.JSON.value,
    )


_PREDICT = "/predict/"


class PredictFirst:
    """The ASGI entry point: ``POST /predict/...`` goes straight to its endpoint, the rest to Starlette.

    Starlette's error and exception middleware and its route matching cost about a tenth of
    a bare request's time, on every prediction; the predict endpoint answers all of its own
    errors, so it needs none of them. Anything that is not a well-formed predict path (wrong
    method, extra segments) falls through to Starlette, which owns the 404s and 405s.
    """

    def __init__(self, starlette: Starlette, predict: PredictEndpoint) -> None:
        self.starlette = starlette
        self.state = starlette.state
        self._predict = predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(_PREDICT):
            parts = scope["path"][len(_PREDICT) :].split("/")
            if len(parts) == 1 and parts[0]:
                scope["path_params"] = {"model": parts[0]}
                return await self._predict(scope, receive, send)
            if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
                scope["path_params"] = {"model": parts[0], "version": parts[2]}
                return await self._predict(scope, receive, send)
        await self.starlette(scope, receive, send)


def create_app(settings: Settings | None = None) -> PredictFirst:
    """The fastserve ASGI application; settings default to the ``FASTSERVE_*`` environment."""
    server = Server(settings or Settings.from_env())

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

    async def deploy(request: Request) -> Response:
        server.check_admin(request.headers.get("authorization"))
        action = decode_action(await _receive_body(request.receive, _MAX_ACTION_BYTES))
        client = request.client.host if request.client else "unknown"
        deployment = await server.act(request.path_params["model"], action, actor=f"http {client}")
        return JSONResponse(deployment.as_dict())

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _error_response(MethodNotAllowed("method not allowed on this route"))
        return _error_response(UnknownRoute("no such route"))

    async def on_fastserve_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FastServeError)
        return _error_response(exc)

    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(FastServeError("internal error"))

    predict = PredictEndpoint(server)
    app = Starlette(
        routes=[
            Route("/predict/{model}", predict, methods=["POST"]),
            Route("/predict/{model}/versions/{version}", predict, methods=["POST"]),
            Route("/deploy/{model}", deploy, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/status", status),
            Route("/metrics", metrics),
        ],
        exception_handlers={
            HTTPException: on_http_error,
            FastServeError: on_fastserve_error,
            Exception: on_unexpected,
        },
        lifespan=server.lifespan,
    )
    app.state.server = server
    return PredictFirst(app, predict)


def _status(server: Server) -> dict[str, Any]:
    models = {}
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
                "errors": stats.errors,
            }
        for version, reason in entry.failed.items():
            versions[version] = {"state": "failed", "reason": reason}
        route = server.router.routes.get(name)
        deployment = route.deployment if route is not None else None
        models[name] = {
            "aliases": {
                "stable": deployment.stable if deployment else None,
                "candidate": deployment.candidate if deployment else None,
            },
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
        "pid": os.getpid(),
        "queue_implementation": "compiled" if COMPILED else "python",
        # Objects the garbage collector no longer walks (see Server._load).
        "gc_frozen_objects": gc.get_freeze_count(),
        "models": models,
        "deploy_log": [entry.as_dict() for entry in history],
    }


def _nested(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(version, label): n}`` as ``{version: {label: n}}``, for JSON."""
    nested: dict[str, dict[str, int]] = {}
    for (version, label), n in sorted(counts.items()):
        nested.setdefault(version, {})[label] = n
    return nested


app = create_app()

__all__ = ["Server", "app", "create_app"]
