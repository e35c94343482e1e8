"""config: settings from the environment, model.toml overrides, CLI flags exported to the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from fastserve.config import (
    GROUPS,
    BatchSettings,
    DeploySettings,
    LimitSettings,
    RepositorySettings,
    ServerSettings,
    Settings,
    add_arguments,
    env_name,
    export_arguments,
    override,
)
from fastserve.errors import ConfigError

ALL_FIELDS = [(group, f) for group in GROUPS for f in dataclasses.fields(group)]
# Secrets have an env var and no flag: a flag's value is visible to every user of `ps`.
FLAG_FIELDS = [(group, f) for group, f in ALL_FIELDS if not f.metadata.get("env_only")]
NUMERIC_FIELDS = [(group, f) for group, f in ALL_FIELDS if f.type in ("int", "float")]
WHERE = "iris/model.toml"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FASTSERVE_* variable set, and every one that a test writes is removed afterwards."""
    for _, f in ALL_FIELDS:
        monkeypatch.setenv(env_name(f.name), "")  # recorded, so teardown restores the original
        monkeypatch.delenv(env_name(f.name))
    return monkeypatch


def settings_env() -> set[str]:
    """The settings variables set now (others, like FASTSERVE_NO_EXTENSIONS, are not settings)."""
    return {env_name(f.name) for _, f in ALL_FIELDS} & set(os.environ)


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="fastserve")
    add_arguments(built, *GROUPS)
    return built


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_are_the_designs() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.workers == 1
    assert settings.repository == RepositorySettings(
        repository="", trusted_repository=False, trusted_types=()
    )
    assert settings.limits.max_body_bytes == 1024 * 1024
    assert settings.limits.max_rows_per_request == 1024
    assert settings.batching.max_batch_rows == 64
    assert settings.batching.batch_window_ms == 2.0
    assert settings.batching.max_queue_depth == 1024
    assert settings.batching.queue_timeout_ms == 1000.0


def test_from_env_ignores_unrelated_variables() -> None:
    environ = {"PATH": "/usr/bin", "FASTSERVE": "x", "FASTSERVE_NOT_A_SETTING": "7", "fastserve_port": "1"}
    assert Settings.from_env(environ) == Settings()


def test_from_env_reads_os_environ_by_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FASTSERVE_MAX_BATCH_ROWS", "16")
    clean_env.setenv("FASTSERVE_HOST", "0.0.0.0")
    settings = Settings.from_env()
    assert settings.batching.max_batch_rows == 16
    assert settings.server.host == "0.0.0.0"


def test_env_names_are_prefixed_upper_case_field_names() -> None:
    assert env_name("max_batch_rows") == "FASTSERVE_MAX_BATCH_ROWS"


def test_field_names_are_unique_across_groups() -> None:
    # One env var and one flag per field: two groups sharing a name would share both.
    names = [f.name for _, f in ALL_FIELDS]
    assert len(names) == len(set(names))


# --- parsing each kind --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "group", "attribute", "expected"),
    [
        ("FASTSERVE_HOST", "0.0.0.0", "server", "host", "0.0.0.0"),
        ("FASTSERVE_PORT", "9000", "server", "port", 9000),
        ("FASTSERVE_PORT", " 9001 ", "server", "port", 9001),
        ("FASTSERVE_WORKERS", "4", "server", "workers", 4),
        ("FASTSERVE_REPOSITORY", "/srv/models", "repository", "repository", "/srv/models"),
        ("FASTSERVE_TRUSTED_TYPES", "a.B", "repository", "trusted_types", ("a.B",)),
        ("FASTSERVE_TRUSTED_TYPES", " a.B , ,c.D,", "repository", "trusted_types", ("a.B", "c.D")),
        ("FASTSERVE_TRUSTED_TYPES", "", "repository", "trusted_types", ()),
        ("FASTSERVE_MAX_BATCH_ROWS", "8", "batching", "max_batch_rows", 8),
        ("FASTSERVE_BATCH_WINDOW_MS", "0.5", "batching", "batch_window_ms", 0.5),
        ("FASTSERVE_BATCH_WINDOW_MS", "3", "batching", "batch_window_ms", 3.0),
        ("FASTSERVE_BATCH_WINDOW_MS", "0", "batching", "batch_window_ms", 0.0),
        ("FASTSERVE_MAX_QUEUE_DEPTH", "4096", "batching", "max_queue_depth", 4096),
        ("FASTSERVE_QUEUE_TIMEOUT_MS", "250.5", "batching", "queue_timeout_ms", 250.5),
        ("FASTSERVE_MAX_BODY_BYTES", "65536", "limits", "max_body_bytes", 65536),
        ("FASTSERVE_MAX_ROWS_PER_REQUEST", "1", "limits", "max_rows_per_request", 1),
        ("FASTSERVE_BODY_TIMEOUT_MS", "1e3", "limits", "body_timeout_ms", 1000.0),
        ("FASTSERVE_PREDICT_PROCESS", "on", "repository", "predict_process", "on"),
        ("FASTSERVE_PREDICT_PROCESS", " Off ", "repository", "predict_process", "off"),
    ],
)
def test_from_env_parses_each_field(
    variable: str, raw: str, group: str, attribute: str, expected: object
) -> None:
    settings = Settings.from_env({variable: raw})
    value = getattr(getattr(settings, group), attribute)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_from_env_true_bools(raw: str) -> None:
    assert Settings.from_env({"FASTSERVE_TRUSTED_REPOSITORY": raw}).repository.trusted_repository is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_from_env_false_bools(raw: str) -> None:
    assert Settings.from_env({"FASTSERVE_TRUSTED_REPOSITORY": raw}).repository.trusted_repository is False


