"""MLServer's scikit-learn runtime, counting its batches: what the harness reads the mean batch from.

``mlserver_sklearn.SKLearnModel`` unchanged (loading, request checks, codecs, outputs); its
``predict`` is wrapped to add the rows and the call to running totals in
``parameters.extra.stats_file`` (one ``pwrite`` per batch, a few microseconds against a
predict of a millisecond or more), as ``litserve_server.py`` does. MLServer's adaptive
batcher calls this ``predict`` once per merged batch. Its own metrics count requests and
queue sizes, not batches. Runs in MLServer's environment (``bench.peers``), imported by the
``implementation`` of ``model-settings.json`` with the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import os

from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_sklearn import SKLearnModel


class CountingSKLearnModel(SKLearnModel):  # type: ignore[misc]
    async def load(self) -> bool:
        loaded: bool = await super().load()
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        path = extra.get("stats_file")
        self._rows = self._batches = 0
        self._stats_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if path else None
        return loaded

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        response: InferenceResponse = await super().predict(payload)
        self._rows += payload.inputs[0].shape[0]  # every input of a request has the same rows
        self._batches += 1
        if self._stats_fd is not None:
            os.pwrite(self._stats_fd, b"%20d %20d\n" % (self._rows, self._batches), 0)
        return response
