"""The batcher on a real event loop and predict thread, with models that record their calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from fastserve.batcher import Batcher, Turns
from fastserve.body import ClientGone
from fastserve.codec import PredictRequest
from fastserve.config import BatchSettings
from fastserve.errors import BadFeatures, ModelError, ModelRejectedInput, QueueFull, QueueTimeout


class RecordingModel:
    """Predicts the first feature; records batch sizes; can be held or made to fail."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_when_first_feature = -1.0

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.gate.wait(timeout=10)
        self.batch_sizes.append(len(rows))
        if (rows[:, 0] == self.fail_when_first_feature).any():
            raise RuntimeError("boom")
        return rows[:, 0].copy()


def run(scenario: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        await scenario(asyncio.get_running_loop())

    asyncio.run(main())


def make(loop: asyncio.AbstractEventLoop, model: RecordingModel, **settings: Any) -> Batcher:
    return Batcher("m", "v1", model.predict, 2, BatchSettings(**settings), loop)


def row(value: float) -> PredictRequest:
    return PredictRequest(features=[value, 0.0])


def test_batches_fill_greedily_up_to_max_batch_rows() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=50)
        futures = [batcher.admit(row(i)) for i in range(20)]
        results = await asyncio.gather(*futures)
        assert results == [[float(i)] for i in range(20)]
        assert model.batch_sizes == [8, 8, 4]
        assert batcher.stats.batches == 3 and batcher.stats.mean_batch_rows == 20 / 3
        await batcher.drain_and_stop(5)

    run(scenario)


def test_multi_row_requests_get_their_own_slice_back() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=64, batch_window_ms=5)
        first = batcher.admit(PredictRequest(instances=[[1, 0], [2, 0], [3, 0]]))
        second = batcher.admit(row(4))
        third = batcher.admit(
            PredictRequest(instances=np.array([[5, 0], [6, 0]], "<f8").tobytes(), shape=(2, 2))
        )
        assert await asyncio.gather(first, second, third) == [[1, 2, 3], [4], [5, 6]]
        assert model.batch_sizes == [6]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_a_small_batch_waits_one_window_then_goes() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=40)
        started = time.monotonic()
        assert await batcher.admit(row(1)) == [1.0]
        waited = time.monotonic() - started
        assert 0.035 <= waited < 1.0
        await batcher.drain_and_stop(5)

    run(scenario)