@pytest.mark.parametrize(
    ("variable", "raw", "kind"),
    [
        ("FASTSERVE_PORT", "eighty", "int"),
        ("FASTSERVE_WORKERS", "2.0", "int"),
        ("FASTSERVE_MAX_BATCH_ROWS", "8.5", "int"),
        ("FASTSERVE_MAX_BATCH_ROWS", "", "int"),
        ("FASTSERVE_MAX_BODY_BYTES", "1MiB", "int"),
        ("FASTSERVE_BATCH_WINDOW_MS", "fast", "float"),
        ("FASTSERVE_QUEUE_TIMEOUT_MS", "1s", "float"),
        ("FASTSERVE_TRUSTED_REPOSITORY", "maybe", "bool"),
        ("FASTSERVE_TRUSTED_REPOSITORY", "2", "bool"),
    ],
)
def test_from_env_invalid_value_names_the_variable(variable: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}={raw!r} is not a valid {kind}$"):
        Settings.from_env({variable: raw})


@pytest.mark.parametrize("raw", ["1", "true", "sometimes", "o n", ""])
def test_a_choice_outside_its_list_names_the_variable_and_the_choices(raw: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"^FASTSERVE_PREDICT_PROCESS={raw!r} must be one of auto, on, off$"
    ):
        Settings.from_env({"FASTSERVE_PREDICT_PROCESS": raw})


def test_a_choice_flag_refuses_what_is_not_a_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--predict-process", "sometimes"])
    assert "--predict-process: invalid choice: 'sometimes'" in capsys.readouterr().err


LOWEST = {"batch_window_ms": 0, "port": 0}
OUT_OF_RANGE = [
    (env_name(f.name), raw, LOWEST.get(f.name, 1))
    for _, f in NUMERIC_FIELDS
    for raw in ("0", "-1")
    if float(raw) < LOWEST.get(f.name, 1)
]


@pytest.mark.parametrize(("variable", "raw", "lowest"), OUT_OF_RANGE)
def test_from_env_refuses_zero_and_negative_limits(variable: str, raw: str, lowest: int) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}={raw}(\.0)? must be at least {lowest}$"):
        Settings.from_env({variable: raw})


def test_every_numeric_limit_is_range_checked() -> None:
    checked = {variable for variable, _, _ in OUT_OF_RANGE}
    assert checked == {env_name(f.name) for _, f in NUMERIC_FIELDS}


def test_from_env_allows_no_batch_window() -> None:
    assert Settings.from_env({"FASTSERVE_BATCH_WINDOW_MS": "0"}).batching.batch_window_ms == 0.0


def test_from_env_refuses_negative_batch_window() -> None:
    with pytest.raises(ConfigError, match=r"^FASTSERVE_BATCH_WINDOW_MS=-0.5 must be at least 0$"):
        Settings.from_env({"FASTSERVE_BATCH_WINDOW_MS": "-0.5"})


@pytest.mark.parametrize("variable", [env_name(f.name) for _, f in ALL_FIELDS if f.type == "float"])
def test_from_env_refuses_nan_durations(variable: str) -> None:
    # float("nan") parses, and NaN compares false to every bound: it must be refused explicitly.
    with pytest.raises(ConfigError, match=rf"^{variable}="):
        Settings.from_env({variable: "nan"})


