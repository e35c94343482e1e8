"""The router and the shadow meter, with real batchers on a real event loop and small fake models."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest

from fastserve import router as router_module
from fastserve.actions import Deployment
from fastserve.batcher import Batcher
from fastserve.codec import PredictRequest
from fastserve.config import BatchSettings
from fastserve.errors import ModelError, NotReady, UnknownModel, UnknownVersion
from fastserve.router import Router, ShadowMeter

N_FEATURES = 2
# Observed shares must lie within this many standard deviations of the expected one: wide
# enough that a correct router essentially never fails (p < 1e-5), narrow enough to catch a
# wrong share.
SIGMAS = 4.5


class Echo:
    """Predicts each row's first feature, optionally shifted by a relative ``skew``."""

    def __init__(self, n_features: int = N_FEATURES, skew: float = 0.0) -> None:
        self.n_features_in_ = n_features
        self.skew = skew

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return rows[:, 0] * (1.0 + self.skew)


class EchoUnless(Echo):
    """Echoes, except that rows whose first feature is ``odd_one_out`` get -1."""

    def __init__(self, odd_one_out: float) -> None:
        super().__init__()
        self.odd_one_out = odd_one_out

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.where(rows[:, 0] == self.odd_one_out, -1.0, rows[:, 0])


class Failing(Echo):
    """Raises on every call."""

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        raise RuntimeError("candidate is broken")


