"""One small adapter per server: each returns the :class:`Server` that starts it on a free port."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import peers
from bench.harness import ROOT, Server, free_port


def fastserve_command() -> str | None:
    """The ``fastserve`` executable, or None while it is not installed."""
    return shutil.which("fastserve")


def fastserve_demo(directory: Path) -> Path:
    """The demo repository (``digits`` v1 = RF-300, v2 = HistGradientBoosting), written once."""
    command = fastserve_command()
    if command is None:
        raise FileNotFoundError("fastserve")
    if not (directory / "digits" / "v1" / "model.skops").exists():
        subprocess.run([command, "demo", str(directory)], check=True, timeout=600, stdout=subprocess.DEVNULL)
    return directory


def fastserve(repository: Path, name: str = "fastserve", **settings: object) -> Server:
    """``fastserve serve``, 1 worker; a setting is a flag: ``max_batch_rows=1`` → ``--max-batch-rows 1``,
    ``metrics=False`` → ``--no-metrics``."""
    port = free_port()
    argv = [fastserve_command() or "fastserve", "serve", "--repository", str(repository)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # A fresh deployment state per run: every run serves the repository's stable version (v1),
    # whatever was deployed by hand or by an earlier run.
    state = Path(tempfile.mkdtemp(prefix="fastserve-bench-state-")) / "state.sqlite"
    argv += ["--state-path", str(state)]
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    # Until /metrics lands (issue 5), the batch counts come from /status.
    return Server(name, argv, port, status_path="/status", http2=True)


def fastapi_batcher(model: Path, name: str = "fastapi-batcher", **settings: object) -> Server:
    """FastAPI + uvicorn with the hand-rolled asyncio batcher (``bench/baselines/fastapi_batcher.py``)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baselines.fastapi_batcher", str(model), "--port", str(port)]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return Server(name, argv, port, batch_metric="batcher_batch_rows")


def litserve(model: Path, stats_dir: Path, name: str = "litserve") -> Server:
    """LitServe, ``max_batch_size=64``, ``batch_timeout=0.002`` (``bench/baselines/litserve_server.py``)."""
    port = free_port()
    stats_file = stats_dir / f"{name}-{port}.stats"
    argv = [sys.executable, "-m", "bench.baselines.litserve_server", str(model), "--port", str(port)]
    argv += ["--stats-file", str(stats_file)]
    return Server(name, argv, port, ready_path="/health", stats_file=stats_file)


def http_ceiling(name: str = "http-ceiling") -> Server:
    """Granian + Starlette + msgspec answering a constant: no model (``bench/baselines/http_ceiling.py``)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baselines.http_ceiling", "--port", str(port)]
    return Server(name, argv, port, http2=True)


def refusal_floor(name: str = "refusal-floor") -> Server:
    """Granian refusing every predict with fastserve's 429, unread (``bench/baselines/refusal_floor.py``)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baselines.refusal_floor", "--port", str(port)]
    return Server(name, argv, port, http2=True)


MLSERVER_RUNTIME = "bench.baselines.mlserver_runtime.CountingSKLearnModel"


def write_mlserver_repository(
    directory: Path, estimators: dict[str, object], max_batch_size: int = 64, max_batch_time_s: float = 0.002
) -> Path:
    """An MLServer model repository: ``<name>/model.joblib`` and ``model-settings.json`` per model.

    MLServer's scikit-learn runtime loads joblib (pickle) files only: these are the bench's
    own copies of the fitted estimators fastserve serves from skops files. Adaptive batching
    is on with fastserve's defaults (64 rows, 2 ms). The runtime is MLServer's, counting its
    batches into ``<name>.stats`` (``bench/baselines/mlserver_runtime.py``).
    """
    import joblib

    for name, estimator in estimators.items():
        model_dir = directory / name
        model_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump(estimator, model_dir / "model.joblib")
        settings = {
            "name": name,
            "implementation": MLSERVER_RUNTIME,
            "max_batch_size": max_batch_size,
            "max_batch_time": max_batch_time_s,
            "parameters": {
                "uri": str(model_dir / "model.joblib"),
                "version": "v1",
                "extra": {"stats_file": str(directory / f"{name}.stats")},
            },
        }
        (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def mlserver(repository: Path, model: str, name: str = "mlserver", parallel_workers: int = 0) -> Server:
    """``mlserver start`` on a repository from ``write_mlserver_repository``, from its own
    environment (``bench.peers``); ``model`` is the one ``predict_path`` and the stats file name.

    ``parallel_workers=0`` runs inference in the server's process. MLServer's default (1) runs it
    in a worker process beside it, and on RF-300 its batcher then sends that busy worker a batch
    every 2 ms window: 4-5 rows a batch instead of 46-58, and a fifth of the throughput or less.
    Access logs are off with ``debug`` off; gRPC and metrics get free ports of their own.
    """
    command = peers.executable("mlserver", "mlserver")
    argv = [str(command or "mlserver"), "start", str(repository)]
    port = free_port()
    env = {
        "MLSERVER_HOST": "127.0.0.1",
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
        "MLSERVER_PARALLEL_WORKERS": str(parallel_workers),
        "MLSERVER_DEBUG": "false",
        # Else it makes them in its working directory: the checkout, where the harness starts it.
        "MLSERVER_METRICS_DIR": str(repository / ".metrics"),
        "MLSERVER_ENVIRONMENTS_DIR": str(repository / ".envs"),
        "PYTHONPATH": str(ROOT),  # for its runtime, bench.baselines.mlserver_runtime
    }
    return Server(
        name,
        argv,
        port,
        ready_path="/v2/health/ready",
        predict_path=f"/v2/models/{model}/infer",
        stats_file=repository / f"{model}.stats",
        env=env,
    )
