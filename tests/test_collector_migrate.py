"""Schema migrations and on-demand readings partitions on real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import pytest

from collector import migrate
from collector.config import ShardConfig
from collector.errors import DatabaseError
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

CATALOG_MIGRATIONS = ["0001_catalog", "0002_key_owners"]
SHARD_MIGRATIONS = ["0001_shard", "0002_gaps", "0003_rollups", "0004_alerts"]


def tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            row[0]
            for row in conn.execute(
                "SELECT relname FROM pg_class WHERE relkind IN ('r', 'p') "
                "AND relnamespace = 'public'::regnamespace ORDER BY relname"
            )
        ]


def test_migrate_catalog_creates_tables(empty_databases: CollectorDatabases) -> None:
    applied = migrate.migrate(empty_databases.catalog_dsn, "catalog")

    assert [m.label for m in applied] == CATALOG_MIGRATIONS
    assert tables(empty_databases.catalog_dsn) == [
        "gateways",
        "installations",
        "keys",
        "owners",
        "schema_migrations",
        "shards",
    ]


def test_migrate_shard_creates_tables(empty_databases: CollectorDatabases) -> None:
    dsn = empty_databases.shard_dsn("shard-1")

    applied = migrate.migrate(dsn, "shard")

    assert [m.label for m in applied] == SHARD_MIGRATIONS
    assert tables(dsn) == [
        "alerts",
        "batches",
        "channels",
        "device_states",
        "devices",
        "gaps",
        "readings",
        "rollup_1d",
        "rollup_1h",
        "rollup_5m",
        "schema_migrations",
    ]


def test_migrate_all_idempotent(empty_databases: CollectorDatabases) -> None:
    dbs = migrate.Databases(empty_databases.catalog_dsn, empty_databases.shards)

    first = migrate.migrate_all(dbs)
    second = migrate.migrate_all(dbs)

    assert {name: [m.label for m in ms] for name, ms in first.items()} == {
        "catalog": CATALOG_MIGRATIONS,
        "shard-1": SHARD_MIGRATIONS,
        "shard-2": SHARD_MIGRATIONS,
    }
    assert second == {"catalog": [], "shard-1": [], "shard-2": []}
    with psycopg.connect(empty_databases.catalog_dsn) as conn:
        shards = conn.execute("SELECT id, name FROM shards ORDER BY id").fetchall()
    assert shards == [(1, "shard-1"), (2, "shard-2")]


def test_migrate_concurrent_applies_once(empty_databases: CollectorDatabases) -> None:
    dsn = empty_databases.catalog_dsn
    results: list[int] = []

    def run() -> None:
        results.append(len(migrate.migrate(dsn, "catalog")))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Each file is applied in its own transaction, so different runners may apply
    # different files; together they apply each file exactly once.
    assert sum(results) == len(CATALOG_MIGRATIONS)
    with psycopg.connect(dsn) as conn:
        versions = [row[0] for row in conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, len(CATALOG_MIGRATIONS) + 1))


def test_migrate_unreachable_database() -> None:
    with pytest.raises(DatabaseError, match=r"^cannot migrate shard database .*port=1"):
        migrate.migrate("host=127.0.0.1 port=1 dbname=x connect_timeout=2", "shard")


def test_migrate_all_skips_unreachable_shard(
    empty_databases: CollectorDatabases, caplog: pytest.LogCaptureFixture
) -> None:
    shards = (
        empty_databases.shards[0],
        ShardConfig("shard-9", "host=127.0.0.1 port=1 dbname=x"),
    )
    dbs = migrate.Databases(empty_databases.catalog_dsn, shards)

    applied = migrate.migrate_all(dbs, skip_unreachable_shards=True)

    assert list(applied) == ["catalog", "shard-1"]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "collector.migrate" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith("shard shard-9 left unmigrated: cannot migrate")


def partition_bounds(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'readings'::regclass ORDER BY 1"
        ).fetchall()


def test_partition_bounds_are_utc_months(
    collector_databases: CollectorDatabases,
) -> None:
    dsn = collector_databases.shard_dsn("shard-2")
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'America/New_York'")
        name = conn.execute(
            "SELECT ensure_readings_partition(%s)",
            (datetime(2026, 3, 31, 23, 30, tzinfo=UTC),),
        ).fetchone()

    assert name == ("readings_2026_03",)
    assert (
        "readings_2026_03",
        "FOR VALUES FROM ('2026-03-01 00:00:00+00') TO ('2026-04-01 00:00:00+00')",
    ) in partition_bounds(dsn)


def test_partition_concurrent_create_once(
    collector_databases: CollectorDatabases,
) -> None:
    dsn = collector_databases.shard_dsn("shard-1")
    at = datetime(2030, 7, 15, tzinfo=UTC)
    start = threading.Barrier(8)
    errors: list[Exception] = []

    def create() -> None:
        try:
            with psycopg.connect(dsn) as conn:
                start.wait()
                conn.execute("SELECT ensure_readings_partition(%s)", (at,))
        except Exception as err:  # collected and asserted empty below
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [name for name, _ in partition_bounds(dsn)].count("readings_2030_07") == 1
