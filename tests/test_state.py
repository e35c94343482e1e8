"""Deployment state: action decoding, the transition rules, and the stores shared by processes.

The store tests run against both backends (ids ``sqlite`` and ``redis``, a real redis-server);
the ones about a state file (locks, deletion, paths) against SQLite only.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastserve import state as state_module
from fastserve.actions import (
    ACTION_NAMES,
    Candidate,
    ClearCandidate,
    Deployment,
    Load,
    Promote,
    Rollback,
    Unload,
    action_name,
    decode_action,
    make_action,
    transition,
)
from fastserve.config import Settings, default_demo_repository
from fastserve.errors import (
    ConfigError,
    DeployConflict,
    MalformedBody,
    StateUnavailable,
    UnknownModel,
    UnknownVersion,
    VersionNotReady,
)
from fastserve.redis_state import RedisStore
from fastserve.state import (
    FAILED,
    LOADING,
    SERVING,
    DeploymentStore,
    VersionState,
    default_state_path,
    state_path,
)

# Every version the tests may deploy, with its feature count; v5 takes a different number.
SERVABLE: dict[str, int | None] = {"v1": 4, "v2": 4, "v3": 4, "v5": 5}


def stable(version: str = "v1", **fields: object) -> Deployment:
    return Deployment("m", version, **fields)  # type: ignore[arg-type]


# -- decode_action ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"action": "candidate", "version": "v2", "canary": 0.25, "shadow": true}',
            Candidate("v2", 0.25, True),
        ),
        (b'{"action": "candidate", "version": "v2"}', Candidate("v2", 0.0, False)),
        (b'{"action": "candidate", "version": "v2", "canary": 0}', Candidate("v2", 0.0, False)),
        (b'{"action": "candidate", "version": "v2", "canary": 1}', Candidate("v2", 1.0, False)),
        (b'{"action": "promote"}', Promote()),
        (b'{"action": "rollback"}', Rollback(None)),
        (b'{"action": "rollback", "version": "v1"}', Rollback("v1")),
        (b'{"action": "clear_candidate"}', ClearCandidate()),
    ],
)
def test_each_action_decodes(body: bytes, expected: object) -> None:
    action = decode_action(body)
    assert type(action) is type(expected)
    assert action == expected


def test_action_names_are_the_json_tags() -> None:
    actions = [Candidate("v2"), Promote(), Rollback(), ClearCandidate(), Load("v3"), Unload("v1")]
    assert [action_name(a) for a in actions] == list(ACTION_NAMES)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"action": "deploy"}', r"Invalid value 'deploy' - at `\$.action`"),
        (b'{"version": "v2"}', r"missing required field `action`"),
        (b'{"action": "candidate"}', r"missing required field `version`"),
        (b'{"action": "candidate", "version": "v2", "canary": 1.5}', r"<= 1.0 - at `\$.canary`"),
        (b'{"action": "candidate", "version": "v2", "canary": -0.1}', r">= 0.0 - at `\$.canary`"),
        (b'{"action": "promote", "force": true}', r"unknown field `force`"),
        (b'{"action": "candidate", "version": "v2", "weight": 0.1}', r"unknown field `weight`"),
        (b"not json", r"JSON is malformed"),
        (b"", r"truncated"),
        (b'["promote"]', r"Expected `object`, got `array`"),
        (b'{"action": "candidate", "version": 2}', r"Expected `str`, got `int` - at `\$.version`"),
        (b'{"action": "candidate", "version": "v2", "canary": "0.5"}', r"Expected `float`, got `str`"),
        (b'{"action": "candidate", "version": "v2", "canary": true}', r"Expected `float`, got `bool`"),
        (b'{"action": "candidate", "version": "v2", "shadow": "yes"}', r"Expected `bool`, got `str`"),
        (b'{"action": "rollback", "version": 1}', r"Expected `str \| null`, got `int`"),
        # Empty would read as "no version": a bare rollback the caller did not ask for.
        (b'{"action": "rollback", "version": ""}', r"length >= 1 - at `\$.version`"),
        (b'{"action": "candidate", "version": ""}', r"length >= 1 - at `\$.version`"),
    ],
)
def test_malformed_actions_are_refused(body: bytes, match: str) -> None:
    with pytest.raises(MalformedBody, match=match) as refused:
        decode_action(body)
    assert refused.value.code == "malformed_body" and refused.value.status == 400
    assert str(refused.value).startswith("not a deployment action: ")


def test_actions_from_fields_follow_the_same_rules_as_bodies() -> None:
    assert make_action({"action": "candidate", "version": "v2", "canary": 0.5, "shadow": True}) == Candidate(
        "v2", 0.5, True
    )
    assert make_action({"action": "rollback"}) == Rollback()
    with pytest.raises(MalformedBody, match=r"<= 1.0 - at `\$.canary`"):
        make_action({"action": "candidate", "version": "v2", "canary": 2.0})
    with pytest.raises(MalformedBody, match=r"length >= 1 - at `\$.version`"):
        make_action({"action": "rollback", "version": ""})


# -- transition ---------------------------------------------------------------------------------


def test_candidate_sets_candidate_canary_and_shadow() -> None:
    before = stable("v1", previous_stable="v0")
    after = transition(before, Candidate("v2", canary=0.1, shadow=True), SERVABLE)
    assert after == Deployment("m", "v1", "v2", 0.1, True, "v0")
    # Replacing a candidate replaces all three fields, leaving stable alone.
    again = transition(after, Candidate("v3"), SERVABLE)
    assert again == Deployment("m", "v1", "v3", 0.0, False, "v0")


def test_candidate_equal_to_stable_is_a_conflict() -> None:
    with pytest.raises(DeployConflict, match="m v1 is already stable"):
        transition(stable("v1"), Candidate("v1"), SERVABLE)


def test_candidate_of_an_unknown_version_is_refused() -> None:
    with pytest.raises(UnknownVersion, match="model 'm' serves no version 'v9'"):
        transition(stable("v1"), Candidate("v9"), SERVABLE)


def test_candidate_with_another_feature_count_is_a_conflict() -> None:
    with pytest.raises(DeployConflict, match="m v5 takes 5 features, stable v1 takes 4"):
        transition(stable("v1"), Candidate("v5"), SERVABLE)


@pytest.mark.parametrize(
    "servable",
    [
        {"v1": None, "v5": None},  # the CLI: it cannot know without loading the models
        {"v1": 4, "v5": None},
        {"v1": None, "v5": 5},
    ],
)
def test_unknown_feature_counts_skip_the_feature_check(servable: dict[str, int | None]) -> None:
    after = transition(stable("v1"), Candidate("v5", canary=0.5), servable)
    assert after.candidate == "v5" and after.canary == 0.5


def test_promote_makes_the_candidate_stable_and_keeps_the_old_one() -> None:
    before = Deployment("m", "v1", "v2", 0.3, True, "v0")
    after = transition(before, Promote(), SERVABLE)
    assert after == Deployment("m", "v2", None, 0.0, False, "v1")


def test_promote_without_a_candidate_is_a_conflict() -> None:
    with pytest.raises(DeployConflict, match="m has no candidate to promote"):
        transition(stable("v1", previous_stable="v0"), Promote(), SERVABLE)


def test_promote_of_a_candidate_that_is_no_longer_servable_is_refused() -> None:
    with pytest.raises(UnknownVersion, match="serves no version 'v2'"):
        transition(Deployment("m", "v1", "v2", 0.5), Promote(), {"v1": 4})


def test_a_bare_rollback_goes_to_the_previous_stable_and_two_toggle_back() -> None:
    before = Deployment("m", "v2", previous_stable="v1")
    once = transition(before, Rollback(), SERVABLE)
    assert once == Deployment("m", "v1", previous_stable="v2")
    twice = transition(once, Rollback(), SERVABLE)
    assert twice == before


def test_rollback_to_a_named_version() -> None:
    after = transition(Deployment("m", "v3", previous_stable="v2"), Rollback("v1"), SERVABLE)
    assert after == Deployment("m", "v1", previous_stable="v3")


def test_rollback_to_an_unknown_version_is_refused() -> None:
    with pytest.raises(UnknownVersion, match="serves no version 'v9'"):
        transition(Deployment("m", "v2", previous_stable="v1"), Rollback("v9"), SERVABLE)


def test_rollback_to_the_current_stable_is_a_conflict() -> None:
    with pytest.raises(DeployConflict, match="m v2 is already stable"):
        transition(Deployment("m", "v2", previous_stable="v1"), Rollback("v2"), SERVABLE)


def test_rollback_with_no_previous_stable_is_a_conflict() -> None:
    with pytest.raises(DeployConflict, match="m has no previous stable version to roll back to"):
        transition(stable("v1"), Rollback(), SERVABLE)


def test_rollback_keeps_an_unrelated_candidate() -> None:
    before = Deployment("m", "v2", "v3", 0.2, True, "v1")
    after = transition(before, Rollback(), SERVABLE)
    assert after == Deployment("m", "v1", "v3", 0.2, True, "v2")


def test_rollback_to_the_candidate_clears_the_candidate() -> None:
    before = Deployment("m", "v2", "v3", 0.2, True, "v1")
    after = transition(before, Rollback("v3"), SERVABLE)
    assert after == Deployment("m", "v3", None, 0.0, False, "v2")


def test_clear_candidate_clears_and_is_idempotent() -> None:
    before = Deployment("m", "v2", "v3", 0.2, True, "v1")
    cleared = transition(before, ClearCandidate(), SERVABLE)
    assert cleared == Deployment("m", "v2", None, 0.0, False, "v1")
    assert transition(cleared, ClearCandidate(), SERVABLE) == cleared


# -- the store ----------------------------------------------------------------------------------


Store = DeploymentStore | RedisStore
# The tests' workers have no heartbeat: their liveness must outlast the test.
LONG_TTL_S = 600.0


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    """The stores a test opens, all closed at teardown."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def open_store(stores: list[Store], path: Path) -> DeploymentStore:
    store = DeploymentStore(path)
    stores.append(store)
    return store