def test_the_window_restarts_with_each_arrival_up_to_the_longest_delay() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=64, batch_window_ms=30, max_batch_delay_ms=200)
        futures = []
        for i in range(5):  # one arrival every 10 ms: each lands inside the window
            futures.append(batcher.admit(row(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
        assert model.batch_sizes == [5]
        await batcher.drain_and_stop(5)

        model.batch_sizes.clear()
        batcher = make(loop, model, max_batch_rows=64, batch_window_ms=30, max_batch_delay_ms=60)
        started = time.monotonic()
        futures = []
        while time.monotonic() - started < 0.2:  # a steady trickle never lets the window pass
            futures.append(batcher.admit(row(len(futures))))
            await asyncio.sleep(0.005)
        await asyncio.gather(*futures)
        assert len(model.batch_sizes) >= 3  # the longest delay cut the trickle into batches
        assert sum(model.batch_sizes) == len(futures)
        await batcher.drain_and_stop(5)

    run(scenario)


def test_no_window_means_no_wait() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=0)
        started = time.monotonic()
        assert await batcher.admit(row(1)) == [1.0]
        assert time.monotonic() - started < 0.03
        await batcher.drain_and_stop(5)

    run(scenario)


@pytest.mark.parametrize("predict_s", [0.0, 0.06], ids=["fast-model", "slow-model"])
def test_the_window_never_outlasts_the_models_predict(predict_s: float) -> None:
    model = SpinningModel(predict_s, computes=False)

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=40)
        assert batcher.window_s() == 0.04  # no predict measured yet: the configured window
        await batcher.admit(row(0))
        started = time.monotonic()
        assert await batcher.admit(row(1)) == [1.0]
        waited = time.monotonic() - started
        if predict_s:  # a 60 ms predict: waiting 40 ms for company can pay, and still does
            assert batcher.window_s() == 0.04
            assert waited >= 0.035 + predict_s
        else:  # a predict of microseconds: a 40 ms wait could never pay
            assert batcher.window_s() < 0.005
            assert waited < 0.03
        await batcher.drain_and_stop(5)

    run(scenario)


def test_one_thread_hop_per_batch() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=10, batch_window_ms=50)
        hops = 0
        original = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal hops
            hops += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        await asyncio.gather(*(batcher.admit(row(i)) for i in range(30)))
        assert model.batch_sizes == [10, 10, 10]
        assert hops == 3
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_a_request_the_model_rejects_fails_alone_and_the_rest_of_its_batch_is_answered() -> None:
    model = RecordingModel()
    model.fail_when_first_feature = 3

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=4, batch_window_ms=50)
        mixed = [batcher.admit(row(i)) for i in range(4)]  # holds the 3: the batch raises
        fine = [batcher.admit(row(i)) for i in range(10, 14)]
        outcomes = await asyncio.gather(*mixed, *fine, return_exceptions=True)
        assert outcomes[:3] == [[0.0], [1.0], [2.0]]
        assert isinstance(outcomes[3], ModelRejectedInput)
        assert "RuntimeError: boom" in str(outcomes[3])  # the model's message, for the client
        assert outcomes[4:] == [[10.0], [11.0], [12.0], [13.0]]
        assert batcher.stats.errors == 1
        # The batch of four, its halves, then the failing half's two singles; the next batch.
        assert model.batch_sizes == [4, 2, 2, 1, 1, 4]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_isolating_rejected_requests_costs_at_most_two_predicts_a_request() -> None:
    model = RecordingModel()
    model.fail_when_first_feature = -5

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=64, batch_window_ms=50)
        requests = [row(-5 if i in (7, 40) else i) for i in range(64)]
        outcomes = await asyncio.gather(*map(batcher.admit, requests), return_exceptions=True)
        rejected = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, ModelRejectedInput)]
        assert rejected == [7, 40]
        assert all(outcomes[i] == [float(i)] for i in range(64) if i not in rejected)
        assert 1 < len(model.batch_sizes) <= 2 * 64 - 1
        assert sum(1 for size in model.batch_sizes if size == 1) == 4  # two found, two beside them
        await batcher.drain_and_stop(5)

    run(scenario)


def test_a_batch_whose_every_request_fails_is_a_model_error_when_the_probe_fails_too() -> None:
    model = RecordingModel()
    model.fail_when_first_feature = 1

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        for probe, expected in ((None, ModelError), (np.array([[1.0, 0.0]]), ModelError)):
            batcher = Batcher(
                "m", "v1", model.predict, 2, BatchSettings(batch_window_ms=50), loop, probe=probe
            )
            outcomes = await asyncio.gather(
                *(batcher.admit(row(1)) for _ in range(3)), return_exceptions=True
            )
            assert all(type(o) is expected for o in outcomes), outcomes
            assert "boom" not in str(outcomes[0])  # the model's own message stays in the log
            assert batcher.stats.errors == 3
            await batcher.drain_and_stop(5)

    run(scenario)


def test_a_batch_whose_every_request_fails_is_rejected_input_when_the_model_predicts_its_probe() -> None:
    model = RecordingModel()
    model.fail_when_first_feature = 1

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        probe = np.array([[0.0, 0.0]])  # the model predicts it: the model works
        batcher = Batcher("m", "v1", model.predict, 2, BatchSettings(batch_window_ms=50), loop, probe=probe)
        lone = await asyncio.gather(batcher.admit(row(1)), return_exceptions=True)
        assert type(lone[0]) is ModelRejectedInput and lone[0].status == 422
        assert model.batch_sizes[-1] == 1  # the probe was predicted
        await batcher.drain_and_stop(5)

    run(scenario)


