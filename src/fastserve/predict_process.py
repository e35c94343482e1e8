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
row count (8 bytes, little-endian), the outputs asked for (one byte, a bit per name of
``outputs.OUTPUTS``) and the rows. Over its stdout: a status byte (0: the outputs follow, in
``OUTPUTS`` order; 1: the model raised, its message follows), then each payload as its length
(8 bytes) and its bytes. The child exits when its stdin closes: when the worker closes it, and when
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
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from fastserve.outputs import OUTPUTS

logger = logging.getLogger(__name__)

_REQUEST = struct.Struct("<qB")  # rows, outputs asked for (a bit per name of OUTPUTS)
_REPLY = struct.Struct("<Bq")  # status, first payload's length
_LENGTH = struct.Struct("<q")
_OK, _RAISED = 0, 1


class PredictProcessDied(RuntimeError):
    """The child exited or its pipes broke mid-batch; the next call starts a new one."""


class PredictProcess:
    """``estimator.predict`` (and the version's other outputs) for one version, answered by a
    child process at nice 19.

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
        return self.compute(X, ("predict",))["predict"]

    def compute(self, X: np.ndarray[Any, Any], names: Collection[str]) -> dict[str, np.ndarray[Any, Any]]:
        """The outputs ``names`` (of ``outputs.OUTPUTS``) of the rows ``X``, computed by the child."""
        rows = np.ascontiguousarray(X, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self._n_features:
            raise ValueError(f"X has shape {rows.shape}, expected (n, {self._n_features})")
        asked = [name for name in OUTPUTS if name in names]
        mask = sum(1 << OUTPUTS.index(name) for name in asked)
        with self._lock:
            proc = self._proc if self._proc is not None else self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(_REQUEST.pack(rows.shape[0], mask) + rows.tobytes())
                proc.stdin.flush()
                status, length = _REPLY.unpack(_read(proc.stdout, _REPLY.size))
                payloads = [_read(proc.stdout, length)]
                if status == _OK:
                    for _ in asked[1:]:
                        (length,) = _LENGTH.unpack(_read(proc.stdout, _LENGTH.size))
                        payloads.append(_read(proc.stdout, length))
            except (OSError, EOFError):
                self._stop()
                raise PredictProcessDied("the predict process exited during the batch") from None
        if status != _OK:
            raise RuntimeError(payloads[0].decode(errors="replace"))
        return {
            name: np.load(io.BytesIO(payload), allow_pickle=False)
            for name, payload in zip(asked, payloads, strict=True)
        }

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
            n_rows, mask = _REQUEST.unpack(_read(requests, _REQUEST.size))
            rows = np.frombuffer(_read(requests, n_rows * n_features * 8), dtype=np.float64)
        except EOFError:
            return 0
        names = [name for bit, name in enumerate(OUTPUTS) if mask & (1 << bit)]
        try:
            payloads = []
            for name in names:
                buffer = io.BytesIO()
                values = np.asarray(getattr(estimator, name)(rows.reshape(n_rows, n_features)))
                np.save(buffer, values, allow_pickle=False)
                payloads.append(buffer.getvalue())
            reply = _REPLY.pack(_OK, len(payloads[0])) + payloads[0]
            reply += b"".join(_LENGTH.pack(len(payload)) + payload for payload in payloads[1:])
        except Exception as exc:  # the batch fails, the child goes on
            message = f"{type(exc).__name__}: {exc}".encode()
            reply = _REPLY.pack(_RAISED, len(message)) + message
        replies.write(reply)
        replies.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
