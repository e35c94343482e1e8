"""One worker process's lifecycle: load the models, follow the deployment state, drain at exit.

A worker loads every model in the background when Granian starts it (so ``/healthz``
answers and ``/readyz`` says 503 meanwhile), builds a batcher and an encoder per loaded
version, and records itself as ready in the shared state. It polls the state and swaps its
routes when another process acted, so every worker follows the same aliases. At shutdown
it lets the queued requests be answered (bounded), stops the predict processes and leaves
the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from fastserve.batcher import Batcher, Turns
from fastserve.codec import PredictionEncoder
from fastserve.config import Settings, resolve_repository
from fastserve.errors import (
    ConfigError,
    DeployDisabled,
    Draining,
    NotReady,
    Unauthorized,
    UnknownModel,
    without_path,
)
from fastserve.metrics import ALIASES, Metrics
from fastserve.registry import ModelEntry, Registry
from fastserve.router import Router
from fastserve.state import ACTION_NAMES, Action, Deployment, DeploymentStore, state_path

logger = logging.getLogger("fastserve")

# How long shutdown waits for queued requests to be answered before giving up on them.
_DRAIN_TIMEOUT_S = 10.0
# How often a worker looks for actions taken through other processes: an action governs
# every worker within about this long.
_STATE_POLL_S = 0.05


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
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
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
                    inputs=loaded.inputs,
                    outputs=loaded.outputs,
                    probe=loaded.probe,
                )
                self.encoders[key] = PredictionEncoder(entry.name, version, loaded.classes)
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
