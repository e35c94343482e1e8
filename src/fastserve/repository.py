"""The model repository on disk: which models and versions are there, and what may be loaded.

Layout: ``<root>/<model>/<version>/model.skops`` (or ``model.joblib`` in a trusted
repository), plus an optional ``<root>/<model>/model.toml``. Only real files under the
root's real path are opened, so a symlink cannot lead a load outside it; skops loads only
its default types and the ones named here or in the configuration. Nothing here decides how
a version is served: that is the registry's, one layer up.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastserve.config import RepositorySettings
from fastserve.errors import ConfigError

# skops refuses any type outside its defaults and this list: the tree structures of
# scikit-learn's own ensembles, which its defaults leave out only because they are
# compiled types. Anything else must be named in the server's configuration.
TRUSTED_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_TOML_KEYS = {"stable", "batching", "limits", "input", "load"}


def version_key(version: str) -> tuple[Any, ...]:
    """Natural order: v2 < v10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


class Repository:
    """A model repository's directory, read under its trust rules; it never changes anything."""

    def __init__(self, root: Path, settings: RepositorySettings) -> None:
        self.root = root.resolve()
        self.settings = settings
        self.trusted_types = TRUSTED_TYPES + tuple(settings.trusted_types)

    def model_dirs(self) -> list[Path]:
        """Every model directory, by name."""
        if not self.root.is_dir():
            raise ConfigError(f"FASTSERVE_REPOSITORY: {self.root.name!r} is not a directory")
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and _NAME.match(d.name)]

    def model_dir(self, model: str) -> Path:
        """The directory of ``model``, by a name the repository allows and that is there."""
        path = self.root / model
        if not _NAME.match(model) or not path.is_dir():
            raise FileNotFoundError(f"no model directory {model!r} in the repository")
        return path

    def version_dir(self, model: str, version: str) -> Path:
        """The directory of one version, by names the repository allows and that are there."""
        path = self.model_dir(model) / version
        if not _NAME.match(version) or not path.is_dir():
            raise FileNotFoundError(f"no version directory {model}/{version} in the repository")
        return path

    def model_toml(self, model_dir: Path) -> dict[str, Any]:
        """A model's ``model.toml``, checked for its keys and their kinds; ``{}`` without one."""
        path = model_dir / "model.toml"
        where = f"{model_dir.name}/model.toml"
        if not path.exists():
            return {}
        if not path.resolve().is_relative_to(self.root) or not path.is_file():
            raise ConfigError(f"{where} resolves outside the repository")
        try:
            config = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        unknown = set(config) - _MODEL_TOML_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(config.get("stable", ""), str):
            raise ConfigError(f"{where}: stable must be a version name in quotes")
        for table in ("batching", "limits", "input"):
            if not isinstance(config.get(table, {}), dict):
                raise ConfigError(f"{where}: {table} must be a table ([{table}])")
        load = config.get("load", [])
        if not isinstance(load, list) or not all(isinstance(v, str) for v in load):
            raise ConfigError(f"{where}: load must be a list of version names in quotes")
        return config

    def first_loads(self) -> dict[str, list[str]]:
        """The versions each model loads on its very first start: ``model.toml``'s ``load``
        list, else every version with a model file."""
        loads = {}
        for model_dir in self.model_dirs():
            listed = self.model_toml(model_dir).get("load")
            on_disk = [d.name for d in version_dirs(model_dir) if self._has_artifact(d)]
            loads[model_dir.name] = [v for v in on_disk if v in listed] if listed is not None else on_disk
        return loads

    def discover(self) -> dict[str, tuple[list[str], str | None]]:
        """Each model's versions that have an artifact, and the stable the repository asks for,
        without loading anything (for the CLI, which acts on the deployment state offline)."""
        found = {}
        for model_dir in self.model_dirs():
            stable = self.model_toml(model_dir).get("stable")
            versions = [d.name for d in version_dirs(model_dir) if self._has_artifact(d)]
            if stable is None and versions:
                stable = versions[-1]
            found[model_dir.name] = (versions, stable)
        return found

    def artifact(self, version_dir: Path) -> Path:
        """The real path of the file a version loads from, or why there is none it may load."""
        for path in self._artifact_paths(version_dir):
            if path.exists() or path.is_symlink():
                real = path.resolve()
                if not real.is_relative_to(self.root) or not real.is_file():
                    raise PermissionError(f"{path.name} resolves outside the repository")
                return real
        if (version_dir / "model.joblib").exists():
            raise PermissionError(
                "model.joblib is only loaded from a trusted repository (FASTSERVE_TRUSTED_REPOSITORY=1)"
            )
        raise FileNotFoundError("no model.skops in the version directory")

    def describe(self, exc: BaseException) -> str:
        """A load failure's reason for /status: type and message, never a traceback or a path."""
        return f"{type(exc).__name__}: {exc}".replace(str(self.root), "<repository>")

    def _has_artifact(self, version_dir: Path) -> bool:
        return any(path.exists() for path in self._artifact_paths(version_dir))

    def _artifact_paths(self, version_dir: Path) -> list[Path]:
        """The files a version may be loaded from, in order of preference."""
        paths = [version_dir / "model.skops"]
        if self.settings.trusted_repository:
            paths.append(version_dir / "model.joblib")
        return paths


def version_dirs(model_dir: Path) -> list[Path]:
    """A model's version directories, in natural order (oldest first)."""
    found = [d for d in model_dir.iterdir() if d.is_dir() and _NAME.match(d.name)]
    return sorted(found, key=lambda d: version_key(d.name))


def load_estimator(artifact: Path, trusted_types: Sequence[str]) -> Any:
    """The estimator in ``artifact``: skops with ``trusted_types``, or joblib, whose file only a
    trusted repository may hold (``Repository.artifact`` decides which file is loaded)."""
    if artifact.suffix == ".skops":
        import skops.io as sio

        return sio.load(artifact, trusted=list(trusted_types))
    import joblib

    return joblib.load(artifact)
