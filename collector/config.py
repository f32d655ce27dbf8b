"""Collector configuration: a TOML file read into frozen dataclasses.

With no `catalog` under `[database]` (or no `[database]` table at all), the collector
runs an embedded PostgreSQL under `embedded_dir` holding the catalog and two shards.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from collector.errors import ConfigError

DEFAULT_EMBEDDED_DIR = Path("~/.local/share/solarfleet/pg").expanduser()
EMBEDDED_CATALOG = "solarfleet_catalog"
EMBEDDED_SHARDS = (("shard-1", "solarfleet_shard_1"), ("shard-2", "solarfleet_shard_2"))

_SHARD_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SERVER_KEYS = (
    "host",
    "port",
    "max_batch_bytes",
    "shard_timeout",
    "auth_cache_seconds",
    "future_tolerance",
    "gateway_offline_after",
)
_DATABASE_KEYS = ("catalog", "embedded_dir")
_SHARD_KEYS = ("name", "dsn")
_ALERTS_KEYS = (
    "interval",
    "gateway_silent_after",
    "missed_polls",
    "night_power_w",
    "max_sleep",
    "peer_ratio",
    "peer_min_power_w",
    "power_window",
    "counter_window",
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP listener and request limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_bytes: int = 16 * 1024 * 1024  # after gzip decompression
    shard_timeout: float = 5.0  # seconds to wait for a shard connection
    auth_cache_seconds: float = 30.0  # how long a token lookup is reused
    # Seconds a reading's time may lie ahead of the collector's clock; later ones are
    # rejected and counted.
    future_tolerance: float = 300.0
    # Seconds without any reading or state of an installation that make a gap in
    # its data, reported as the gateway being offline.
    gateway_offline_after: float = 900.0


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """One shard database."""

    name: str
    dsn: str


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """Locations of the catalog and the shards. A `catalog` of None means embedded."""

    catalog: str | None = None
    embedded_dir: Path = DEFAULT_EMBEDDED_DIR
    shards: tuple[ShardConfig, ...] = ()

    @property
    def embedded(self) -> bool:
        """True when the collector runs its own PostgreSQL under `embedded_dir`."""
        return self.catalog is None


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """The alert evaluator's schedule and thresholds; `collector.alert_rules` uses them."""

    interval: float = 60.0  # seconds between two evaluations
    gateway_silent_after: float = 900.0  # seconds without any reading or state
    missed_polls: int = 5  # poll intervals a device may miss while others report
    night_power_w: float = 10.0  # AC power at or below which an inverter is idle
    # Seconds an inverter that went down asleep may stay down before it is alerted.
    max_sleep: float = 57_600.0
    peer_ratio: float = 0.5  # underperforming below this share of the peers' median
    peer_min_power_w: float = 200.0  # peers' median power that shows daylight
    power_window: float = 900.0  # seconds of mean AC power compared between peers
    counter_window: float = 3600.0  # seconds a counter jump or reset stays alerted


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """The whole collector configuration."""

    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    alerts: AlertsConfig = AlertsConfig()


