"""The compute ceiling: predict on full batches in a loop, no HTTP, no queue.

For each batch size, ``predict`` is called on that many digits rows for a bounded time;
the result is rows/s and seconds per call. No server can predict faster than this on one
core, so a server's RPS over the ceiling *at the batch size it achieved* is the share of
the core it spends on the model.

There are two ceilings for a tree ensemble: scikit-learn's own ``predict`` (what the peers
call) and fastserve's compiled predict (``fastserve.trees``, what fastserve serves it with).
Each server is compared with the ceiling of the predict it runs.

``--rows churn`` feeds the churn pipeline (``fastserve.demo``) DataFrame batches of its own
table, with the dtypes it was fitted on: building the DataFrame is the server's work, not
the model's, and is left out.

    taskset -c 0 python -m bench.compute_ceiling bench/results/models/rf300.skops --seconds 2
    taskset -c 0 python -m bench.compute_ceiling bench/results/models/rf300.skops --predict compiled
    taskset -c 0 python -m bench.compute_ceiling bench/results/models/repo-churn/churn/v1/model.skops \\
        --rows churn
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.harness import Record

BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256)
# The names fastserve's /status gives its predicts. The process path's child calls scikit-learn's
# predict: that is its ceiling, and the pipe to it is the server's cost, not the model's.
SCIKIT_LEARN, COMPILED, PROCESS = "scikit-learn", "compiled", "process"
DIGITS, CHURN = "digits", "churn"  # the rows a batch is made of


def batch_maker(rows: str) -> Callable[[int], Any]:
    """``size -> batch``: digits rows as a C-contiguous float64 array, or churn rows as a DataFrame."""
    if rows == CHURN:
        from fastserve.demo import churn_table

        frame, _ = churn_table()
        return lambda size: frame.iloc[np.resize(np.arange(len(frame)), size)].reset_index(drop=True)
    from sklearn.datasets import load_digits

    data = load_digits().data
    return lambda size: np.ascontiguousarray(np.resize(data, (size, data.shape[1])))


def predict_function(model: Any, path: str) -> Callable[[np.ndarray[Any, Any]], Any]:
    """The model's ``predict`` by ``path``; ``compiled`` fails where fastserve would not compile it."""
    if path in (SCIKIT_LEARN, PROCESS):
        return model.predict  # type: ignore[no-any-return]
    from fastserve.trees import compile_trees

    compiled = compile_trees(model)
    if compiled is None:
        raise SystemExit(f"fastserve does not compile a {type(model).__name__}")
    return compiled


def measure(
    predict: Callable[[Any], Any],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seconds: float = 2.0,
    rows: str = DIGITS,
) -> list[Record]:
    """rows/s and seconds per ``predict`` call for each batch size, ``seconds`` of calls each (at least 3)."""
    make_batch = batch_maker(rows)
    results = []
    for size in batch_sizes:
        x = make_batch(size)
        predict(x)  # warm-up: first-call allocations
        calls: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(calls) < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            predict(x)
            calls.append(time.perf_counter() - start)
        total = sum(calls)
        results.append(
            {
                "batch_rows": size,
                "calls": len(calls),
                "s_per_call_mean": total / len(calls),
                "s_per_call_median": statistics.median(calls),
                "rows_per_s": round(size * len(calls) / total, 1),
            }
        )
    return results


def rows_per_s_at(ceiling: Sequence[Record], batch_rows: float) -> float:
    """The ceiling's rows/s at a (fractional) mean batch size, interpolating seconds per call.

    Time per call is close to affine in the batch size, so interpolating it (rather than
    rows/s) is the better estimate between two measured sizes.
    """
    points = sorted((r["batch_rows"], r["s_per_call_mean"]) for r in ceiling)
    sizes, times = [p[0] for p in points], [p[1] for p in points]
    return float(batch_rows / np.interp(batch_rows, sizes, times))


def main() -> None:
    from bench.models import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .skops file")
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--predict", choices=(SCIKIT_LEARN, PROCESS, COMPILED), default=SCIKIT_LEARN)
    parser.add_argument("--rows", choices=(DIGITS, CHURN), default=DIGITS, help="what a batch is made of")
    args = parser.parse_args()
    predict = predict_function(load(args.model), args.predict)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    for row in measure(predict, sizes, args.seconds, args.rows):
        record = {"kind": "compute_ceiling", "model": args.model, "predict": args.predict, "rows": args.rows}
        record.update(row)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
