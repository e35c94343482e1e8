"""``fastserve serve | demo``: the command line.

Every settings field is a flag; ``serve`` exports the flags it was given as
``FASTSERVE_*`` variables, so the Granian worker processes it starts (which import
``fastserve.app:app`` afresh) see exactly the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastserve import __version__
from fastserve.config import (
    GROUPS,
    Settings,
    add_arguments,
    default_demo_repository,
    env_name,
    export_arguments,
)
from fastserve.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over HTTP (on Granian)")
    add_arguments(serve, *GROUPS)

    demo = commands.add_parser("demo", help="train and write the demo repository (digits v1 and v2)")
    demo.add_argument("directory", nargs="?", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args.directory or default_demo_repository())
        return _serve(args)
    except ConfigError as exc:
        print(f"fastserve: {exc}", file=sys.stderr)
        return 1


def _demo(directory: Path) -> int:
    from fastserve.demo import write_demo_repository

    print(f"fastserve: training the demo models into {directory} ...", file=sys.stderr)
    write_demo_repository(directory)
    print(f"fastserve: wrote {directory}/digits/v1 (RandomForest) and v2 (HistGradientBoosting)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    export_arguments(args, *GROUPS)
    settings = Settings.from_env()
    if settings.repository.repository:
        repository = Path(settings.repository.repository).expanduser()
        if not repository.is_dir():
            raise ConfigError(f"{env_name('repository')}: {str(repository)!r} is not a directory")
    else:
        repository = default_demo_repository()
        if not (repository / "digits").is_dir():
            print(f"fastserve: first run, writing the demo repository to {repository}", file=sys.stderr)
            _demo(repository)
    # Workers resolve the same absolute path whatever their working directory.
    os.environ[env_name("repository")] = str(repository.resolve())

    from granian import Granian
    from granian.constants import Interfaces

    server = settings.server
    print(
        f"fastserve: serving {repository} on http://{server.host}:{server.port} "
        f"with {server.workers} worker(s)",
        file=sys.stderr,
    )
    Granian(
        "fastserve.app:app",
        address=server.host,
        port=server.port,
        interface=Interfaces.ASGI,
        workers=server.workers,
        log_access=False,
    ).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
