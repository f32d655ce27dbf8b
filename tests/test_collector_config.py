"""Collector config: TOML into frozen dataclasses, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector import config
from collector.config import CollectorConfig, ShardConfig
from collector.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "collector.example.toml"


def test_example_config_loads() -> None:
    loaded = config.load(EXAMPLE)

    assert loaded.server.port == 8080
    assert loaded.server.max_batch_bytes == 16 * 1024 * 1024
    assert loaded.database.catalog == (
        "postgresql://solarfleet@127.0.0.1:5432/solarfleet_catalog"
    )
    assert loaded.database.shards == (
        ShardConfig(
            "shard-1", "postgresql://solarfleet@127.0.0.1:5432/solarfleet_shard_1"
        ),
        ShardConfig(
            "shard-2", "postgresql://solarfleet@127.0.0.1:5432/solarfleet_shard_2"
        ),
    )


def test_empty_config_is_embedded() -> None:
    parsed = config.parse({})

    assert parsed == CollectorConfig()
    assert parsed.database.embedded
    assert parsed.database.embedded_dir == config.DEFAULT_EMBEDDED_DIR


def test_embedded_dir_expanded() -> None:
    parsed = config.parse({"database": {"embedded_dir": "~/pg"}})

    assert parsed.database.embedded
    assert parsed.database.embedded_dir == Path.home() / "pg"


BAD = [
    (
        {"serve": {}},
        "unknown key serve: remove it or use one of server, database, shards, "
        "alerts",
    ),
    (
        {"server": {"prot": 1}},
        "unknown key [server] prot: remove it or use one of host, "
        "port, max_batch_bytes, shard_timeout, auth_cache_seconds, "
        "future_tolerance, gateway_offline_after",
    ),
    (
        {"server": {"port": "80"}},
        "[server] port must be an integer from 0 to 65535, got '80'",
    ),
    (
        {"server": {"port": True}},
        "[server] port must be an integer from 0 to 65535, got True",
    ),
    (
        {"server": {"max_batch_bytes": 10}},
        "[server] max_batch_bytes must be an integer from 1024 to 2147483648, got 10",
    ),
    (
        {"server": {"shard_timeout": 0}},
        "[server] shard_timeout must be a positive number of seconds, got 0",
    ),
    ({"server": []}, "server must be a table: write it as [server]"),
    (
        {"shards": [{"name": "s", "dsn": "dbname=x"}]},
        "[[shards]] needs a catalog: set [database] catalog, or remove every "
        "[[shards]] "
        "table to use the embedded PostgreSQL",
    ),
    (
        {"database": {"catalog": "dbname=x"}},
        "no [[shards]] table: add one [[shards]] table with name and dsn per shard",
    ),
    (
        {"database": {"catalog": ""}, "shards": [{"name": "s", "dsn": "dbname=x"}]},
        "[database] catalog is empty: set a PostgreSQL connection string",
    ),
    (
        {
            "database": {"catalog": "dbname=x"},
            "shards": [{"name": "S 1", "dsn": "dbname=x"}],
        },
        "[shards[0]] name 'S 1' is invalid: use 1-63 lowercase letters, digits, '-' or "
        "'_', starting with a letter or digit",
    ),
    (
        {
            "database": {"catalog": "dbname=x"},
            "shards": [
                {"name": "a", "dsn": "dbname=x"},
                {"name": "a", "dsn": "dbname=y"},
            ],
        },
        "[shards[1]] name 'a' is used twice: give each shard its own",
    ),
    (
        {"database": {"catalog": "dbname=x"}, "shards": [{"name": "a"}]},
        "[shards[0]] dsn is missing: set a PostgreSQL connection string",
    ),
    (
        {
            "database": {"catalog": "dbname=x"},
            "shards": [{"name": "a", "dsn": "dbname=x", "pool": 3}],
        },
        "unknown key [shards[0]] pool: remove it or use one of name, dsn",
    ),
    (
        {"database": {"catalog": "not a dsn ==="}, "shards": [{"name": "a"}]},
        "[database] catalog is not a valid PostgreSQL connection string: write "
        "key=value pairs (host=db1 dbname=solarfleet) or a postgresql:// URI",
    ),
    (
        {
            "database": {"catalog": "dbname=x"},
            "shards": [
                {"name": "a", "dsn": "dbname=a"},
                {"name": "b", "dsn": "garbage ==="},
            ],
        },
        "[shards[1]] dsn is not a valid PostgreSQL connection string: write "
        "key=value pairs (host=db1 dbname=solarfleet) or a postgresql:// URI",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_config_rejected(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(data)

    assert str(caught.value) == message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^config file .*nope.toml not found: check "
        r"the path$",
    ):
        config.load(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server\n")

    with pytest.raises(ConfigError, match=r"^config file .*c.toml is not valid TOML: "):
        config.load(path)


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes('[server]\nhost = "h\u00f6st"\n'.encode("latin-1"))

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value) == (
        f"config file {path} is not valid UTF-8 (byte 18): save it as UTF-8"
    )