def another(stores: list[Store], store: Store) -> Store:
    """A second store on the same state (another process's, in production)."""
    if isinstance(store, DeploymentStore):
        return open_store(stores, store.path)
    other = RedisStore(store.url, ttl_s=LONG_TTL_S)
    stores.append(other)
    return other


@pytest.fixture(params=["sqlite", "redis"])
def fresh_store(request: pytest.FixtureRequest, stores: list[Store], tmp_path: Path) -> Store:
    """An empty store of each backend."""
    if request.param == "sqlite":
        return open_store(stores, tmp_path / "nested" / "dirs" / "deploy.sqlite")
    redis_server = request.getfixturevalue("redis_server")
    store = RedisStore(redis_server.url, ttl_s=LONG_TTL_S)
    stores.append(store)
    return store


@pytest.fixture
def store(fresh_store: Store) -> Store:
    """A store of each backend, seeded with model m at v1."""
    fresh_store.seed({"m": "v1"}, "seeder")
    return fresh_store


@pytest.fixture
def sqlite_store(stores: list[Store], tmp_path: Path) -> DeploymentStore:
    """A store on a fresh file, seeded with model m at v1."""
    seeded = open_store(stores, tmp_path / "state" / "deploy.sqlite")
    seeded.seed({"m": "v1"}, "seeder")
    return seeded


