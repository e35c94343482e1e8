"""LitServe with its own batching (``max_batch_size``, ``batch_timeout``) on the same model.

LitServe runs an API-server process (FastAPI on uvicorn) and an inference-worker process
joined by queues; ``batch``/``predict``/``unbatch`` below run in the worker. The worker
writes its running batch totals to ``--stats-file`` (one ``pwrite`` per batch, a few
microseconds against a ~10 ms predict) so that the harness can report the batch size.

    python -m bench.baselines.litserve_server MODEL.skops --port 8002
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np
import skops.io as sio


class DigitsAPI(ls.LitAPI):
    def __init__(self, model_path: str, stats_file: str | None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path
        self.stats_file = stats_file

    def setup(self, device: str) -> None:
        self.model = sio.load(self.model_path, trusted=sio.get_untrusted_types(file=self.model_path))
        self.rows = self.batches = 0
        self.stats_fd = None
        if self.stats_file:
            self.stats_fd = os.open(self.stats_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def decode_request(self, request: dict) -> list[float]:
        return request["features"]

    def batch(self, inputs: list[list[float]]) -> np.ndarray:
        return np.array(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        predictions = self.model.predict(x)
        self.rows += len(x)
        self.batches += 1
        if self.stats_fd is not None:
            os.pwrite(self.stats_fd, b"%20d %20d\n" % (self.rows, self.batches), 0)
        return predictions

    def unbatch(self, output: np.ndarray) -> list[int]:
        return output.tolist()

    def encode_response(self, output: int) -> dict[str, list[int]]:
        return {"predictions": [output]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .skops file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8002")))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    parser.add_argument("--stats-file", default=None)
    parser.add_argument("--fast-queue", action="store_true", help="ZeroMQ between API server and worker")
    args = parser.parse_args()
    api = DigitsAPI(
        args.model,
        args.stats_file,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path="/predict/digits",
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=args.fast_queue)
    server.run(
        host=args.host,
        port=args.port,
        generate_client_file=False,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
