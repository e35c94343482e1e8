"""The common hand-rolled design: FastAPI + uvicorn with an asyncio micro-batcher.

A bounded ``asyncio.Queue`` of (row, future); one background task waits for the first
item, then drains greedily with ``get_nowait`` up to ``--max-batch-rows``, predicts on
``np.array(rows)`` in the default executor and resolves the futures. A full queue is a
429. ``/metrics`` exposes ``batcher_batch_rows_sum`` and ``_count`` so that the harness
can report the batch size this design achieves.

    python -m bench.baselines.fastapi_batcher MODEL.skops --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import numpy as np
import skops.io as sio
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel


class Row(BaseModel):
    features: list[float]


def create_app(model_path: str, max_batch_rows: int = 64, max_queue_depth: int = 1024) -> FastAPI:
    model = sio.load(model_path, trusted=sio.get_untrusted_types(file=model_path))
    n_features = model.n_features_in_
    queue: asyncio.Queue[tuple[list[float], asyncio.Future[object]]] = asyncio.Queue(max_queue_depth)
    stats = {"sum": 0, "count": 0}

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < max_batch_rows and not queue.empty():
                batch.append(queue.get_nowait())
            x = np.array([row for row, _ in batch])
            try:
                predictions = (await loop.run_in_executor(None, model.predict, x)).tolist()
            except Exception as exc:  # one failed predict fails its batch, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            stats["sum"] += len(batch)
            stats["count"] += 1
            for (_, future), prediction in zip(batch, predictions, strict=True):
                if not future.done():  # the client may have gone away
                    future.set_result(prediction)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/predict/{model_name}")
    async def predict(model_name: str, row: Row) -> object:
        if len(row.features) != n_features:
            return JSONResponse({"error": f"expected {n_features} features"}, status_code=422)
        future = asyncio.get_running_loop().create_future()
        try:
            queue.put_nowait((row.features, future))
        except asyncio.QueueFull:
            return JSONResponse({"error": "queue full"}, status_code=429)
        return {"predictions": [await future]}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            f"batcher_batch_rows_sum {stats['sum']}\nbatcher_batch_rows_count {stats['count']}\n"
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .skops file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8001")))
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--max-queue-depth", type=int, default=1024)
    args = parser.parse_args()
    app = create_app(args.model, args.max_batch_rows, args.max_queue_depth)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