@pytest.mark.parametrize("raw", ["65536", "99999"])
def test_from_env_refuses_ports_past_65535(raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"^FASTSERVE_PORT={raw}"):
        Settings.from_env({"FASTSERVE_PORT": raw})


# --- model.toml overrides -----------------------------------------------------------------------


def test_override_replaces_only_the_given_fields() -> None:
    base = BatchSettings(max_batch_rows=32, queue_timeout_ms=500.0)
    result = override(base, {"max_batch_rows": 16, "batch_window_ms": 0.0}, WHERE)
    assert result == BatchSettings(max_batch_rows=16, batch_window_ms=0.0, queue_timeout_ms=500.0)
    assert base.max_batch_rows == 32


def test_override_with_an_empty_table_is_the_same_settings() -> None:
    assert override(LimitSettings(), {}, WHERE) == LimitSettings()


def test_override_accepts_an_int_for_a_float_field() -> None:
    assert override(BatchSettings(), {"batch_window_ms": 5}, WHERE).batch_window_ms == 5.0
    assert override(LimitSettings(), {"body_timeout_ms": 250}, WHERE).body_timeout_ms == 250.0


def test_override_limits() -> None:
    result = override(LimitSettings(), {"max_rows_per_request": 10, "max_body_bytes": 4096}, WHERE)
    assert result == LimitSettings(max_rows_per_request=10, max_body_bytes=4096)


@pytest.mark.parametrize(
    ("group", "key"),
    [
        (BatchSettings(), "max_rows_per_request"),
        (BatchSettings(), "batch_size"),
        (LimitSettings(), "max_batch_rows"),
    ],
)
def test_override_unknown_key_names_the_file_and_key(group: object, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^iris/model\.toml: unknown setting {key!r}$"):
        override(group, {key: 1}, WHERE)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("max_batch_rows", "16", "int"),
        ("max_batch_rows", 16.0, "int"),
        ("max_batch_rows", True, "int"),
        ("max_queue_depth", False, "int"),
        ("batch_window_ms", True, "float"),
        ("batch_window_ms", "2", "float"),
        ("queue_timeout_ms", [1000], "float"),
        ("max_batch_rows", {"value": 1}, "int"),
    ],
)
def test_override_wrong_type_names_the_file_and_key(key: str, value: object, kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"^iris/model\.toml: {key} = .+ is not a valid {kind}$"):
        override(BatchSettings(), {key: value}, WHERE)


@pytest.mark.parametrize(
    ("group", "key", "value"),
    [
        (BatchSettings(), "max_batch_rows", 0),
        (BatchSettings(), "max_queue_depth", -5),
        (BatchSettings(), "batch_window_ms", -1.0),
        (LimitSettings(), "max_rows_per_request", 0),
    ],
)
def test_override_out_of_range_value_is_refused(group: object, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=r"must be at least"):
        override(group, {key: value}, WHERE)


def test_override_out_of_range_value_names_the_file_and_key() -> None:
    # The value came from model.toml, not from the environment: the message must say where to fix it.
    with pytest.raises(ConfigError, match=r"iris/model\.toml.*max_batch_rows") as info:
        override(BatchSettings(), {"max_batch_rows": 0}, WHERE)
    assert "FASTSERVE_MAX_BATCH_ROWS" not in str(info.value)


# --- CLI flags ----------------------------------------------------------------------------------


def test_flags_round_trip_through_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    args = parser().parse_args(["--max-batch-rows", "8", "--trusted-repository"])
    export_arguments(args, *GROUPS)
    assert os.environ["FASTSERVE_MAX_BATCH_ROWS"] == "8"
    assert os.environ["FASTSERVE_TRUSTED_REPOSITORY"] == "1"
    settings = Settings.from_env()
    assert settings.batching.max_batch_rows == 8
    assert settings.repository.trusted_repository is True
    assert settings.limits == LimitSettings()