class Gated(Echo):
    """Echoes once ``gate`` is set: a slow model, held for as long as a test likes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.calls += 1
        self.gate.wait(timeout=10)
        return rows[:, 0].copy()


MakeBatcher = Callable[..., Batcher]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def make_batcher(loop: asyncio.AbstractEventLoop) -> Iterator[MakeBatcher]:
    """``make_batcher(model, version, estimator, **batch_settings)``; every batcher is stopped after."""
    made: list[tuple[Batcher, Any]] = []

    def make(model: str, version: str, estimator: Any, **settings: Any) -> Batcher:
        settings.setdefault("batch_window_ms", 0)
        batcher = Batcher(
            model, version, estimator.predict, estimator.n_features_in_, BatchSettings(**settings), loop
        )
        made.append((batcher, estimator))
        return batcher

    yield make
    for batcher, estimator in made:
        if isinstance(estimator, Gated):
            estimator.gate.set()
        loop.run_until_complete(batcher.drain_and_stop(5))


def run(loop: asyncio.AbstractEventLoop, scenario: Coroutine[Any, Any, None]) -> None:
    loop.run_until_complete(asyncio.wait_for(scenario, 10))


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


def row(value: float) -> PredictRequest:
    return PredictRequest(features=[value, 0.0])


def bounds(n: int, share: float) -> tuple[float, float]:
    spread = SIGMAS * math.sqrt(n * share * (1 - share))
    return n * share - spread, n * share + spread


def two_versions(
    make_batcher: MakeBatcher,
    candidate: Any = None,
    *,
    canary: float = 0.0,
    shadow: bool = False,
    **candidate_settings: Any,
) -> tuple[Router, Batcher, Batcher]:
    """A router for model m: v1 stable (echo) and v2 candidate (``candidate`` or echo)."""
    stable = make_batcher("m", "v1", Echo())
    cand = make_batcher("m", "v2", candidate or Echo(), **candidate_settings)
    router = Router({("m", "v1"): stable, ("m", "v2"): cand})
    router.update({"m": Deployment("m", "v1", "v2", canary, shadow)}, ["m"])
    return router, stable, cand


async def serve(router: Router, model: str, request: PredictRequest, key: bytes | None = None) -> Any:
    """What the app does per request: route, admit, mirror, and await the answer."""
    batcher, mirror = router.route(model, key)
    answer = batcher.admit(request)
    if mirror is not None:
        router.shadow.mirror(mirror, request, answer, b"req-" + str(request.features).encode())
    return await answer


def shadow_counts(router: Router, model: str = "m") -> Counter[tuple[str, str]]:
    return router.shadow.outcomes.get(model, Counter())


async def until_compared(router: Router, n: int, model: str = "m") -> None:
    """Wait until ``n`` shadow outcomes of ``model`` are counted (copies finish after the answer)."""
    await until(lambda: sum(shadow_counts(router, model).values()) == n)


# -- where requests go --------------------------------------------------------------------------


def test_without_a_candidate_everything_goes_to_stable_unmirrored(make_batcher: MakeBatcher) -> None:
    stable = make_batcher("m", "v1", Echo())
    other = make_batcher("m", "v2", Echo())
    router = Router({("m", "v1"): stable, ("m", "v2"): other})
    router.update({"m": Deployment("m", "v1", canary=1.0, shadow=True)}, ["m"])
    for i in range(200):
        assert router.route("m", None if i % 2 else f"key-{i}".encode()) == (stable, None)
    assert router.routed["m"] == Counter({("v1", "stable"): 200})
    assert router.routes["m"].problem == "" and router.unservable() == []


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5, 0.9])
def test_the_canary_share_without_a_key_is_random_within_bounds(
    make_batcher: MakeBatcher, share: float
) -> None:
    router, stable, candidate = two_versions(make_batcher, canary=share)
    n = 4000
    picks = [router.route("m", None) for _ in range(n)]
    to_candidate = sum(batcher is candidate for batcher, _ in picks)
    low, high = bounds(n, share)
    assert low <= to_candidate <= high
    assert all(batcher in (stable, candidate) and mirror is None for batcher, mirror in picks)
    assert router.routed["m"] == Counter(
        {("v1", "stable"): n - to_candidate, ("v2", "candidate"): to_candidate}
    )


@pytest.mark.parametrize(("share", "expected"), [(0.0, "v1"), (1.0, "v2")])
def test_a_share_of_zero_or_one_is_all_or_nothing(
    make_batcher: MakeBatcher, share: float, expected: str
) -> None:
    router, _, _ = two_versions(make_batcher, canary=share)
    versions = {router.route("m", None)[0].version for _ in range(500)}
    versions |= {router.route("m", f"user-{i}".encode())[0].version for i in range(500)}
    assert versions == {expected}


def test_a_routing_key_always_gets_the_same_version(make_batcher: MakeBatcher) -> None:
    share, n = 0.3, 3000
    router, _, candidate = two_versions(make_batcher, canary=share)
    keys = [f"user-{i}".encode() for i in range(n)]
    first = [router.route("m", key)[0] is candidate for key in keys]
    for _ in range(2):  # later rounds, interleaved with other keys, agree with the first
        assert [router.route("m", key)[0] is candidate for key in keys] == first
    low, high = bounds(n, share)
    assert low <= sum(first) <= high
    assert router.routed["m"][("v2", "candidate")] == 3 * sum(first)


def test_raising_the_share_never_moves_a_key_back_to_stable(make_batcher: MakeBatcher) -> None:
    keys = [f"session-{i}".encode() for i in range(2000)]
    router, _, candidate = two_versions(make_batcher)
    previous: set[bytes] = set()
    for share in (0.0, 0.01, 0.1, 0.3, 0.31, 0.5, 0.9, 1.0):
        router.update({"m": Deployment("m", "v1", "v2", share)}, ["m"])
        on_candidate = {key for key in keys if router.route("m", key)[0] is candidate}
        assert previous <= on_candidate
        low, high = bounds(len(keys), share)
        assert low <= len(on_candidate) <= high
        previous = on_candidate
    assert previous == set(keys)


def test_shadow_mirrors_stable_requests_to_the_candidate(make_batcher: MakeBatcher) -> None:
    router, stable, candidate = two_versions(make_batcher, shadow=True)
    for i in range(100):
        assert router.route("m", None if i % 2 else b"k%d" % i) == (stable, candidate)
    assert router.routed["m"] == Counter({("v1", "stable"): 100})


def test_requests_sent_to_the_candidate_are_not_mirrored(make_batcher: MakeBatcher) -> None:
    router, stable, candidate = two_versions(make_batcher, canary=0.5, shadow=True)
    picks = [router.route("m", None if i % 2 else b"k%d" % i) for i in range(400)]
    assert {(b.version, m.version if m else None) for b, m in picks} == {("v1", "v2"), ("v2", None)}
    counts = router.routed["m"]
    assert counts[("v1", "stable")] + counts[("v2", "candidate")] == 400
    assert counts[("v1", "stable")] == sum(m is candidate for _, m in picks)


def test_pinned_requests_are_counted_as_pinned(make_batcher: MakeBatcher) -> None:
    router, stable, candidate = two_versions(make_batcher, canary=1.0, shadow=True)
    assert router.pinned("m", "v1") is stable
    assert router.pinned("m", "v1") is stable
    assert router.pinned("m", "v2") is candidate
    assert router.routed["m"] == Counter({("v1", "pinned"): 2, ("v2", "pinned"): 1})


def test_pinned_refuses_unknown_versions_and_models(make_batcher: MakeBatcher) -> None:
    router, _, _ = two_versions(make_batcher)
    with pytest.raises(UnknownVersion, match="model 'm' serves no version 'v9'") as unknown:
        router.pinned("m", "v9")
    assert unknown.value.code == "unknown_version"
    with pytest.raises(UnknownModel, match="no model named 'nope'") as missing:
        router.pinned("nope", "v1")
    assert missing.value.code == "unknown_model"
    assert router.routed["m"] == Counter()


def test_route_refuses_an_unknown_model(make_batcher: MakeBatcher) -> None:
    router, _, _ = two_versions(make_batcher)
    with pytest.raises(UnknownModel, match="no model named 'nope'"):
        router.route("nope", None)


def test_a_model_whose_stable_is_not_loaded_is_not_ready(make_batcher: MakeBatcher) -> None:
    fine = make_batcher("ok", "v1", Echo())
    loaded = make_batcher("m", "v1", Echo())
    router = Router({("ok", "v1"): fine, ("m", "v1"): loaded})
    router.update({"ok": Deployment("ok", "v1"), "m": Deployment("m", "v8")}, ["ok", "m", "empty"])
    with pytest.raises(NotReady, match="model 'm': stable version 'v8' is not loaded") as refused:
        router.route("m", None)
    assert refused.value.status == 503
    with pytest.raises(NotReady, match="model 'empty': no version loaded"):
        router.route("empty", None)
    assert router.unservable() == ["empty", "m"]
    assert router.route("ok", None) == (fine, None)
    # The versions that are loaded can still be asked for by name.
    assert router.pinned("m", "v1") is loaded
    router.update({"ok": Deployment("ok", "v1"), "m": Deployment("m", "v1")}, ["ok", "m"])
    assert router.unservable() == []
    assert router.route("m", None) == (loaded, None)


def test_a_model_with_neither_version_loaded_names_both_problems(make_batcher: MakeBatcher) -> None:
    router = Router({("m", "v1"): make_batcher("m", "v1", Echo())})
    router.update({"m": Deployment("m", "v8", "v9", 0.5, True)}, ["m"])
    with pytest.raises(NotReady, match="stable version 'v8' is not loaded; candidate 'v9' is not loaded"):
        router.route("m", None)
    assert router.unservable() == ["m"]


def test_a_candidate_that_is_not_loaded_gets_no_traffic(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    stable = make_batcher("m", "v1", Echo())
    router = Router({("m", "v1"): stable})
    with caplog.at_level(logging.ERROR, logger="fastserve.router"):
        router.update({"m": Deployment("m", "v1", "v3", 1.0, True)}, ["m"])
    route = router.routes["m"]
    assert route.candidate is None and route.canary == 0.0 and not route.shadow
    assert route.problem == "candidate 'v3' is not loaded; it gets no traffic"
    assert [r.getMessage() for r in caplog.records] == [f"m: {route.problem}"]
    assert all(router.route("m", b"k%d" % i) == (stable, None) for i in range(200))
    assert router.unservable() == []


def test_a_candidate_with_another_feature_count_gets_no_traffic(make_batcher: MakeBatcher) -> None:
    stable = make_batcher("m", "v1", Echo())
    wide = make_batcher("m", "v5", Echo(n_features=N_FEATURES + 1))
    router = Router({("m", "v1"): stable, ("m", "v5"): wide})
    router.update({"m": Deployment("m", "v1", "v5", 1.0, True)}, ["m"])
    route = router.routes["m"]
    assert route.candidate is None and route.canary == 0.0 and not route.shadow
    assert route.problem == "candidate 'v5' takes a different number of features"
    assert all(router.route("m", None) == (stable, None) for _ in range(200))
    assert router.routed["m"] == Counter({("v1", "stable"): 200})


def test_routed_counts_survive_a_route_update(make_batcher: MakeBatcher) -> None:
    router, stable, candidate = two_versions(make_batcher)
    for _ in range(3):
        router.route("m", None)
    router.update({"m": Deployment("m", "v2", previous_stable="v1")}, ["m"])
    assert router.route("m", None) == (candidate, None)
    assert router.routed["m"] == Counter({("v1", "stable"): 3, ("v2", "stable"): 1})


# -- shadow -------------------------------------------------------------------------------------


def test_shadow_counts_agreement_and_disagreement(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    router, _, _ = two_versions(make_batcher, EchoUnless(odd_one_out=3.0), shadow=True)

    async def scenario() -> None:
        answers = await asyncio.gather(*(serve(router, "m", row(i)) for i in range(8)))
        assert answers == [[float(i)] for i in range(8)]  # stable's answers, the 3 included
        await until_compared(router, 8)
        assert shadow_counts(router) == Counter({("v2", "agree"): 7, ("v2", "disagree"): 1})
        assert router.routed["m"] == Counter({("v1", "stable"): 8})

    run(loop, scenario())


def test_shadow_tolerates_last_bit_differences_but_not_more(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    stable = make_batcher("m", "v1", Echo())
    close = make_batcher("m", "v2", Echo(skew=1e-12))
    far = make_batcher("m", "v3", Echo(skew=1e-6))
    meter = ShadowMeter()

    async def scenario() -> None:
        for i in range(1, 6):
            request = row(i * 1.1)
            answer = stable.admit(request)
            meter.mirror(close, request, answer, b"r")
            meter.mirror(far, request, answer, b"r")
            await answer
        await until(lambda: sum(meter.outcomes["m"].values()) == 10)
        assert meter.outcomes["m"] == Counter({("v2", "agree"): 5, ("v3", "disagree"): 5})

    run(loop, scenario())


def test_a_failing_candidate_counts_errors_and_leaves_stable_alone(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    router, stable, candidate = two_versions(make_batcher, Failing(), shadow=True)

    async def scenario() -> None:
        answers = await asyncio.gather(*(serve(router, "m", row(i)) for i in range(5)))
        assert answers == [[float(i)] for i in range(5)]
        await until_compared(router, 5)
        assert shadow_counts(router) == Counter({("v2", "error"): 5})
        assert stable.stats.errors == 0 and candidate.stats.errors == 5

    run(loop, scenario())


def test_a_copy_with_no_room_is_dropped_and_stable_answers(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    slow = Gated()
    # Copies may take half of a 4-row queue: 2 rows waiting, behind the one in predict.
    router, _, candidate = two_versions(make_batcher, slow, shadow=True, max_queue_depth=4)

    async def scenario() -> None:
        answers = []
        for i in range(6):
            answers.append(await serve(router, "m", row(i)))
            if i == 0:
                await until(lambda: slow.calls == 1)  # the first copy is in the held predict
        assert answers == [[float(i)] for i in range(6)]
        assert shadow_counts(router) == Counter({("v2", "dropped"): 3})
        assert candidate.queue.queued_rows == 2 and candidate.stats.shed == 0
        slow.gate.set()
        await until_compared(router, 6)
        assert shadow_counts(router) == Counter({("v2", "dropped"): 3, ("v2", "agree"): 3})

    run(loop, scenario())


def test_a_copy_that_expires_in_the_candidate_queue_is_dropped(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    slow = Gated()
    router, _, candidate = two_versions(
        make_batcher, slow, shadow=True, max_batch_rows=1, queue_timeout_ms=20
    )

    async def scenario() -> None:
        assert await serve(router, "m", row(1)) == [1.0]
        await until(lambda: slow.calls == 1)
        assert await serve(router, "m", row(2)) == [2.0]  # its copy waits behind the held one
        await asyncio.sleep(0.05)
        slow.gate.set()
        await until_compared(router, 2)
        assert shadow_counts(router) == Counter({("v2", "agree"): 1, ("v2", "dropped"): 1})
        assert candidate.stats.expired == 1

    run(loop, scenario())


def test_a_failed_stable_answer_is_not_compared(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    stable = make_batcher("m", "v1", Failing())
    candidate = make_batcher("m", "v2", Echo())
    meter = ShadowMeter()

    async def scenario() -> None:
        request = row(1)
        answer = stable.admit(request)
        meter.mirror(candidate, request, answer, b"r")
        with pytest.raises(ModelError, match="m v1 failed to predict"):
            await answer
        await until(lambda: sum(meter.outcomes.get("m", Counter()).values()) == 1)
        assert meter.outcomes["m"] == Counter({("v2", "dropped"): 1})

    run(loop, scenario())


def test_a_slow_candidate_does_not_hold_up_the_stable_answer(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    slow = Gated()
    router, _, _ = two_versions(make_batcher, slow, shadow=True)

    async def scenario() -> None:
        started = time.monotonic()
        assert await serve(router, "m", row(7)) == [7.0]
        assert time.monotonic() - started < 1.0  # the candidate is held for up to 10 s
        await until(lambda: slow.calls == 1)
        assert shadow_counts(router) == Counter()  # not compared until the copy is in
        slow.gate.set()
        await until_compared(router, 1)
        assert shadow_counts(router) == Counter({("v2", "agree"): 1})

    run(loop, scenario())


def test_the_answer_arriving_after_the_copy_is_still_compared(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    held = Gated()
    stable = make_batcher("m", "v1", held)
    candidate = make_batcher("m", "v2", EchoUnless(odd_one_out=4.0))
    meter = ShadowMeter()

    async def scenario() -> None:
        request = row(4)
        answer = stable.admit(request)
        meter.mirror(candidate, request, answer, b"r")
        await until(lambda: candidate.stats.requests == 1)
        await asyncio.sleep(0.01)
        assert "m" not in meter.outcomes and not answer.done()
        held.gate.set()
        assert await answer == [4.0]
        await until(lambda: "m" in meter.outcomes)
        assert meter.outcomes["m"] == Counter({("v2", "disagree"): 1})

    run(loop, scenario())


def shadow_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    records = [r for r in caplog.records if r.name == "fastserve.shadow"]
    assert all(r.levelno == logging.INFO and "\n" not in r.getMessage() for r in records)
    return [json.loads(r.getMessage()) for r in records]


def test_disagreements_are_logged_as_json_lines_at_most_once_a_second_per_model(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastserve.shadow")
    batchers = {
        (model, version): make_batcher(model, version, Echo() if version == "v1" else Echo(skew=1.0))
        for model in ("a", "b")
        for version in ("v1", "v2")
    }
    router = Router(batchers)
    router.update({m: Deployment(m, "v1", "v2", shadow=True) for m in ("a", "b")}, ["a", "b"])

    async def scenario() -> None:
        for i in range(1, 4):
            for model in ("a", "b"):
                batcher, mirror = router.route(model, None)
                request = row(i)
                answer = batcher.admit(request)
                assert mirror is not None
                router.shadow.mirror(mirror, request, answer, f"{model}-{i}".encode())
                await answer
                await until_compared(router, i, model)

    run(loop, scenario())
    for model in ("a", "b"):
        assert shadow_counts(router, model) == Counter({("v2", "disagree"): 3})
    assert shadow_lines(caplog) == [
        {
            "event": "shadow_disagreement",
            "model": model,
            "candidate": "v2",
            "request_id": f"{model}-1",
            "stable_predictions": [1.0],
            "candidate_predictions": [2.0],
        }
        for model in ("a", "b")
    ]


def test_disagreement_sampling_resumes_after_the_interval(
    loop: asyncio.AbstractEventLoop,
    make_batcher: MakeBatcher,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router_module, "_SAMPLE_EVERY_S", 0.2)
    caplog.set_level(logging.INFO, logger="fastserve.shadow")
    router, _, _ = two_versions(make_batcher, Echo(skew=1.0), shadow=True)

    async def scenario() -> None:
        for i, pause in enumerate([0.0, 0.0, 0.25, 0.0]):
            await asyncio.sleep(pause)
            await serve(router, "m", row(i + 1))
            await until_compared(router, i + 1)

    run(loop, scenario())
    assert [line["stable_predictions"] for line in shadow_lines(caplog)] == [[1.0], [3.0]]


# -- offering copies ----------------------------------------------------------------------------


def test_offer_never_raises_and_never_counts_as_shed(
    loop: asyncio.AbstractEventLoop, make_batcher: MakeBatcher
) -> None:
    slow = Gated()
    batcher = make_batcher("m", "v2", slow, max_queue_depth=4, max_batch_rows=1)

    async def scenario() -> None:
        bad = [
            PredictRequest(features=[1.0, 2.0, 3.0]),
            PredictRequest(features=[float("nan"), 0.0]),
            PredictRequest(instances=[[1.0, 2.0], [1.0]]),
            PredictRequest(instances=bytes(24), shape=(1, 3)),
            PredictRequest(features=["x", 1.0]),  # type: ignore[list-item]
        ]
        for request in bad:
            assert batcher.offer(request) is None
        assert batcher.queue.queued_rows == 0
        in_predict = batcher.offer(row(0))
        await until(lambda: slow.calls == 1)
        # Copies take at most half the queue: two rows wait, a third copy is dropped...
        copies = [batcher.offer(row(i)) for i in (1, 2, 3)]
        assert [c is not None for c in copies] == [True, True, False]
        assert batcher.offer(PredictRequest(instances=[[1.0, 0.0]] * 5)) is None
        # ...while the candidate's own requests may still use the rest of it.
        own = [batcher.admit(row(i)) for i in (4, 5)]
        assert batcher.offer(row(6)) is None
        assert batcher.stats.shed == 0
        slow.gate.set()
        done = await asyncio.gather(in_predict, copies[0], copies[1], *own)  # type: ignore[arg-type]
        assert done == [[0.0], [1.0], [2.0], [4.0], [5.0]]

    run(loop, scenario())
    assert batcher.stats.shed == 0
