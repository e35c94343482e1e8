"""One worker process's lifecycle: load the models, follow the deployment state, drain at exit.

A worker loads the versions the state says are loaded (on a model's very first start: its
``model.toml``'s ``load`` list, else every version), builds a batcher and an encoder per
version, and records itself as ready in the shared state. Where it starts:

- beside workers of the same server that are serving already (Granian respawned it, or it
  started late), it loads inside the ASGI lifespan's startup: Granian gives a worker no
  connection until its startup completes, so the requests go to the workers that can answer
  them, and none gets a 503 from this one while it loads;
- otherwise (the server's first start) it loads in the background, so that ``/healthz``
  answers and ``/readyz`` says 503 while it loads.

It polls the state and swaps its routes when another process acted, and loads or unloads
versions as ``load`` and ``unload`` ask (``lifecycle.py``), so every worker follows the same
aliases and serves the same versions. At shutdown it lets the queued requests be answered
(bounded), stops the predict processes and leaves the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastserve.actions import ACTION_NAMES, Action, Deployment, Load
from fastserve.config import Settings, resolve_repository
from fastserve.errors import (
    ConfigError,
    DeployDisabled,
    Draining,
    NotReady,
    StateUnavailable,
    Unauthorized,
    UnknownModel,
    without_path,
)
from fastserve.lifecycle import Lifecycle, Serving
from fastserve.metrics import ALIASES, Metrics
from fastserve.registry import Registry
from fastserve.router import Router
from fastserve.state import STATE_ERRORS, VersionState
from fastserve.store import StateStore, open_store

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
        self.metrics = Metrics() if settings.metrics.metrics else None
        self.serving = Serving(metrics=self.metrics)
        # The same dicts as the serving set's: a version loaded or unloaded shows everywhere.
        self.models = self.serving.models
        self.batchers = self.serving.batchers
        self.encoders = self.serving.encoders
        self.router = Router(self.batchers)
        if self.metrics is not None:
            self.metrics.follow(self.router)
        self.store: StateStore | None = None
        self.registry: Registry | None = None
        self.lifecycle: Lifecycle | None = None
        self.phase = "loading"  # loading -> serving | failed -> draining
        self.problem = "models are loading"
        token = settings.deploy.admin_token
        self._admin_token = token.encode() if token else None
        self._loader: asyncio.Task[None] | None = None
        self._poller: asyncio.TimerHandle | None = None
        self._mending: asyncio.Task[None] | None = None
        self._ready_recorded = True  # until a write of it fails
        self.state_problem: str | None = None  # why the deployment state is unreachable, for /status

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        if await asyncio.to_thread(self._others_serve):
            await self._load()  # no connection comes to this worker until it is warm
        else:  # the first start: /healthz answers and /readyz says 503 while models load
            self._loader = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            await self._stop()

    def _others_serve(self) -> bool:
        """Whether other workers of this server are serving already (the parent is Granian's)."""
        try:
            store = open_store(self.settings)
            try:
                return bool(store.ready_workers(os.getppid()))
            finally:
                store.close()
        except STATE_ERRORS:
            return False

    async def _load(self) -> None:
        repo = resolve_repository(self.settings.repository)
        registry = Registry(repo, self.settings.repository, self.settings.batching, self.settings.limits)
        try:
            store = open_store(self.settings, follow=True)
            await asyncio.to_thread(store.seed_loaded, registry.repository.first_loads())
            wanted = {model: list(versions) for model, versions in store.loaded().items()}
            models = await asyncio.to_thread(registry.load, wanted)
            if not models:
                raise ConfigError("the repository holds no model")
            stables = {name: entry.stable for name, entry in models.items() if entry.stable is not None}
            await asyncio.to_thread(store.seed, stables, f"server pid {os.getpid()}")
        except Exception as exc:
            # The problem reaches /readyz and every predict.
            self.phase, self.problem = "failed", f"loading the repository failed: {without_path(exc)}"
            logger.error("%s", self.problem)
            return
        loop = asyncio.get_running_loop()
        self.serving.loop = loop
        requested = store.loaded()
        lifecycle = Lifecycle(self.serving, registry, store, self._refresh_routes)
        for entry in models.values():
            self.models.setdefault(entry.name, entry)
            for loaded in list(entry.versions.values()):
                self.serving.add(entry, loaded)
            for version in (*entry.versions, *entry.failed):
                lifecycle.attempts[entry.name, version] = requested.get(entry.name, {}).get(version, 0.0)
        for (model, version), state in lifecycle.records().items():
            await lifecycle.record(model, version, state)
        self.store, self.registry, self.lifecycle = store, registry, lifecycle
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
        await self._record_ready()
        self._refresh_routes()
        lifecycle.reconcile()  # an action taken while this worker loaded
        broken = self.router.unservable()
        if broken:
            logger.error("not ready: no servable stable version for: %s", ", ".join(broken))

    async def _record_ready(self) -> None:
        assert self.store is not None
        try:  # workers of one server share the main process (Granian's) as their parent
            await asyncio.to_thread(self.store.worker_ready, os.getpid(), os.getppid())
            self._ready_recorded = True
        except STATE_ERRORS as exc:
            self._ready_recorded = False  # tried again at each poll; /readyz says 503 meanwhile
            self._state_trouble(f"could not record this worker as ready: {exc}")

    def _state_trouble(self, problem: str | None) -> None:
        """What is wrong with the deployment state, once per outage in the log (None: nothing)."""
        if problem is not None and self.state_problem is None:
            logger.error("deployment state: %s; serving goes on with the current routes", problem)
        elif problem is None and self.state_problem is not None:
            logger.info("deployment state: reachable again")
        self.state_problem = problem

    async def _mend(self) -> None:
        """After a fault of the state: make it again if it was lost (a deleted file, a Redis
        restarted empty), and write what this worker could not or what was dropped (its
        readiness, its versions' records)."""
        assert self.store is not None and self.lifecycle is not None
        try:
            if self.store.replaced():
                # The reader still has the deleted file open: what it reads is the last truth.
                deployments, loaded = self.store.deployments(), self.store.loaded()
                self.store.close()
                restored = await asyncio.to_thread(
                    self.store.restore, deployments, loaded, f"server pid {os.getpid()}"
                )
                if restored:
                    logger.warning("deployment state was lost; restored %s", ", ".join(restored))
                for (model, version), state in self.lifecycle.records().items():
                    self.lifecycle.unrecorded.setdefault((model, version), state)
                self._ready_recorded = False
                self._refresh_routes()
            if not self._ready_recorded and self.phase == "serving":
                await self._record_ready()
            await self.lifecycle.retry()
        except STATE_ERRORS as exc:
            self._state_trouble(str(exc))
        finally:
            self._mending = None

    def _refresh_routes(self) -> None:
        assert self.store is not None
        # Note the data version before reading: a commit in between is seen by the next poll.
        self.store.changed()
        self._update_routes()

    def _update_routes(self) -> None:
        assert self.store is not None and self.lifecycle is not None
        routable = self.store.serving_everywhere()
        self.router.update(self.store.deployments(), self.models, routable, self.lifecycle.loading())

    def _poll(self) -> None:
        assert self.store is not None and self.lifecycle is not None
        try:
            faulty = self.store.replaced() or self.lifecycle.unrecorded or not self._ready_recorded
            if faulty and self._mending is None:
                self._mending = asyncio.get_running_loop().create_task(self._mend())
            elif self.store.changed():
                self._update_routes()
                self.lifecycle.reconcile()
            if not faulty:
                self._state_trouble(None)
        except Exception as exc:  # a locked or vanished file must not stop the polling
            self._state_trouble(f"reading it failed: {exc}")
        self._poller = asyncio.get_running_loop().call_later(_STATE_POLL_S, self._poll)

    async def _stop(self) -> None:
        self.phase, self.problem = "draining", "the server is shutting down"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self._poller is not None:
            self._poller.cancel()
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        await asyncio.gather(*(b.drain_and_stop(_DRAIN_TIMEOUT_S) for b in self.batchers.values()))
        for entry in self.models.values():
            for loaded in entry.versions.values():
                loaded.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.store is not None:
            with contextlib.suppress(*STATE_ERRORS):
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

    def version_states(self) -> dict[tuple[str, str], dict[str, VersionState]]:
        """Each version's state in every live worker, from the shared state (for /status)."""
        return self.store.version_states() if self.store is not None else {}

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
        assert self.store is not None and self.registry is not None and self.lifecycle is not None
        on_disk = None
        if isinstance(action, Load):  # a load may bring a whole new model
            discovered = await asyncio.to_thread(self.registry.repository.discover)
            if model not in discovered:
                raise UnknownModel(f"no model named {model!r} in the repository")
            on_disk = discovered[model][0]
        elif model not in self.models:
            raise UnknownModel(f"no model named {model!r}")
        entry = self.models.get(model)
        servable = {v: loaded.n_features for v, loaded in entry.versions.items()} if entry else {}
        try:
            deployment = await asyncio.to_thread(self.store.act, model, action, servable, actor, on_disk)
        except StateUnavailable as exc:
            self._state_trouble(str(exc))
            raise
        self._refresh_routes()
        self.lifecycle.reconcile()
        logger.info("deploy %s by %s: %s", model, actor, deployment.as_dict())
        return deployment