def test_admission_is_refused_past_the_queue_depth() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=2, max_queue_depth=4, batch_window_ms=0)
        in_predict = batcher.admit(row(0))  # no window: straight to the (held) model
        await asyncio.sleep(0.05)
        queued = [batcher.admit(row(i)) for i in range(1, 5)]  # depth counts these, not row 0
        with pytest.raises(QueueFull, match="queue is full") as refused:
            batcher.admit(row(9))
        assert refused.value.status == 429 and refused.value.headers["retry-after"] == "1"
        assert batcher.stats.shed == 1
        model.gate.set()
        assert await asyncio.gather(in_predict, *queued) == [[float(i)] for i in range(5)]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_requests_past_the_queue_deadline_expire_before_predict() -> None:
    model = RecordingModel()
    model.gate.clear()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=1, batch_window_ms=0, queue_timeout_ms=20)
        first = batcher.admit(row(0))
        late = [batcher.admit(row(i)) for i in range(1, 4)]
        await asyncio.sleep(0.06)
        model.gate.set()
        outcomes = await asyncio.gather(first, *late, return_exceptions=True)
        assert outcomes[0] == [0.0]
        assert all(isinstance(o, QueueTimeout) for o in outcomes[1:])
        assert model.batch_sizes == [1]  # the expired rows never reached the model
        assert batcher.stats.expired == 3 and batcher.queue.queued_rows == 0
        await batcher.drain_and_stop(5)

    run(scenario)


def test_bad_rows_are_refused_and_leave_no_trace() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=10)
        good = batcher.admit(row(1))
        with pytest.raises(BadFeatures, match="row 0 has 3 features, expected 2"):
            batcher.admit(PredictRequest(features=[1.0, 2.0, 3.0]))
        with pytest.raises(BadFeatures, match="NaN or infinity"):
            batcher.admit(PredictRequest(instances=[[1.0, 2.0], [float("inf"), 0.0]]))
        with pytest.raises(BadFeatures, match="shape has 3 features, expected 2"):
            batcher.admit(PredictRequest(instances=bytes(24), shape=(1, 3)))
        assert batcher.queue.queued_rows == 1
        assert await good == [1.0]
        assert model.batch_sizes == [1]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_stopping_answers_what_is_queued_first() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=4, batch_window_ms=100)
        futures = [batcher.admit(row(i)) for i in range(6)]
        await batcher.drain_and_stop(5)
        assert [f.result() for f in futures] == [[float(i)] for i in range(6)]
        assert not batcher._thread.is_alive()

    run(scenario)


class SpinningModel(RecordingModel):
    """Computes (spins on the CPU) for ``seconds`` per call, or waits that long when told to."""

    def __init__(self, seconds: float, computes: bool = True) -> None:
        super().__init__()
        self.seconds = seconds
        self.computes = computes

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.computes:
            deadline = time.thread_time() + self.seconds
            while time.thread_time() < deadline:
                pass
        else:
            time.sleep(self.seconds)
        return super().predict(rows)


def _two_versions(
    loop: asyncio.AbstractEventLoop, busy: RecordingModel, other: RecordingModel
) -> tuple[Batcher, Batcher]:
    turns = Turns()
    settings = BatchSettings(max_batch_rows=64, batch_window_ms=1, max_batch_delay_ms=2)
    first = Batcher("m", "v1", busy.predict, 2, settings, loop, turns=turns)
    second = Batcher("m", "v2", other.predict, 2, settings, loop, turns=turns)
    return first, second


@pytest.mark.parametrize("computes", [True, False], ids=["computing", "waiting"])
def test_a_partial_batch_waits_only_for_another_versions_computing_predict(computes: bool) -> None:
    busy, other = SpinningModel(0.15, computes), RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        first, second = _two_versions(loop, busy, other)
        await first.admit(row(0))  # one predict teaches first how it spends its time
        held = first.admit(row(1))
        await asyncio.sleep(0.02)  # first is in its second predict now
        trickle = []
        for i in range(5):
            trickle.append(second.admit(row(10 + i)))
            await asyncio.sleep(0.01)
        assert await asyncio.gather(*trickle) == [[10.0 + i] for i in range(5)]
        await held
        if computes:
            # second gave way while first computed, then took everything at once.
            assert other.batch_sizes == [5]
        else:
            # first only slept: second batched as usual, a request or so at a time.
            assert len(other.batch_sizes) >= 3
        await first.drain_and_stop(5)
        await second.drain_and_stop(5)

    run(scenario)


def test_a_full_batch_never_waits_its_turn() -> None:
    busy, other = SpinningModel(0.3), RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        first, second = _two_versions(loop, busy, other)
        await first.admit(row(0))
        held = first.admit(row(1))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        answers = await asyncio.gather(*(second.admit(row(i)) for i in range(64)))
        assert time.monotonic() - started < 0.2  # did not wait out first's 0.3 s predict
        assert answers == [[float(i)] for i in range(64)] and other.batch_sizes == [64]
        await held
        await first.drain_and_stop(5)
        await second.drain_and_stop(5)

    run(scenario)


