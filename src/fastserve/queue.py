"""The ring queue fastserve runs: the compiled one, or the pure-Python reference.

``FASTSERVE_NO_EXTENSIONS=1`` picks the Python queue (for debugging, or a platform with no
compiler); otherwise the compiled extension is required, so a broken build fails loudly at
import instead of silently running the slow path.
"""

from __future__ import annotations

import os

from fastserve._queue_py import FULL, default_capacity_rows

if os.environ.get("FASTSERVE_NO_EXTENSIONS") == "1":
    from fastserve._queue_py import Batch, RingQueue
else:
    from fastserve._queue import Batch, RingQueue  # type: ignore[assignment]

COMPILED: bool = RingQueue.__module__ == "fastserve._queue"

__all__ = ["COMPILED", "FULL", "Batch", "RingQueue", "default_capacity_rows"]
