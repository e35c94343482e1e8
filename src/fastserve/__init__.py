"""fastserve: a production model server for scikit-learn models."""

from __future__ import annotations

from fastserve.errors import ConfigError, FastServeError
from fastserve.version import __version__

__all__ = ["ConfigError", "FastServeError", "__version__", "create_app"]


def __getattr__(name: str) -> object:
    # create_app pulls in Starlette and the compiled queue: only when asked for.
    if name == "create_app":
        from fastserve.app import create_app

        return create_app
    raise AttributeError(name)
