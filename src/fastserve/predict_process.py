"""A version's predict in its own process at the lowest CPU priority (``--predict-process``;
under the default ``auto``, the registry sends a version here when its predict of a full batch
holds the worker's thread more than ``registry.PROCESS_ABOVE_MS``).

scikit-learn's own predict holds the GIL for most of its run. In a thread beside the event
loop, every request that arrives meanwhile, even one refused with a 429, waits for the
loop's turn on the GIL; and a low-priority thread does not help, because the loop then waits
on the lock the starved thread holds. In a process of its own at nice 19, the predict holds
no lock the loop needs, and the OS gives the core to HTTP the moment a request arrives. On
the 2-core VM of the README, RF-300 on scikit-learn's predict under an open load at 4x its
capacity answered 429s at p99 2.9-5.2 ms this way, against 42-279 ms in the thread.

Only versions the compiled tree predict does not take run here: it releases the GIL itself.

The child loads the version from the same artifact, with the same trust rules, as the
worker did (``repository.load_estimator``). Only float64 rows go to it and only ``.npy`` bytes
come back (``allow_pickle=False``): nothing is unpickled from the pipe. Over its stdin: the
row count (8 bytes, little-endian) and the rows. Over its stdout: a status byte (0: the
predictions follow; 1: predict raised, its message follows), the payload's length (8 bytes)
and the payload. The child exits when its stdin closes: when the worker closes it, and when
the worker dies. A child that dies fails the batch it had (``PredictProcessDied``) and is
started again for the next one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

logger = logging.getLogger(__name__)

_ROWS = struct.Struct("<q")
_REPLY = struct.Struct("<Bq")  # status, payload length
_OK, _RAISED = 0, 1


class PredictProcessDied(RuntimeError):
    """The child exited or its pipes broke mid-batch; the next call starts a new one."""


class PredictProcess:
    """``estimator.predict`` for one version, answered by a child process at nice 19.

    Called from the version's predict thread; a lock keeps one batch in the pipe at a time.
    """

    def __init__(self, artifact: Path, trusted_types: Sequence[str], n_features: int) -> None:
        self._argv = [sys.executable, "-m", "fastserve.predict_process", str(artifact)]
        self._argv.append(json.dumps(list(trusted_types)))
        self._n_features = n_features
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None before the first call and after close."""
        return self._proc.pid if self._proc is not None else None

    def __call__(self, X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        rows = np.ascontiguousarray(X, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self._n_features:
            raise ValueError(f"X has shape {rows.shape}, expected (n, {self._n_features})")
        with self._lock:
            proc = self._proc if self._proc is not None else self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(_ROWS.pack(rows.shape[0]) + rows.tobytes())
                proc.stdin.flush()
                status, length = _REPLY.unpack(_read(proc.stdout, _REPLY.size))
                payload = _read(proc.stdout, length)
            except (OSError, EOFError):
                self._stop()
                raise PredictProcessDied("the predict process exited during the batch") from None
        if status != _OK:
            raise RuntimeError(payload.decode(errors="replace"))
        out: np.ndarray[Any, Any] = np.load(io.BytesIO(payload), allow_pickle=False)
        return out

    def close(self) -> None:
        """Close the child's stdin (it exits on it) and reap it; idempotent."""
        with self._lock:
            self._stop()

    def _start(self) -> subprocess.Popen[bytes]:
        # stderr is the worker's: the child's warnings and errors land in the server's log.
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        logger.info("predict process %d started for %s", self._proc.pid, self._argv[3])
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # the child is gone and the flush of stdin failed: nothing to do
                    pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # mid-predict: it would notice stdin only afterwards
            proc.kill()
            proc.wait()


def _read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"expected {n} bytes, got {len(data)}")
    return data


def main(argv: list[str]) -> int:
    """The child: load the version, then answer batches until stdin closes."""
    from fastserve.repository import load_estimator

    artifact, trusted_types = Path(argv[0]), json.loads(argv[1])
    # The protocol gets the real stdout; anything the model prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.nice(19)
    estimator = load_estimator(artifact, trusted_types)
    n_features = int(estimator.n_features_in_)
    requests = sys.stdin.buffer
    while True:
        try:
            (n_rows,) = _ROWS.unpack(_read(requests, _ROWS.size))
            rows = np.frombuffer(_read(requests, n_rows * n_features * 8), dtype=np.float64)
        except EOFError:
            return 0
        try:
            predictions = np.asarray(estimator.predict(rows.reshape(n_rows, n_features)))
            buffer = io.BytesIO()
            np.save(buffer, predictions, allow_pickle=False)
            status, payload = _OK, buffer.getvalue()
        except Exception as exc:  # the batch fails, the child goes on
            status, payload = _RAISED, f"{type(exc).__name__}: {exc}".encode()
        replies.write(_REPLY.pack(status, len(payload)) + payload)
        replies.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
