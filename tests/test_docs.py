"""The docs' lists held against the code: settings, metrics, error codes, routes and links.

Each page lists what the code has in a markdown table; these tests parse the tables and compare
them with the code, so a setting, metric, error or route added, renamed or removed fails here
until the page says so too. No server is started.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from fastserve.app import create_app
from fastserve.config import (
    GROUPS,
    BatchSettings,
    DeploySettings,
    LimitSettings,
    RepositorySettings,
    Settings,
    add_arguments,
    env_name,
)
from fastserve.errors import FastServeError
from fastserve.metrics import Metrics
from fastserve.openapi import document

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages whose relative links must lead somewhere.
PAGES = [
    ROOT / "README.md",
    *sorted(DOCS.glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "bench" / "results" / "history.md",
]

# How docs/configuration.md marks a setting that has no flag.
ENV_ONLY = "— (environment only)"
NONE = "—"
# How it writes an empty default.
EMPTY = '""'
# The model.toml table that may override each settings group (registry: [batching], [limits]).
MODEL_TOML = {BatchSettings: "`[batching]`", LimitSettings: "`[limits]`"}

Row = dict[str, str]


# -- reading the pages -----------------------------------------------------------------------------


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def tables(path: Path, *header: str) -> list[Row]:
    """The rows of every table in ``path`` whose header is exactly ``header``, as dicts."""
    rows: list[Row] = []
    lines = _without_code_blocks(path.read_text()).splitlines()
    for i, line in enumerate(lines[:-1]):
        if not line.startswith("|") or _cells(line) != list(header):
            continue
        assert re.fullmatch(r"\|([-: ]+\|)+", lines[i + 1].strip()), (
            f"{path.name}: no separator under {header}"
        )
        for body in lines[i + 2 :]:
            if not body.startswith("|"):
                break
            cells = _cells(body)
            assert len(cells) == len(header), f"{path.name}: row {body!r} has {len(cells)} cells"
            rows.append(dict(zip(header, cells, strict=True)))
    assert rows, f"{path.name} has no table headed {' | '.join(header)}"
    return rows


def code(cell: str) -> list[str]:
    """The `code spans` of a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def single_code(cell: str) -> str:
    spans = code(cell)
    assert len(spans) == 1, f"expected one `code` span in {cell!r}"
    return spans[0]


# -- configuration ---------------------------------------------------------------------------------


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{f.name} has no default"
    return f.default_factory()


def rendered_default(f: dataclasses.Field[Any]) -> str:
    """A default as docs/configuration.md writes it: as you would set its environment variable.

    Booleans are ``on``/``off``, lists comma-separated, numbers as Python prints them, strings as
    they are, and an empty value ``""``; all in one code span.
    """
    value = _default(f)
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, tuple):
        text = ",".join(value)
    else:
        text = str(value)
    return f"`{text or EMPTY}`"


def expected_flags(f: dataclasses.Field[Any]) -> list[str] | None:
    """The flags of a setting, or None for an environment-only one."""
    if f.metadata.get("env_only"):
        return None
    flag = "--" + f.name.replace("_", "-")
    if isinstance(_default(f), bool):
        return [flag, "--no-" + flag[2:]]
    return [flag]


def settings_rows() -> dict[str, Row]:
    rows = tables(DOCS / "configuration.md", "flag", "env", "default", "model.toml", "meaning")
    by_env = {single_code(row["env"]): row for row in rows}
    duplicates = [env for env, n in Counter(single_code(row["env"]) for row in rows).items() if n > 1]
    assert not duplicates, f"listed twice in docs/configuration.md: {duplicates}"
    return by_env


def test_configuration_lists_every_setting_exactly() -> None:
    documented = set(settings_rows())
    actual = {env_name(f.name) for group in GROUPS for f in dataclasses.fields(group)}
    assert documented - actual == set(), "docs/configuration.md lists settings the code does not have"
    assert actual - documented == set(), "settings missing from docs/configuration.md"


FIELDS = [(group, f) for group in GROUPS for f in dataclasses.fields(group)]


@pytest.mark.parametrize("group, field", FIELDS, ids=[f.name for _, f in FIELDS])
def test_configuration_row_holds_the_real_flag_default_and_model_toml(
    group: type[Any], field: dataclasses.Field[Any]
) -> None:
    row = settings_rows().get(env_name(field.name))
    assert row is not None, f"{env_name(field.name)} is missing from docs/configuration.md"
    flags = expected_flags(field)
    if flags is None:
        assert row["flag"] == ENV_ONLY
    else:
        assert code(row["flag"]) == flags
    assert row["default"] == rendered_default(field)
    assert row["model.toml"] == MODEL_TOML.get(group, NONE)
    assert row["meaning"], f"{field.name} has no meaning in docs/configuration.md"


def test_configuration_flags_are_the_ones_the_cli_takes() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, *GROUPS)
    registered = {option for action in parser._actions for option in action.option_strings}
    documented = {flag for row in settings_rows().values() for flag in code(row["flag"])}
    assert documented == registered


# -- metrics ---------------------------------------------------------------------------------------