def test_no_flag_writes_false(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FASTSERVE_TRUSTED_REPOSITORY", "1")
    export_arguments(parser().parse_args(["--no-trusted-repository"]), *GROUPS)
    assert os.environ["FASTSERVE_TRUSTED_REPOSITORY"] == "0"
    assert Settings.from_env().repository.trusted_repository is False


def test_unset_flags_leave_the_environment_alone(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FASTSERVE_MAX_QUEUE_DEPTH", "77")
    export_arguments(parser().parse_args([]), *GROUPS)
    assert os.environ["FASTSERVE_MAX_QUEUE_DEPTH"] == "77"
    assert settings_env() == {"FASTSERVE_MAX_QUEUE_DEPTH"}


def test_export_only_writes_the_groups_asked_for(clean_env: pytest.MonkeyPatch) -> None:
    args = parser().parse_args(["--port", "9001", "--max-batch-rows", "8"])
    export_arguments(args, ServerSettings)
    assert os.environ["FASTSERVE_PORT"] == "9001"
    assert "FASTSERVE_MAX_BATCH_ROWS" not in os.environ


def test_an_invalid_flag_value_is_named_when_settings_are_built(clean_env: pytest.MonkeyPatch) -> None:
    export_arguments(parser().parse_args(["--max-batch-rows", "lots"]), *GROUPS)
    with pytest.raises(ConfigError, match=r"^FASTSERVE_MAX_BATCH_ROWS='lots' is not a valid int$"):
        Settings.from_env()


SAMPLE_FLAG_VALUES = {"int": ("7", 7), "float": ("2.5", 2.5), "str": ("somewhere", "somewhere")}
# Fields whose values have a shape of their own.
SAMPLE_FIELD_VALUES = {"state_url": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0")}


@pytest.mark.parametrize(("group", "f"), FLAG_FIELDS, ids=[f.name for _, f in FLAG_FIELDS])
def test_every_field_has_a_flag_and_an_env_var(
    clean_env: pytest.MonkeyPatch, group: type, f: dataclasses.Field[object]
) -> None:
    flag = "--" + f.name.replace("_", "-")
    if f.type == "bool":
        argv, expected_env, expected = [flag], "1", True
    elif "choices" in f.metadata:
        expected = expected_env = next(c for c in f.metadata["choices"] if c != f.default)
        argv = [flag, expected]
    elif f.type == "tuple[str, ...]":
        argv, expected_env, expected = [flag, "a.B,c.D"], "a.B,c.D", ("a.B", "c.D")
    else:
        raw, expected = SAMPLE_FIELD_VALUES.get(f.name) or SAMPLE_FLAG_VALUES[str(f.type)]
        argv, expected_env = [flag, raw], raw
    export_arguments(parser().parse_args(argv), *GROUPS)
    assert settings_env() == {env_name(f.name)}
    assert os.environ[env_name(f.name)] == expected_env
    settings = Settings.from_env()
    group_name = next(name for name, value in vars(settings).items() if isinstance(value, group))
    assert getattr(getattr(settings, group_name), f.name) == expected


def test_every_flag_at_once_round_trips(clean_env: pytest.MonkeyPatch) -> None:
    argv = [
        "--host", "0.0.0.0", "--port", "9000", "--workers", "3",
        "--repository", "/srv/models", "--trusted-repository", "--trusted-types", "x.Y",
        "--max-batch-rows", "8", "--batch-window-ms", "0",
        "--max-queue-depth", "100", "--queue-timeout-ms", "50",
        "--max-body-bytes", "2048", "--max-rows-per-request", "16", "--body-timeout-ms", "500",
        "--state-path", "/var/lib/fastserve/state.sqlite", "--state-url", "rediss://redis:6380/1",
    ]  # fmt: skip
    export_arguments(parser().parse_args(argv), *GROUPS)
    assert Settings.from_env() == Settings(
        server=ServerSettings(host="0.0.0.0", port=9000, workers=3),
        repository=RepositorySettings(
            repository="/srv/models", trusted_repository=True, trusted_types=("x.Y",)
        ),
        batching=BatchSettings(
            max_batch_rows=8, batch_window_ms=0.0, max_queue_depth=100, queue_timeout_ms=50.0
        ),
        limits=LimitSettings(max_body_bytes=2048, max_rows_per_request=16, body_timeout_ms=500.0),
        deploy=DeploySettings(
            state_path="/var/lib/fastserve/state.sqlite", state_url="rediss://redis:6380/1"
        ),
    )


def test_the_admin_token_comes_from_the_environment_only(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--admin-token", "0123456789abcdef"])
    clean_env.setenv("FASTSERVE_ADMIN_TOKEN", "0123456789abcdef")
    assert Settings.from_env().deploy.admin_token == "0123456789abcdef"


def test_a_guessable_admin_token_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FASTSERVE_ADMIN_TOKEN", "hunter2")
    with pytest.raises(ConfigError, match=r"^FASTSERVE_ADMIN_TOKEN must be at least 16 characters$"):
        Settings.from_env()
