"""``fastserve serve | demo | deploy | status``: the command line.

Every settings field is a flag; ``serve`` exports the flags it was given as
``FASTSERVE_*`` variables, so the Granian worker processes it starts (which import
``fastserve.app:app`` afresh) see exactly the same settings. ``deploy`` and ``status`` act
on the same deployment state as the running server (its file, or Redis with ``--state-url``),
without HTTP: every worker follows an action within about 50 ms.
"""

from __future__ import annotations

import argparse
import copy
import getpass
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastserve import __version__
from fastserve.actions import ACTION_NAMES, make_action
from fastserve.config import (
    GROUPS,
    DeploySettings,
    RepositorySettings,
    Settings,
    add_arguments,
    default_demo_repository,
    env_name,
    export_arguments,
    resolve_repository,
)
from fastserve.errors import ConfigError, FastServeError, UnknownModel
from fastserve.repository import Repository
from fastserve.store import StateStore, open_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over HTTP (on Granian)")
    add_arguments(serve, *GROUPS)

    demo = commands.add_parser("demo", help="train and write the demo repository (digits v1 and v2)")
    demo.add_argument("directory", nargs="?", type=Path, default=None)

    deploy = commands.add_parser(
        "deploy",
        help="move a model's aliases (candidate, promote, rollback, clear_candidate), load and unload",
        description="Acts on the deployment state (file or Redis) directly. It checks that the version is in "
        "the repository, not that it loads: a version the server cannot load gets no traffic, and "
        "/status says why.",
    )
    deploy.add_argument("model")
    deploy.add_argument("action", choices=ACTION_NAMES)
    deploy.add_argument(
        "version", nargs="?", help="for candidate, load and unload (required) and rollback (optional)"
    )
    deploy.add_argument("--canary", type=float, default=0.0, help="share of traffic to the candidate, 0-1")
    deploy.add_argument("--shadow", action="store_true", help="mirror stable's traffic to the candidate")
    add_arguments(deploy, RepositorySettings, DeploySettings)

    status = commands.add_parser("status", help="the deployment state and the recent actions, as JSON")
    status.add_argument("--history", type=int, default=20, metavar="N", help="show the last N actions")
    add_arguments(status, RepositorySettings, DeploySettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args.directory or default_demo_repository())
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "status":
            return _status(args)
        return _serve(args)
    except (ConfigError, FastServeError) as exc:
        print(f"fastserve: {exc}", file=sys.stderr)
        return 1


def _offline_store(args: argparse.Namespace) -> tuple[StateStore, dict[str, list[str]]]:
    """The state the server uses, seeded like the server would, and the versions on disk."""
    export_arguments(args, RepositorySettings, DeploySettings)
    settings = Settings.from_env()
    repository = resolve_repository(settings.repository)
    on_disk = Repository(repository, settings.repository)
    discovered = on_disk.discover()
    store = open_store(settings)
    store.seed_loaded(on_disk.first_loads())
    store.seed({model: stable for model, (_, stable) in discovered.items() if stable}, _actor())
    return store, {model: versions for model, (versions, _) in discovered.items()}


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = str(os.getuid())
    return f"cli {user}@{socket.gethostname()}"


def _deploy(args: argparse.Namespace) -> int:
    fields = {"action": args.action}
    if args.action in ("candidate", "load", "unload") and args.version is None:
        raise ConfigError(f"{args.action} needs a VERSION")
    if args.action == "candidate":
        fields |= {"version": args.version, "canary": args.canary, "shadow": args.shadow}
    elif args.action in ("load", "unload"):
        fields["version"] = args.version
    elif args.version is not None and args.action != "rollback":
        raise ConfigError(f"{args.action} takes no VERSION")
    elif args.version is not None:
        fields["version"] = args.version
    # Checked by the same rules as an HTTP body (canary 0-1, version names).
    action = make_action(fields)
    store, versions = _offline_store(args)
    if args.model not in versions:
        raise UnknownModel(f"no model named {args.model!r} in the repository")
    # The feature counts are unknown without loading the models; the server checks them.
    servable: dict[str, int | None] = dict.fromkeys(versions[args.model])
    deployment = store.act(args.model, action, servable, _actor(), on_disk=versions[args.model])
    print(json.dumps(deployment.as_dict(), indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    store, versions = _offline_store(args)
    deployments = store.deployments()
    state = {
        "models": {
            model: {**deployments[model].as_dict(), "versions": versions[model]}
            for model in versions
            if model in deployments
        },
        "deploy_log": [entry.as_dict() for entry in store.history(args.history)],
    }
    print(json.dumps(state, indent=2))
    return 0


def _demo(directory: Path) -> int:
    from fastserve.demo import write_demo_repository

    print(f"fastserve: training the demo models into {directory} ...", file=sys.stderr)
    write_demo_repository(directory)
    print(f"fastserve: wrote {directory}/digits/v1 (RandomForest) and v2 (HistGradientBoosting)")
    if (directory / "churn").is_dir():
        print(f"fastserve: wrote {directory}/churn/v1 (a Pipeline on a mixed-type DataFrame)")
    else:
        print("fastserve: no churn model (a pandas pipeline): pip install 'fastserve[pandas]'")
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
    # Each run gets a fresh, private directory for the workers' metric files: files left by
    # an earlier run would be added to this one's counts.
    metrics_dir = tempfile.mkdtemp(prefix="fastserve-metrics-") if settings.metrics.metrics else None
    if metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        Granian(
            "fastserve.app:app",
            address=server.host,
            port=server.port,
            interface=Interfaces.ASGI,
            workers=server.workers,
            # A worker that dies (OOM killer, a crashing model) is replaced; its counts stay
            # in the metric totals, because its files stay in the directory.
            respawn_failed_workers=True,
            log_access=False,
            log_dictconfig=_logging_config(),
        ).serve()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _logging_config() -> dict[str, Any]:
    """Granian's logging, plus fastserve's: deploy actions at INFO, and the shadow
    disagreement samples as bare JSON lines that a log shipper can parse."""
    from granian.log import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    # Granian merges this dict shallowly: it has to carry Granian's own loggers too.
    config["loggers"]["fastserve"] = {"handlers": ["console"], "level": "INFO", "propagate": False}
    config["loggers"]["fastserve.shadow"] = {"handlers": ["access"], "level": "INFO", "propagate": False}
    return config


if __name__ == "__main__":
    sys.exit(main())