def load(path: Path | str) -> CollectorConfig:
    """Read and check the collector config at `path`.

    :raises ConfigError: the file is missing, is not TOML, or a key is invalid.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} not found: check the path") from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not valid UTF-8 (byte {err.start}): "
            "save it as UTF-8"
        ) from err
    return parse(data)


def parse(data: dict[str, Any]) -> CollectorConfig:
    """Build a config from parsed TOML.

    :raises ConfigError: a key is unknown, missing or has an invalid value.
    """
    _check_keys("", data, ("server", "database", "shards", "alerts"))
    server = _parse_server(_table(data, "server"))
    database = _parse_database(_table(data, "database"), data.get("shards"))
    alerts = _parse_alerts(_table(data, "alerts"))
    return CollectorConfig(server=server, database=database, alerts=alerts)


def _parse_server(table: dict[str, Any]) -> ServerConfig:
    _check_keys("server", table, _SERVER_KEYS)
    defaults = ServerConfig()
    host = _string(table, "server", "host", defaults.host)
    port = _integer(table, "server", "port", defaults.port, 0, 65535)
    max_batch_bytes = _integer(
        table, "server", "max_batch_bytes", defaults.max_batch_bytes, 1024, 2**31
    )
    shard_timeout = _seconds(table, "server", "shard_timeout", defaults.shard_timeout)
    cache = _seconds(table, "server", "auth_cache_seconds", defaults.auth_cache_seconds)
    future = _seconds(table, "server", "future_tolerance", defaults.future_tolerance)
    offline = _seconds(
        table, "server", "gateway_offline_after", defaults.gateway_offline_after
    )
    return ServerConfig(
        host, port, max_batch_bytes, shard_timeout, cache, future, offline
    )


def _parse_alerts(table: dict[str, Any]) -> AlertsConfig:
    _check_keys("alerts", table, _ALERTS_KEYS)
    defaults = AlertsConfig()
    values: dict[str, Any] = {}
    for key in _ALERTS_KEYS:
        default = getattr(defaults, key)
        if key == "missed_polls":
            values[key] = _integer(table, "alerts", key, default, 1, 1000)
            continue
        value = table.get(key, default)
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not valid or not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"[alerts] {key} must be a positive number, got {value!r}"
            )
        values[key] = float(value)
    if values["peer_ratio"] >= 1:
        raise ConfigError(
            f"[alerts] peer_ratio must be below 1, got {values['peer_ratio']!r}"
        )
    return AlertsConfig(**values)


def _parse_database(table: dict[str, Any], shards: Any) -> DatabaseConfig:
    _check_keys("database", table, _DATABASE_KEYS)
    embedded_dir = Path(
        _string(table, "database", "embedded_dir", "") or DEFAULT_EMBEDDED_DIR
    ).expanduser()
    catalog = table.get("catalog")
    if catalog is None:
        if shards is not None:
            raise ConfigError(
                "[[shards]] needs a catalog: set [database] catalog, or remove every "
                "[[shards]] table to use the embedded PostgreSQL"
            )
        return DatabaseConfig(catalog=None, embedded_dir=embedded_dir)
    catalog = _string(table, "database", "catalog", "")
    if not catalog:
        raise ConfigError(
            "[database] catalog is empty: set a PostgreSQL connection string"
        )
    _check_dsn(catalog, "[database] catalog")
    return DatabaseConfig(catalog, embedded_dir, _parse_shards(shards))


def _parse_shards(shards: Any) -> tuple[ShardConfig, ...]:
    if not shards:
        raise ConfigError(
            "no [[shards]] table: add one [[shards]] table with name and dsn per shard"
        )
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ConfigError("shards must be an array of tables: write each as [[shards]]")
    parsed: list[ShardConfig] = []
    for index, table in enumerate(shards):
        where = f"shards[{index}]"
        _check_keys(where, table, _SHARD_KEYS)
        name = _string(table, where, "name", "")
        if not _SHARD_NAME.match(name):
            raise ConfigError(
                f"[{where}] name {name!r} is invalid: use 1-63 lowercase letters, "
                "digits, "
                "'-' or '_', starting with a letter or digit"
            )
        if any(shard.name == name for shard in parsed):
            raise ConfigError(
                f"[{where}] name {name!r} is used twice: give each shard its own"
            )
        dsn = _string(table, where, "dsn", "")
        if not dsn:
            raise ConfigError(
                f"[{where}] dsn is missing: set a PostgreSQL connection string"
            )
        _check_dsn(dsn, f"[{where}] dsn")
        parsed.append(ShardConfig(name, dsn))
    return tuple(parsed)


def _check_dsn(dsn: str, where: str) -> None:
    # libpq's message quotes part of the string, which may be a password, so it is
    # left out.
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as err:
        raise ConfigError(
            f"{where} is not a valid PostgreSQL connection string: write key=value "
            "pairs (host=db1 dbname=solarfleet) or a postgresql:// URI"
        ) from err


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table: write it as [{key}]")
    return value


def _check_keys(where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            place = f"[{where}] {key}" if where else key
            raise ConfigError(
                f"unknown key {place}: remove it or use one of {', '.join(known)}"
            )


def _string(table: dict[str, Any], where: str, key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"[{where}] {key} must be a string, got {value!r}")
    return value


def _integer(
    table: dict[str, Any], where: str, key: str, default: int, low: int, high: int
) -> int:
    value = table.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ConfigError(
            f"[{where}] {key} must be an integer from {low} to {high}, got {value!r}"
        )
    return value


def _seconds(table: dict[str, Any], where: str, key: str, default: float) -> float:
    value = table.get(key, default)
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"[{where}] {key} must be a positive number of seconds, got {value!r}"
        )
    return float(value)
