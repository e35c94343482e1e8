"""Which version answers a request: stable, the canary share to the candidate, a shadow mirror.

The router holds one immutable ``Route`` per model, rebuilt from the deployment state
whenever it changes; a request reads the route once, so an action takes effect between
two requests, never inside one. Choosing costs a dict lookup and, with a canary, one
random draw (or one hash of the ``X-Routing-Key``, so a key always gets the same version).

Shadow: a request that stable answers is also offered to the candidate's queue. The copy
is dropped, never queued past the candidate's limit, when that queue has no room; the
user's answer never waits for it. When both answers are in, they are compared and the
outcome counted; a sample of disagreements is logged as JSON lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import orjson

from fastserve.actions import Deployment
from fastserve.batcher import Answer, Batcher
from fastserve.codec import PredictRequest, TabularRequest
from fastserve.errors import ModelError, NotReady, UnknownModel, UnknownVersion

logger = logging.getLogger("fastserve.router")
disagreements_log = logging.getLogger("fastserve.shadow")

# Roles a request can be routed in, the label values of the routed counts.
STABLE, CANDIDATE, PINNED = "stable", "candidate", "pinned"
# Shadow outcomes. ``dropped``: no comparison was made (the candidate's queue had no room,
# the copy expired there, or stable itself failed); ``error``: the candidate failed.
AGREE, DISAGREE, DROPPED, ERROR = "agree", "disagree", "dropped", "error"
SHADOW_OUTCOMES = (AGREE, DISAGREE, DROPPED, ERROR)

# Logged disagreements per model, at most one in this many seconds: a sample, not a flood.
_SAMPLE_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Route:
    """One model's routing, as of one deployment state."""

    deployment: Deployment | None  # None: the model has no deployment (no version loaded)
    stable: Batcher | None  # None: the stable version is not loaded in this process
    candidate: Batcher | None  # None: no candidate, or it cannot serve here (see ``problem``)
    canary: float
    shadow: bool
    problem: str = ""