def test_seed_inserts_each_model_once_and_audits_it_once(fresh_store: Store) -> None:
    store = fresh_store
    store.seed({"a": "v1", "b": "v7"}, "server pid 1")
    store.seed({"a": "v2", "b": "v8", "c": "v3"}, "server pid 2")
    deployments = store.deployments()
    assert {name: d.stable for name, d in deployments.items()} == {"a": "v1", "b": "v7", "c": "v3"}
    assert all(d.candidate is None and d.previous_stable is None for d in deployments.values())
    inits = [(e.model, e.action, e.from_version, e.to_version, e.actor) for e in store.history()]
    assert sorted(inits) == [
        ("a", "init", None, "v1", "server pid 1"),
        ("b", "init", None, "v7", "server pid 1"),
        ("c", "init", None, "v3", "server pid 2"),
    ]


def test_act_applies_persists_and_returns_the_new_deployment(
    store: Store, stores: list[Store], tmp_path: Path
) -> None:
    after = store.act("m", Candidate("v2", canary=0.25, shadow=True), SERVABLE, "alice")
    assert (after.stable, after.candidate, after.canary, after.shadow) == ("v1", "v2", 0.25, True)
    assert after.updated_at > 0
    assert store.deployments()["m"] == after
    # Another store object (another process, in production) reads the same truth.
    other = another(stores, store)
    assert other.deployments() == {"m": after}


