"""The servers fastserve is compared with, the HTTP ceiling and the refusal floor, each in its own process."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def serve_on_granian(target: str, description: str, default_port: int) -> None:
    """Run the ASGI app ``target`` (``module:attribute``) on Granian, as fastserve runs:
    ``--host``/``--port``/``--workers`` from the command line, access logs off."""
    from granian import Granian
    from granian.constants import Interfaces

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", str(default_port))))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    Granian(
        target,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        log_access=False,
        working_dir=Path(__file__).resolve().parents[2],  # the repository root
    ).serve()
