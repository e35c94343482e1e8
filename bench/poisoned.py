"""What one poisoned request costs its batch: the model raises, and the batch is split to find it.

A round sends 64 single-row churn requests at once (one full batch), then waits for every
answer. A clean round is one predict; in a poisoned round one request carries a plan the
pipeline's encoder has never seen (``handle_unknown="error"``), so the model raises on the
batch and the batcher bisects it until that request stands alone. The figure is the model's
time per round, from ``/status`` (``predict_seconds`` and ``batches`` over the round), clean
against poisoned, rounds alternated so that both see the same phase of the machine; and what
the 63 good requests waited, end to end, from the client.

    python -m bench.poisoned              # 20 rounds of each
    python -m bench.poisoned --rounds 3   # a look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import models, servers
from bench.bodies import CHURN_ROW
from bench.harness import RESULTS_DIR, Server, http_get, serving
from bench.machine import CLIENT_CORE

ROUND = 64  # one full batch (max_batch_rows)
_POISON = {**CHURN_ROW, "plan": "platinum"}


async def _post(port: int, body: bytes) -> tuple[int, float]:
    """POST one body on a fresh connection: its status and its latency in ms."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /predict/churn HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    writer.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status, (time.perf_counter() - started) * 1000


def _totals(server: Server) -> tuple[float, int, int]:
    """churn v1's predict seconds, batches and errors so far."""
    _, body = http_get(server.url("/status"))
    v1 = json.loads(body)["models"]["churn"]["versions"]["v1"]
    return v1["predict_seconds"], v1["batches"], v1["errors"]


def _round(server: Server, poisoned: bool) -> dict[str, Any]:
    bodies = [json.dumps({"features": CHURN_ROW}).encode()] * ROUND
    if poisoned:
        bodies[ROUND // 2] = json.dumps({"features": _POISON}).encode()
    before = _totals(server)

    async def send_all() -> list[tuple[int, float]]:
        return await asyncio.gather(*(_post(server.port, body) for body in bodies))

    replies = asyncio.run(send_all())
    after = _totals(server)
    good = [ms for (status, ms), body in zip(replies, bodies, strict=True) if b"platinum" not in body]
    statuses = sorted({status for status, _ in replies})
    return {
        "poisoned": poisoned,
        "predict_ms": (after[0] - before[0]) * 1000,
        "batches": after[1] - before[1],
        "errors": after[2] - before[2],
        "statuses": statuses,
        "good_p50_ms": statistics.median(good),
        "good_max_ms": max(good),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each kind, alternated")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    # A long batch window: a round's 64 requests arrive over a few ms and make one batch.
    server = servers.fastserve(models.churn_repository(), "fastserve-poisoned", batch_window_ms=20)
    work = args.out / f"poisoned-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(CLIENT_CORE)})  # the client on the core the server does not have
    with serving(server, work):
        rounds = [_round(server, poisoned=i % 2 == 1) for i in range(2 * args.rounds)]
    (work / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    lines = [
        "| round | predict ms | batches | good requests p50 / max ms | statuses |",
        "|---|--:|--:|--:|---|",
    ]
    for kind in (False, True):
        mine = [r for r in rounds if r["poisoned"] is kind]
        label = "one poisoned" if kind else "clean"
        lines.append(
            f"| {label} | {statistics.median(r['predict_ms'] for r in mine):.1f}"
            f" | {statistics.median(r['batches'] for r in mine):g}"
            f" | {statistics.median(r['good_p50_ms'] for r in mine):.1f}"
            f" / {statistics.median(r['good_max_ms'] for r in mine):.1f}"
            f" | {sorted({s for r in mine for s in r['statuses']})} |"
        )
    print(f"{args.rounds} rounds of each, {ROUND} single-row requests a round (medians); {work}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