def test_a_predict_that_runs_long_holds_the_others_only_so_long() -> None:
    busy, other = SpinningModel(0.05), RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        first, second = _two_versions(loop, busy, other)
        await first.admit(row(0))  # first's usual predict: 50 ms
        busy.seconds = 1.0  # then one that runs 20 times longer
        held = first.admit(row(1))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        assert await second.admit(row(7)) == [7.0]
        # second waited at most about twice first's usual predict, not its whole long one.
        assert time.monotonic() - started < 0.5
        await held
        await first.drain_and_stop(5)
        await second.drain_and_stop(5)

    run(scenario)


class RowsModel(RecordingModel):
    """RecordingModel that also records every first feature it predicted."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def predict(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out = super().predict(rows)
        self.seen += rows[:, 0].tolist()
        return out


def test_requests_whose_client_left_are_cut_out_and_the_rest_keep_their_rows() -> None:
    model = RowsModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=64, batch_window_ms=1, queue_timeout_ms=10_000)
        model.gate.clear()
        blocker = batcher.admit(row(100))
        await asyncio.sleep(0.05)  # the blocker is in predict; the others queue behind it
        requests = [
            PredictRequest(instances=[[i, 0], [i + 0.5, 0]]) if i % 3 == 0 else row(i) for i in range(12)
        ]
        futures = [batcher.admit(request) for request in requests]
        for i in (0, 1, 4, 5, 11):  # gone from the middle, both ends, multi-row ones too
            batcher.client_left(futures[i])
        model.gate.set()
        assert await blocker == [100]
        for i, future in enumerate(futures):
            if i in (0, 1, 4, 5, 11):
                with pytest.raises(ClientGone):
                    await future
            else:
                expected = [i, i + 0.5] if i % 3 == 0 else [i]
                assert await future == expected
        kept = [v for i in (2, 3, 6, 7, 8, 9, 10) for v in ([i, i + 0.5] if i % 3 == 0 else [i])]
        assert model.seen == [100, *kept]
        assert batcher.stats.gone == 5 and batcher.queue.queued_rows == 0
        # Gone requests are counted once: the next batches need no search for them.
        assert batcher._left == 0
        assert await batcher.admit(row(1)) == [1]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_a_queued_request_behind_a_busy_model_expires_at_its_own_deadline() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=1, batch_window_ms=0, queue_timeout_ms=50)
        model.gate.clear()
        hung = batcher.admit(row(1))
        await asyncio.sleep(0.02)
        behind = batcher.admit(row(2))
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(behind, 5)  # while the predict still hangs
        assert not hung.done() and batcher.predict_running_s() is not None
        model.gate.set()
        assert await hung == [1]
        assert batcher.stats.expired == 1 and batcher.queue.queued_rows == 0
        assert await batcher.admit(row(3)) == [3]
        await batcher.drain_and_stop(5)

    run(scenario)


def test_only_a_request_that_waits_long_is_watched_for_its_client() -> None:
    model = RecordingModel()

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, model, max_batch_rows=8, batch_window_ms=1, queue_timeout_ms=10_000)
        receives: list[asyncio.Future[dict[str, str]]] = []

        def receive() -> asyncio.Future[dict[str, str]]:
            receives.append(loop.create_future())
            return receives[-1]

        quick = batcher.admit(row(1))
        quick_entry = batcher.waiting(receive, quick)
        assert await quick == [1]
        model.gate.clear()
        slow = batcher.admit(row(2))  # in predict, held by the gate
        slow_entry = batcher.waiting(receive, slow)
        await asyncio.sleep(0.02)
        behind = batcher.admit(row(3))
        behind_entry = batcher.waiting(receive, behind)
        await asyncio.sleep(0.15)  # past _WATCH_AFTER_S for both
        assert quick_entry.watch is None  # answered first: never cost a receive()
        assert slow_entry.watch is not None and behind_entry.watch is not None
        assert len(receives) == 2
        receives[1].set_result({"type": "http.disconnect"})  # the client of `behind` leaves
        await asyncio.sleep(0)
        model.gate.set()
        assert await slow == [2]
        with pytest.raises(ClientGone):
            await behind
        slow_entry.watch.stop()
        await asyncio.sleep(0.05)
        assert batcher.stats.gone == 1 and model.batch_sizes == [1, 1]
        await batcher.drain_and_stop(5)

    run(scenario)
