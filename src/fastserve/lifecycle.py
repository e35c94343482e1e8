"""Versions loaded and unloaded while a worker serves: it follows the state's set of loaded versions.

A ``load`` or ``unload`` action changes that set (``state.DeploymentStore.loaded``); every
worker sees the change at its next poll and brings its own versions in line:

- a version to load is read, checked and warmed by the registry in a thread, one at a time,
  under the same trust rules as at start, while serving goes on; then it gets its batcher,
  and the worker records it as serving (or failed, with the reason) for the others. A version
  becomes routable (an alias may point at it, a pinned request reaches it) only once every
  live worker serves it: ``DeploymentStore.serving_everywhere``;
- a version to unload leaves the routes at once; its batcher answers what it has queued, its
  predict process stops, its objects go, and the freed memory goes back to the system.

A load that failed is tried again when a later ``load`` asks for it (a newer request time).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastserve.batcher import Batcher, Turns
from fastserve.codec import PredictionEncoder
from fastserve.metrics import Metrics
from fastserve.registry import LoadedVersion, ModelEntry, Registry, resident_bytes
from fastserve.state import FAILED, LOADING, SERVING, STATE_ERRORS, UNLOADING, VersionState
from fastserve.store import StateStore

logger = logging.getLogger("fastserve.lifecycle")

# How long an unload waits for the version's queued requests to be answered.
_DRAIN_TIMEOUT_S = 10.0


@dataclass
class Serving:
    """What one worker serves: its models, and a batcher and an encoder per loaded version."""

    loop: asyncio.AbstractEventLoop | None = None
    metrics: Metrics | None = None
    models: dict[str, ModelEntry] = field(default_factory=dict)
    batchers: dict[tuple[str, str], Batcher] = field(default_factory=dict)
    encoders: dict[tuple[str, str], PredictionEncoder] = field(default_factory=dict)
    turns: Turns = field(default_factory=Turns)

    def add(self, entry: ModelEntry, loaded: LoadedVersion) -> None:
        """Serve ``loaded``, a version of ``entry``'s model, from now on."""
        assert self.loop is not None
        key = (entry.name, loaded.version)
        self.models.setdefault(entry.name, entry).versions[loaded.version] = loaded
        self.batchers[key] = Batcher(
            entry.name,
            loaded.version,
            loaded.predict,
            loaded.n_features,
            entry.batching,
            self.loop,
            self.metrics,
            self.turns,
            inputs=loaded.inputs,
            outputs=loaded.outputs,
            probe=loaded.probe,
        )
        self.encoders[key] = PredictionEncoder(entry.name, loaded.version, loaded.classes)

    def remove(self, model: str, version: str) -> tuple[Batcher, LoadedVersion]:
        """Stop routing to one version; its batcher and model, for the caller to wind down."""
        batcher = self.batchers.pop((model, version))
        self.encoders.pop((model, version), None)
        return batcher, self.models[model].versions.pop(version)