def test_every_action_is_audited_newest_first(store: Store) -> None:
    store.act("m", Candidate("v2", canary=0.25, shadow=True), SERVABLE, "alice")
    store.act("m", Promote(), SERVABLE, "bob")
    store.act("m", Rollback(), SERVABLE, "carol")
    store.act("m", Candidate("v3"), SERVABLE, "dave")
    final = store.act("m", ClearCandidate(), SERVABLE, "erin")
    assert final == Deployment("m", "v1", None, 0.0, False, "v2", final.updated_at)
    history = store.history()
    assert [(e.action, e.from_version, e.to_version, e.actor, e.detail) for e in history] == [
        ("clear_candidate", "v3", None, "erin", {}),
        ("candidate", None, "v3", "dave", {"canary": 0.0, "shadow": False}),
        ("rollback", "v2", "v1", "carol", {}),
        ("promote", "v1", "v2", "bob", {}),
        ("candidate", None, "v2", "alice", {"canary": 0.25, "shadow": True}),
        ("init", None, "v1", "seeder", {}),
    ]
    assert all(e.model == "m" for e in history)
    assert [e.at for e in history] == sorted((e.at for e in history), reverse=True)
    assert history[0].at == final.updated_at
    assert store.history(limit=2) == history[:2]
    assert store.history(limit=1)[0].action == "clear_candidate"


def test_act_on_an_unknown_model_is_refused(store: Store) -> None:
    with pytest.raises(UnknownModel, match="no model named 'nope'"):
        store.act("nope", Candidate("v2"), SERVABLE, "alice")
    assert len(store.history()) == 1


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (Promote(), DeployConflict),
        (Rollback(), DeployConflict),
        (Candidate("v1"), DeployConflict),
        (Candidate("v5"), DeployConflict),
        (Candidate("v9"), UnknownVersion),
    ],
)
def test_a_failing_action_changes_nothing_and_is_not_audited(
    store: Store, action: Candidate | Promote | Rollback, error: type[Exception]
) -> None:
    before, history = store.deployments(), store.history()
    store.changed()
    with pytest.raises(error):
        store.act("m", action, SERVABLE, "mallory")
    assert store.deployments() == before
    assert store.history() == history
    assert not store.changed()  # nothing was committed
    # The failed transaction let go of the write lock: the next action goes through.
    assert store.act("m", Candidate("v2"), SERVABLE, "alice").candidate == "v2"


