"""Which store holds the state: SQLite by default, Redis with ``--state-url``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastserve.config import Settings
from fastserve.errors import ConfigError
from fastserve.redis_state import RedisStore
from fastserve.state import DeploymentStore, state_path
from fastserve.store import open_store


def test_sqlite_is_the_default(tmp_path: Path) -> None:
    settings = Settings.from_env({"FASTSERVE_STATE_PATH": str(tmp_path / "deploy.sqlite")})
    store = open_store(settings)
    assert isinstance(store, DeploymentStore) and store.path == state_path(settings)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:secret@redis.example:6380/2"])
def test_a_redis_url_picks_the_redis_store(url: str) -> None:
    store = open_store(Settings.from_env({"FASTSERVE_STATE_URL": url}), follow=True)
    try:
        assert isinstance(store, RedisStore)
    finally:
        store.close()  # nothing was connected: no Redis is asked anything


@pytest.mark.parametrize("url", ["http://:hunter2-secret@host:6379", "hunter2-secret", "sqlite:///x"])
def test_a_state_url_that_is_not_redis_is_refused_without_repeating_it(url: str) -> None:
    expected = "FASTSERVE_STATE_URL must be a redis:// or rediss:// URL"
    with pytest.raises(ConfigError, match=expected) as refused:
        Settings.from_env({"FASTSERVE_STATE_URL": url})
    assert "hunter2" not in str(refused.value) and url not in str(refused.value)


def test_a_malformed_redis_url_is_refused_without_repeating_it() -> None:
    settings = Settings.from_env({"FASTSERVE_STATE_URL": "redis://:hunter2@host:notaport/0"})
    with pytest.raises(ConfigError, match="FASTSERVE_STATE_URL: not a redis") as refused:
        open_store(settings)
    assert "hunter2" not in str(refused.value)