class Lifecycle:
    """Brings one worker's loaded versions in line with the state's (see the module)."""

    def __init__(
        self,
        serving: Serving,
        registry: Registry,
        store: StateStore,
        routes_changed: Callable[[], None],
    ) -> None:
        self.serving = serving
        self.registry = registry
        self.store = store
        self._routes_changed = routes_changed
        self.attempts: dict[tuple[str, str], float] = {}  # request time of the last load tried
        self.states: dict[tuple[str, str], str] = {}  # this worker's: loading, unloading
        self.unrecorded: dict[tuple[str, str], VersionState | None] = {}  # to write again
        self._task: asyncio.Task[None] | None = None
        self._again = False
        # Loads run one at a time on a thread of their own, so that a long load never holds up
        # the default executor's threads (the state's reads and writes).
        self._loader = ThreadPoolExecutor(1, "fastserve-load")

    def loading(self) -> set[tuple[str, str]]:
        """The versions the state wants loaded that this worker does not serve yet, and did not
        fail to load."""
        wanted = self.store.loaded()
        models = self.serving.models
        return {
            (m, v)
            for m, versions in wanted.items()
            for v in versions
            if (m, v) not in self.serving.batchers and not (m in models and v in models[m].failed)
        }

    def reconcile(self) -> None:
        """Start loading and unloading what the state asks, unless that is under way (then it
        looks again when done)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        wanted = self.store.loaded()
        to_unload = [key for key in self.serving.batchers if key[1] not in wanted.get(key[0], {})]
        to_load = [
            (model, version, at)
            for model, versions in wanted.items()
            for version, at in versions.items()
            if (model, version) not in self.serving.batchers and self.attempts.get((model, version)) != at
        ]
        if to_unload or to_load:
            self._task = asyncio.get_running_loop().create_task(self._apply(to_unload, to_load))

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _apply(self, to_unload: list[tuple[str, str]], to_load: list[tuple[str, str, float]]) -> None:
        for model, version in to_unload:
            await self._unload(model, version)
        for model, version, at in to_load:
            await self._load(model, version, at)
        if self._again:
            self._again = False
            self.reconcile()

    async def _load(self, model: str, version: str, at: float) -> None:
        key = (model, version)
        self.attempts[key] = at
        self.states[key] = LOADING
        await self.record(model, version, VersionState(LOADING, None, None))
        try:
            known = self.serving.models.get(model)
            entry = known if known is not None else await asyncio.to_thread(self.registry.entry, model)
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._loader, self.registry.load_version, entry, version
            )
        except Exception as exc:  # the version is not served; nothing else is touched
            reason = self.registry.repository.describe(exc)
            logger.error("%s %s not loaded: %s", model, version, reason)
            if model in self.serving.models:
                self.serving.models[model].failed[version] = reason
            self.states.pop(key, None)
            await self.record(model, version, VersionState(FAILED, reason, None))
            return
        entry.failed.pop(version, None)
        self.serving.add(entry, loaded)
        self.states.pop(key, None)
        # As at start: what lives on (the model) is frozen out of the collector's walks.
        gc.collect()
        gc.freeze()
        logger.info("%s %s loaded: %.1f MB", model, version, (loaded.rss_bytes or 0) / 1e6)
        await self.record(model, version, VersionState(SERVING, None, loaded.rss_bytes))
        self._routes_changed()

    async def _unload(self, model: str, version: str) -> None:
        self.states[(model, version)] = UNLOADING
        batcher, loaded = self.serving.remove(model, version)
        self._routes_changed()
        await self.record(model, version, VersionState(UNLOADING, None, loaded.rss_bytes))
        await batcher.drain_and_stop(_DRAIN_TIMEOUT_S)
        if self.serving.metrics is not None and batcher.meter is not None:
            self.serving.metrics.retire(batcher.meter)
        loaded.close()
        entry = self.serving.models[model]
        if not entry.versions and model not in self.store.loaded():
            del self.serving.models[model]
        estimator = _weak(loaded.estimator)
        del batcher, loaded
        if estimator is None or estimator() is not None:
            # A reference cycle keeps the model alive, and it is frozen (out of the collector's
            # walks) with everything else. Unfreezing makes the next collection walk the whole
            # heap, a stall of 100-250 ms for the event loop, so it is done only then: a
            # fitted estimator is a tree of objects that reference counting frees at once.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        _return_freed_memory()
        self.states.pop((model, version), None)
        await self.record(model, version, None)
        logger.info("%s %s unloaded; resident memory now %.1f MB", model, version, resident_bytes() / 1e6)

    async def record(self, model: str, version: str, state: VersionState | None) -> None:
        """Tell the other workers this worker's state of a version (None: it holds it no more).
        A write that fails (the state locked, full, gone) is kept and tried again by ``retry``:
        until it lands, the others do not count this worker as serving the version, and a
        stale record of an unloaded one is not left to count for a later load."""
        key = (model, version)
        self.unrecorded[key] = state
        try:
            if state is None:
                await asyncio.to_thread(self.store.forget_version, os.getpid(), model, version)
            else:
                await asyncio.to_thread(self.store.record_version, os.getpid(), model, version, state)
        except STATE_ERRORS as exc:
            what = state.state if state is not None else "unloaded"
            logger.error("could not record %s %s as %s, will retry: %s", model, version, what, exc)
            return
        if key in self.unrecorded and self.unrecorded[key] is state:
            del self.unrecorded[key]

    async def retry(self) -> None:
        """Write the records that failed, again."""
        for (model, version), state in list(self.unrecorded.items()):
            await self.record(model, version, state)

    def records(self) -> dict[tuple[str, str], VersionState]:
        """This worker's state of every version it holds or failed to load (after the state file
        was made again, they are all written anew)."""
        found = {}
        for name, entry in self.serving.models.items():
            for version, loaded in entry.versions.items():
                found[(name, version)] = VersionState(SERVING, None, loaded.rss_bytes)
            for version, reason in entry.failed.items():
                found[(name, version)] = VersionState(FAILED, reason, None)
        return found


def _weak(obj: object) -> weakref.ref[object] | None:
    try:
        return weakref.ref(obj)
    except TypeError:  # not weakly referenceable: the caller assumes the worst
        return None


def _return_freed_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc keeps them otherwise), so an
    unloaded model's memory shows in the worker's resident size."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