class Router:
    """Routes for every model of one worker process, and the counts of where requests went."""

    def __init__(self, batchers: dict[tuple[str, str], Batcher]) -> None:
        self._batchers = batchers
        self.routes: dict[str, Route] = {}
        # None: every version this process has is routable. Else the versions warm in every
        # worker (a pinned request reaches only those), and those loading somewhere.
        self._routable: set[tuple[str, str]] | None = None
        self._loading: frozenset[tuple[str, str]] = frozenset()
        self.routed: dict[str, Counter[tuple[str, str]]] = {}  # model -> (version, role) -> requests
        self.shadow = ShadowMeter()

    def update(
        self,
        deployments: Mapping[str, Deployment],
        models: Iterable[str],
        routable: set[tuple[str, str]] | None = None,
        loading: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Route each of ``models`` by the new deployment state; the swap is one assignment.
        ``routable``: the versions warm in every worker (None: all this process has);
        ``loading``: the versions the state wants that this process does not serve yet."""
        routes = {}
        self._routable, self._loading = routable, frozenset(loading)
        for model in models:
            routes[model] = self._route(model, deployments.get(model))
            self.routed.setdefault(model, Counter())
        self.routes = routes

    def _route(self, model: str, deployment: Deployment | None) -> Route:
        if deployment is None:
            return Route(None, None, None, 0.0, False, "no version loaded")
        stable = self._batchers.get((model, deployment.stable))
        candidate = None
        problems = []
        if stable is None:
            problems.append(f"stable version {deployment.stable!r} is not loaded")
        if deployment.candidate is not None:
            candidate = self._batchers.get((model, deployment.candidate))
            if candidate is None:
                problems.append(f"candidate {deployment.candidate!r} is not loaded; it gets no traffic")
            elif stable is not None and (mismatch := _input_mismatch(stable, candidate)):
                problems.append(f"candidate {deployment.candidate!r} takes {mismatch}")
                candidate = None
        problem = "; ".join(problems)
        if problem:
            logger.error("%s: %s", model, problem)
        return Route(
            deployment,
            stable,
            candidate,
            deployment.canary if candidate is not None else 0.0,
            deployment.shadow and candidate is not None,
            problem,
        )

    def route(self, model: str, routing_key: bytes | None) -> tuple[Batcher, Batcher | None]:
        """The batcher that answers a request for ``model``, and the one it is mirrored to, if any."""
        route = self.routes.get(model)
        if route is None:
            raise UnknownModel(f"no model named {model!r}")
        batcher = route.stable
        if batcher is None:
            raise NotReady(f"model {model!r}: {route.problem}")
        role = STABLE
        mirror = None
        if route.candidate is not None:
            if route.canary and _to_candidate(model, routing_key, route.canary):
                batcher, role = route.candidate, CANDIDATE
            elif route.shadow:
                mirror = route.candidate
        self.routed[model][batcher.version, role] += 1
        return batcher, mirror

    def pinned(self, model: str, version: str) -> Batcher:
        """The batcher of an explicitly requested version: no canary, no shadow."""
        key = (model, version)
        batcher = self._batchers.get(key)
        if batcher is None or (self._routable is not None and key not in self._routable):
            if key in self._loading or batcher is not None:
                raise NotReady(f"model {model!r} version {version!r} is not warm in every worker yet")
            if model not in self.routes:
                raise UnknownModel(f"no model named {model!r}")
            raise UnknownVersion(f"model {model!r} serves no version {version!r}")
        self.routed.setdefault(model, Counter())[version, PINNED] += 1
        return batcher

    def unservable(self) -> list[str]:
        """The models with no stable version to serve here, but for a model whose first version
        is being loaded at runtime: it is not part of what the server serves yet."""
        return sorted(
            model
            for model, route in self.routes.items()
            if route.stable is None
            and (route.deployment is None or (model, route.deployment.stable) not in self._loading)
        )


def _input_mismatch(stable: Batcher, candidate: Batcher) -> str:
    """Why the candidate cannot answer what stable is asked, or "": it needs as many values a
    row, and the same column names where both have names (positional rows map onto either)."""
    ours, theirs = stable.inputs.schema, candidate.inputs.schema
    if ours.n_features != theirs.n_features:
        return "a different number of features"
    if ours.named and theirs.named and {c.name for c in ours.columns} != {c.name for c in theirs.columns}:
        return "other columns than stable"
    return ""


def _to_candidate(model: str, routing_key: bytes | None, share: float) -> bool:
    if routing_key is None:
        return random.random() < share
    # A fixed point in [0, 1) per (model, key): the same key always lands on the same side,
    # and raising the share only moves more keys to the candidate, never back.
    digest = hashlib.blake2b(routing_key, digest_size=8, key=model.encode()[:64]).digest()
    return int.from_bytes(digest) / 2**64 < share


class ShadowMeter:
    """Mirrors requests to a candidate and counts how its answers compare with stable's."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[tuple[str, str]]] = {}  # model -> (version, outcome) -> n
        self._last_sample: dict[str, float] = {}

    def mirror(
        self,
        candidate: Batcher,
        request: PredictRequest | TabularRequest,
        answer: asyncio.Future[Answer],
        request_id: bytes,
    ) -> None:
        """Offer ``request`` to the candidate; compare once both it and ``answer`` are in."""
        copy = candidate.offer(request)
        if copy is None:
            self._count(candidate, DROPPED)
            return

        def on_copy(copy: asyncio.Future[Answer]) -> None:
            if answer.done():
                self._compare(candidate, answer, copy, request_id)
            else:
                answer.add_done_callback(lambda _: self._compare(candidate, answer, copy, request_id))

        copy.add_done_callback(on_copy)

    def _compare(
        self,
        candidate: Batcher,
        answer: asyncio.Future[Answer],
        copy: asyncio.Future[Answer],
        request_id: bytes,
    ) -> None:
        failure = copy.exception() if not copy.cancelled() else None
        if copy.cancelled() or answer.cancelled() or answer.exception() is not None:
            self._count(candidate, DROPPED)
        elif failure is not None:
            self._count(candidate, ERROR if isinstance(failure, ModelError) else DROPPED)
        else:
            expected, got = answer.result(), copy.result()
            if _same(expected, got):
                self._count(candidate, AGREE)
            else:
                self._count(candidate, DISAGREE)
                self._sample(candidate, expected, got, request_id)

    def _count(self, candidate: Batcher, outcome: str) -> None:
        counts = self.outcomes.get(candidate.model)
        if counts is None:
            counts = self.outcomes[candidate.model] = Counter()
        counts[candidate.version, outcome] += 1

    def _sample(self, candidate: Batcher, expected: Answer, got: Answer, request_id: bytes) -> None:
        now = time.monotonic()
        if now - self._last_sample.get(candidate.model, -_SAMPLE_EVERY_S) < _SAMPLE_EVERY_S:
            return
        self._last_sample[candidate.model] = now
        record = {
            "event": "shadow_disagreement",
            "model": candidate.model,
            "candidate": candidate.version,
            "request_id": request_id.decode(),
            "stable_predictions": expected,
            "candidate_predictions": got,
        }
        disagreements_log.info("%s", orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY).decode())


def _same(expected: Answer, got: Answer) -> bool:
    if expected == got:
        return True
    if isinstance(expected, dict) or isinstance(got, dict):  # outputs by name: each must agree
        if not isinstance(expected, dict) or not isinstance(got, dict) or expected.keys() != got.keys():
            return False
        return all(_same(expected[name], got[name]) for name in expected)
    # Floating-point regressors: the last bits may differ between two equivalent models.
    try:
        a, b = np.asarray(expected, dtype=float), np.asarray(got, dtype=float)
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))