def test_the_row_and_its_audit_entry_are_written_together(
    sqlite_store: DeploymentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    before, history = store.deployments(), store.history()

    def broken_audit(conn: sqlite3.Connection, entry: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(state_module, "_audit", broken_audit)
    with pytest.raises(StateUnavailable, match="cannot be written: disk I/O error"):
        store.act("m", Candidate("v2"), SERVABLE, "alice")
    assert store.deployments() == before  # the UPDATE before the audit insert was rolled back
    assert store.history() == history


def test_changed_reports_other_connections_commits_once(store: Store, stores: list[Store]) -> None:
    assert store.changed()  # the first call: nothing seen yet
    assert not store.changed()
    other = another(stores, store)
    other.act("m", Candidate("v2"), SERVABLE, "alice")
    assert store.changed()
    assert not store.changed()
    assert store.deployments()["m"].candidate == "v2"
    other.seed({"m": "v3"}, "late")  # a seed that inserts nothing still commits (empty)
    store.changed()
    assert not store.changed()
    other.seed({"n": "v1"}, "late")
    assert store.changed()
    assert set(store.deployments()) == {"m", "n"}


def race_promotes(store: Store, racers: int) -> list[object]:
    """``racers`` threads promote at the same moment, each on its own connection; their outcomes."""
    barrier = threading.Barrier(racers)
    outcomes: list[object] = [None] * racers

    def promote(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes[i] = store.act("m", Promote(), SERVABLE, f"racer {i}")
        except DeployConflict as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_racing_promotes_in_threads_take_turns(store: Store) -> None:
    racers = 8
    for round_ in range(5):
        candidate = "v2" if round_ % 2 == 0 else "v1"
        store.act("m", Candidate(candidate), SERVABLE, "setup")
        outcomes = race_promotes(store, racers)
        winners = [o for o in outcomes if isinstance(o, Deployment)]
        losers = [o for o in outcomes if isinstance(o, DeployConflict)]
        assert len(winners) == 1 and len(losers) == racers - 1, outcomes
        assert all("has no candidate to promote" in str(o) for o in losers)
        assert store.deployments()["m"] == winners[0]
        assert winners[0].stable == candidate and winners[0].candidate is None
    promotes = [e for e in store.history(limit=100) if e.action == "promote"]
    assert len(promotes) == 5


def _promote_in_process(where: tuple[str, str], start: Any) -> str:
    start.wait(timeout=30)
    kind, address = where
    store: Store = DeploymentStore(Path(address)) if kind == "sqlite" else RedisStore(address)
    try:
        store.act("m", Promote(), SERVABLE, f"pid {os.getpid()}")
    except DeployConflict:
        return "conflict"
    return "promoted"


def test_racing_promotes_in_processes_take_turns(store: Store) -> None:
    store.act("m", Candidate("v2"), SERVABLE, "setup")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(3) as pool:
            where = (
                ("sqlite", str(store.path)) if isinstance(store, DeploymentStore) else ("redis", store.url)
            )
            pending = [pool.apply_async(_promote_in_process, (where, start)) for _ in range(3)]
            start.set()
            results = sorted(result.get(timeout=60) for result in pending)
    assert results == ["conflict", "conflict", "promoted"]
    assert store.deployments()["m"].stable == "v2"
    assert [e.action for e in store.history(limit=100)].count("promote") == 1


def test_a_fresh_state_file_that_another_connection_is_writing_is_waited_for(
    stores: list[Store], tmp_path: Path
) -> None:
    path = tmp_path / "deploy.sqlite"
    # Another worker's first connection, in the middle of its first write to the new file.
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE IF NOT EXISTS unrelated (x)")
    release = threading.Timer(0.2, other.execute, ("COMMIT",))
    release.start()
    try:
        store = open_store(stores, path)
        store.seed({"m": "v1"}, "second worker")  # should wait its turn, up to the busy timeout
        assert store.deployments()["m"].stable == "v1"
    finally:
        release.join()
        other.close()


@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "not_a_database"])
def test_an_unopenable_state_file_is_a_config_error_without_the_path(
    stores: list[Store], tmp_path: Path, where: str
) -> None:
    secret = tmp_path / "secret-location"
    if where == "under_a_file":
        secret.write_text("a regular file")
        path = secret / "sub" / "deploy.sqlite"
    elif where == "a_directory":
        path = secret
        path.mkdir()
    else:
        path = secret
        path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    store = open_store(stores, path)
    with pytest.raises(
        ConfigError, match="FASTSERVE_STATE_PATH: cannot open the deployment state: "
    ) as raised:
        store.seed({"m": "v1"}, "seeder")
    message = str(raised.value)
    assert "secret-location" not in message and str(tmp_path) not in message
    with pytest.raises(ConfigError):
        store.deployments()


# -- where the state file lives ----------------------------------------------------------------


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def test_default_state_path_is_per_repository_under_xdg_state_home(state_home: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "models", tmp_path / "b" / "models"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    one, two = default_state_path(first), default_state_path(second)
    assert one != two
    for path in (one, two):
        assert path.parent == state_home / "fastserve"
        assert path.name.startswith("models-") and path.suffix == ".sqlite"
    assert default_state_path(first) == one  # stable across calls


def test_default_state_path_follows_the_real_path(
    state_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    link = tmp_path / "link-to-repo"
    link.symlink_to(repo, target_is_directory=True)
    expected = default_state_path(repo)
    assert default_state_path(link) == expected
    assert default_state_path(tmp_path / "other" / ".." / "repo") == expected
    monkeypatch.chdir(tmp_path)
    assert default_state_path(Path("repo")) == expected
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_path(Path("~/repo")) == expected


@pytest.mark.parametrize("unset", ["missing", "empty"])
def test_default_state_path_without_xdg_state_home_is_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unset: str
) -> None:
    if unset == "missing":
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = default_state_path(tmp_path / "repo")
    assert path.parent == tmp_path / "home" / ".local" / "state" / "fastserve"


def test_state_path_is_the_configured_one_when_set(
    state_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "elsewhere" / "deploy.sqlite"
    repo = tmp_path / "repo"
    settings = Settings.from_env({"FASTSERVE_STATE_PATH": str(configured), "FASTSERVE_REPOSITORY": str(repo)})
    assert state_path(settings) == configured
    monkeypatch.setenv("HOME", str(tmp_path))
    assert (
        state_path(Settings.from_env({"FASTSERVE_STATE_PATH": "~/deploy.sqlite"}))
        == tmp_path / "deploy.sqlite"
    )


def test_state_path_defaults_to_the_repositorys_file(
    state_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert state_path(Settings.from_env({"FASTSERVE_REPOSITORY": str(repo)})) == default_state_path(repo)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    demo = default_demo_repository()
    assert state_path(Settings.from_env({})) == default_state_path(demo)
    assert state_path(Settings.from_env({})).parent == state_home / "fastserve"


def test_ready_workers_are_the_live_ones_of_this_server(store: Store) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    me, server, other_server = os.getpid(), os.getppid(), os.getppid() + 1
    store.worker_ready(me, server)
    store.worker_ready(exited.pid, server)  # killed outright: its row stays, its pid is gone
    store.worker_ready(os.getppid(), other_server)  # a worker of another server on this file
    assert store.ready_workers(server) == [me]
    assert store.ready_workers(other_server) == [os.getppid()]
    store.worker_gone(me)
    assert store.ready_workers(server) == []


# -- loaded versions: load, unload, and readiness across workers --------------------------------


@pytest.fixture
def loaded_store(store: Store) -> Store:
    """Model m at stable v1, with v1 and v2 loaded, and this process as its one live worker,
    serving both."""
    store.seed_loaded({"m": ["v1", "v2"]})
    store.worker_ready(os.getpid(), os.getppid())
    for version in ("v1", "v2"):
        store.record_version(os.getpid(), "m", version, VersionState(SERVING, None, 1000))
    return store


def test_seed_loaded_counts_only_on_a_models_first_start(store: Store) -> None:
    store.seed_loaded({"m": ["v1", "v2"]})
    store.seed_loaded({"m": ["v1", "v2", "v3"], "n": ["v1"]})  # a restart with v3 new on disk
    assert {m: sorted(v) for m, v in store.loaded().items()} == {"m": ["v1", "v2"], "n": ["v1"]}


def test_load_adds_the_version_and_an_alias_waits_until_every_worker_serves_it(
    loaded_store: Store,
) -> None:
    store = loaded_store
    store.act("m", Load("v3"), SERVABLE, "alice", on_disk=["v1", "v2", "v3"])
    assert sorted(store.loaded()["m"]) == ["v1", "v2", "v3"]
    assert ("m", "v3") not in store.serving_everywhere()
    with pytest.raises(VersionNotReady, match="not warm in every worker"):
        store.act("m", Candidate("v3"), SERVABLE, "alice")
    store.record_version(os.getpid(), "m", "v3", VersionState(LOADING, None, None))
    with pytest.raises(VersionNotReady):
        store.act("m", Rollback("v3"), SERVABLE, "alice")
    store.record_version(os.getpid(), "m", "v3", VersionState(SERVING, None, 2000))
    assert ("m", "v3") in store.serving_everywhere()
    assert store.act("m", Candidate("v3"), SERVABLE, "alice").candidate == "v3"
    assert [e.action for e in store.history(2)] == ["candidate", "load"]
    assert store.history(2)[1].to_version == "v3"


def test_a_version_that_failed_in_one_worker_is_not_servable_and_may_be_loaded_again(
    loaded_store: Store,
) -> None:
    store = loaded_store
    store.act("m", Load("v3"), SERVABLE, "alice", on_disk=["v1", "v2", "v3"])
    store.record_version(os.getpid(), "m", "v3", VersionState(FAILED, "EOFError: truncated", None))
    with pytest.raises(UnknownVersion):
        store.act("m", Candidate("v3"), SERVABLE, "alice")
    first = store.loaded()["m"]["v3"]
    store.act("m", Load("v3"), SERVABLE, "alice", on_disk=["v1", "v2", "v3"])  # after fixing it
    assert store.loaded()["m"]["v3"] > first  # a newer request: every worker tries again


def test_a_load_is_refused_for_a_version_not_on_disk_or_already_warm_everywhere(
    loaded_store: Store,
) -> None:
    with pytest.raises(UnknownVersion, match="no version 'v9' in the repository"):
        loaded_store.act("m", Load("v9"), SERVABLE, "alice", on_disk=["v1", "v2"])
    with pytest.raises(DeployConflict, match="warm in every worker already"):
        loaded_store.act("m", Load("v2"), SERVABLE, "alice", on_disk=["v1", "v2"])


def test_unload_drops_the_version_but_never_stable_or_candidate(loaded_store: Store) -> None:
    store = loaded_store
    store.act("m", Load("v3"), SERVABLE, "alice", on_disk=["v1", "v2", "v3"])
    store.record_version(os.getpid(), "m", "v3", VersionState(SERVING, None, 2000))
    store.act("m", Candidate("v3"), SERVABLE, "alice")
    with pytest.raises(DeployConflict, match="is the stable"):
        store.act("m", Unload("v1"), SERVABLE, "alice")
    with pytest.raises(DeployConflict, match="is the candidate"):
        store.act("m", Unload("v3"), SERVABLE, "alice")
    after = store.act("m", Unload("v2"), SERVABLE, "alice")
    assert (after.stable, after.candidate) == ("v1", "v3")
    assert sorted(store.loaded()["m"]) == ["v1", "v3"]
    with pytest.raises(UnknownVersion, match="no loaded version 'v2'"):
        store.act("m", Unload("v2"), SERVABLE, "alice")
    entry = store.history(1)[0]
    assert (entry.action, entry.from_version, entry.to_version) == ("unload", "v2", None)


def test_loading_a_new_model_makes_its_version_stable(loaded_store: Store) -> None:
    after = loaded_store.act("n", Load("v4"), {}, "alice", on_disk=["v4"])
    assert after.stable == "v4" and loaded_store.deployments()["n"].stable == "v4"
    assert loaded_store.loaded()["n"].keys() == {"v4"}


def test_readiness_counts_only_live_workers(loaded_store: Store) -> None:
    store = loaded_store
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    store.act("m", Load("v3"), SERVABLE, "alice", on_disk=["v1", "v2", "v3"])
    store.record_version(os.getpid(), "m", "v3", VersionState(SERVING, None, 2000))
    # A worker killed outright, which never served v3: its pid is gone, so it does not count.
    store.worker_ready(exited.pid, os.getppid())
    assert ("m", "v3") in store.serving_everywhere()
    states = store.version_states()
    assert set(states[("m", "v3")]) == {store.worker_name(os.getpid())}
    assert states[("m", "v3")][store.worker_name(os.getpid())] == VersionState(SERVING, None, 2000)
    store.forget_version(os.getpid(), "m", "v3")
    assert ("m", "v3") not in store.version_states()


# -- faults: a lock held too long, a deleted file ------------------------------------------------


def test_an_action_behind_a_lock_held_too_long_is_state_unavailable_and_changes_nothing(
    sqlite_store: DeploymentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    monkeypatch.setattr(state_module, "_BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing, and not letting go
    try:
        with pytest.raises(StateUnavailable, match="database is locked"):
            store.act("m", Candidate("v2"), SERVABLE, "alice")
        assert store.deployments()["m"].candidate is None  # reads go on under the lock (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.act("m", Candidate("v2"), SERVABLE, "alice").candidate == "v2"


def test_a_deleted_state_file_is_noticed_refused_and_restored_from_what_was_read(
    sqlite_store: DeploymentStore, stores: list[Store]
) -> None:
    store = sqlite_store
    store.seed_loaded({"m": ["v1", "v2"]})
    store.act("m", Candidate("v2", canary=0.5), SERVABLE, "alice")
    assert store.deployments()["m"].candidate == "v2"  # a worker's reader has the file open
    assert not store.replaced()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)
    assert store.replaced()
    # An action does not make a new, empty state in its place: it would know no model.
    with pytest.raises(StateUnavailable, match="cannot be opened"):
        store.act("m", Promote(), SERVABLE, "alice")
    assert not store.path.exists()
    # The reader still has the deleted file open: the last truth, which restores it.
    deployments, loaded = store.deployments(), store.loaded()
    store.close()
    assert store.restore(deployments, loaded, "server pid 1") == ["m"]
    assert store.restore(deployments, loaded, "server pid 2") == []  # the other worker's: no-op
    assert not store.replaced()
    again = open_store(stores, store.path)
    assert again.deployments()["m"].candidate == "v2" and again.deployments()["m"].canary == 0.5
    assert sorted(again.loaded()["m"]) == ["v1", "v2"]
    assert [(e.action, e.actor) for e in again.history()] == [("restore", "server pid 1")]
    assert again.act("m", Promote(), SERVABLE, "alice").stable == "v2"