def exposed_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric GET /metrics exposes: name -> (type, label names), without a server."""
    metrics = Metrics()
    if metrics.directory is not None:
        pytest.skip("PROMETHEUS_MULTIPROC_DIR was set when prometheus_client was imported")
    # One row of deployment state, so that the state's two families carry labelled samples.
    text = metrics.render([("m", "v1", "stable", True)], {("m", "promote"): 1}).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    labels: dict[str, tuple[str, ...]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name] = tuple(sorted(sample.labels))
    for value in vars(metrics).values():  # the per-process metrics have no samples yet
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            labels[name] = tuple(sorted(value._labelnames))
    missing = set(types) - set(labels)
    assert not missing, f"found no label names for {missing}"
    return {name: (kind, labels[name]) for name, kind in types.items()}


def test_metrics_page_lists_exactly_what_metrics_exposes() -> None:
    rows = tables(DOCS / "metrics.md", "metric", "type", "labels", "what")
    names = [single_code(row["metric"]) for row in rows]
    assert len(names) == len(set(names)), "a metric is listed twice in docs/metrics.md"
    documented = {
        single_code(row["metric"]): (row["type"], tuple(sorted(x.strip() for x in row["labels"].split(","))))
        for row in rows
    }
    exposed = exposed_metrics()
    assert {"fastserve_model_info", "fastserve_deploy_actions_total"} <= set(exposed)
    assert documented == exposed


# -- errors ----------------------------------------------------------------------------------------


def error_codes() -> list[tuple[int, str]]:
    """(status, code) of FastServeError and of every fastserve subclass, however deep."""
    found, todo = [FastServeError], [FastServeError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found and sub.__module__.startswith("fastserve"):
                found.append(sub)
                todo.append(sub)
    return [(cls.status, cls.code) for cls in found]


def test_http_api_error_table_lists_every_error_code() -> None:
    rows = tables(DOCS / "http-api.md", "status", "code", "when")
    documented = [(int(row["status"]), single_code(row["code"])) for row in rows]
    assert len(documented) == len(set(documented)), "an error is listed twice in docs/http-api.md"
    assert all(row["when"] for row in rows)
    actual = error_codes()
    assert len(actual) == len(set(actual)), "two error classes share a status and a code"
    assert sorted(documented) == sorted(actual)


# -- routes ----------------------------------------------------------------------------------------


def starlette_of(app: object) -> Starlette:
    """The Starlette application inside what create_app returns (it wraps one)."""
    if isinstance(app, Starlette):
        return app
    for value in vars(app).values():
        if isinstance(value, Starlette):
            return value
    raise AssertionError(f"no Starlette application in {type(app).__name__}")


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("building the app touched the network")


def test_http_api_route_table_lists_every_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, _no_network)
    settings = Settings(
        repository=RepositorySettings(repository=str(tmp_path / "repository")),
        deploy=DeploySettings(state_path=str(tmp_path / "state" / "deployments.sqlite")),
    )
    app = create_app(settings)
    # The lifespan, which loads the models and opens the state, runs only under a server.
    assert list(tmp_path.iterdir()) == []

    actual = []
    for route in starlette_of(app).routes:
        assert isinstance(route, Route), f"not a plain route: {route!r}"
        assert route.methods
        actual += [f"{method} {route.path}" for method in sorted(route.methods - {"HEAD"})]
    documented = [single_code(row["route"]) for row in tables(DOCS / "http-api.md", "route", "what")]
    assert sorted(documented) == sorted(actual)


def test_openapi_documents_every_route_and_only_real_error_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        repository=RepositorySettings(repository=str(tmp_path / "repository")),
        deploy=DeploySettings(state_path=str(tmp_path / "state" / "deployments.sqlite")),
    )
    actual = {
        (method.lower(), route.path)
        for route in starlette_of(create_app(settings)).routes
        if isinstance(route, Route) and route.methods
        for method in route.methods - {"HEAD"}
    }
    spec = document()
    documented = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert documented == actual
    codes = {code for _, code in error_codes()}
    for item in spec["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    error = media["schema"].get("properties", {}).get("error")
                    if error is not None and error["type"] == "object":  # V2's is a string
                        assert set(error["properties"]["code"]["enum"]) <= codes, status


# -- the reliability record ------------------------------------------------------------------------


def test_the_reliability_record_names_only_tests_that_exist() -> None:
    text = (DOCS / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 20
    sources = {path.name: path.read_text() for path in (ROOT / "tests").glob("test_*.py")}
    for module, test in named:
        assert f"def {test}(" in sources[module], f"docs/reliability.md names {module}::{test}"
    # `::test_x` right after a named test is another test of the same module.
    for module, rest in re.findall(r"`(test_\w+\.py)::test_\w+`((?:, `::test_\w+`)+)", text):
        for test in re.findall(r"`::(test_\w+)`", rest):
            assert f"def {test}(" in sources[module], f"docs/reliability.md names {module}::{test}"


# -- links -----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _without_code_blocks(path.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    text = _without_code_blocks(page.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, f"{page.name} links nowhere"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.relative_to(ROOT)}: {link} leads nowhere"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.relative_to(ROOT)}: no heading #{anchor} in {target}"


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    linked = {Path(link).name for link in re.findall(r"\]\(docs/([^)#\s]+)", readme)}
    assert {page.name for page in DOCS.glob("*.md")} <= linked


# -- the README's commands -------------------------------------------------------------------------


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    readme = (ROOT / "README.md").read_text().splitlines()
    assert ci[-1] in readme, "the README's test command must be .ci/run's last line, as is"


def test_readme_stays_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 230, "depth belongs in docs/, one page per question"
