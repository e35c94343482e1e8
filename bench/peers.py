"""Peers that pin their own dependencies: each gets a virtual environment of its own.

MLServer pins FastAPI, Starlette, uvicorn and pydantic to versions the main environment does
not have, so it cannot share it. Its environment gets the peer's packages plus the main
environment's scikit-learn, numpy and pandas, at the same versions: the model files the bench
writes (pickles, for MLServer's scikit-learn runtime) must load there as they were fitted here.

    python -m bench.peers install mlserver    # about a minute on a warm pip cache
    python -m bench.peers status

The environments live in ``bench/.venvs/`` (git-ignored), or in ``$FASTSERVE_BENCH_VENVS``:
CI points it outside the checkout, so that a fresh clone reuses the environment it made before.
An environment is reused only while its stamp names the same requirements; any change of
version here or in the main environment makes a new one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# uvloop 0.22's policy makes no loop on get_event_loop(): MLServer 1.7's inference worker
# process dies at start on it (SeldonIO/MLServer#2286).
PEERS: dict[str, tuple[str, ...]] = {"mlserver": ("mlserver", "mlserver-sklearn", "uvloop<0.22")}
# What a model file needs to load in the peer as it was fitted here: the same versions.
SHARED = ("scikit-learn", "numpy", "pandas")
STAMP = "fastserve-bench-requirements.json"
INSTALL_TIMEOUT_S = 900


def venvs_dir() -> Path:
    return Path(os.environ.get("FASTSERVE_BENCH_VENVS") or BENCH_DIR / ".venvs")


def requirements(peer: str) -> list[str]:
    """The peer's packages and this environment's versions of ``SHARED``."""
    pinned = []
    for name in SHARED:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)  # pandas, where the main environment lacks it
    return [*PEERS[peer], *pinned]


def missing(peer: str) -> str:
    return (
        f"{peer}'s environment is not installed (or is stale): python -m bench.peers install {peer} "
        f"(into {venvs_dir() / peer})"
    )


def executable(peer: str, command: str) -> Path | None:
    """``command`` in the peer's environment, or None while it is missing or stale."""
    venv = venvs_dir() / peer
    path = venv / "bin" / command
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return path if stamp == requirements(peer) and path.exists() else None


def install(peer: str, timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """Make the peer's environment (or keep it, when its stamp matches); its directory.

    The stamp is written last, so an interrupted install never leaves an environment that
    looks ready. It is built in place: a venv's scripts name its path, it cannot be moved.
    ``--no-compile`` saves a third of the time: Python compiles what it imports on first use.
    """
    venv = venvs_dir() / peer
    if executable(peer, "python") is not None:
        return venv
    wanted = requirements(peer)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    subprocess.run([*pip, *wanted], check=True, timeout=timeout_s)
    (venv / STAMP).write_text(json.dumps(wanted))
    return venv


def versions(peer: str) -> dict[str, str]:
    """The versions installed in the peer's environment, of its packages and ``SHARED``."""
    python = executable(peer, "python")
    if python is None:
        return {}
    names = [r.split("<")[0].split("=")[0] for r in PEERS[peer]] + list(SHARED)
    code = (
        "import json, sys\nfrom importlib import metadata\n"
        "print(json.dumps({n: metadata.version(n) for n in sys.argv[1:]}))"
    )
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, timeout=60)
    found: dict[str, str] = json.loads(done.stdout) if done.returncode == 0 else {}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("install", "status"))
    parser.add_argument("peers", nargs="*", default=list(PEERS))
    parser.add_argument("--timeout", type=float, default=INSTALL_TIMEOUT_S, help="seconds for pip")
    args = parser.parse_args(argv)
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    status: dict[str, Any] = {}
    for peer in args.peers:
        if args.action == "install":
            try:
                install(peer, args.timeout)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"bench.peers: could not install {peer}: {exc}", file=sys.stderr)
                return 1
        status[peer] = versions(peer) or missing(peer)
    print(json.dumps(status, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
