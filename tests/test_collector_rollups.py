"""Rollups kept at ingest: resent and out-of-order batches, null values, resolutions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from collector_http import T0, Fleet, add_fleet, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

S = 1_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config())
    yield client
    await client.close()


def watts(*points: tuple[int, float | None]) -> list[list[Any]]:
    return [["sn-1", "701.W", T0 + s * S, value] for s, value in points]


def rollup_rows(dsn: str, table: str) -> list[tuple[Any, ...]]:
    """Rows of a rollup table as (bucket ms, count, sum, min, max, first time ms,
    first value, last time ms, last value)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT bucket, count, sum, min, max, first_time, first_value, "
            f"last_time, last_value FROM {table} ORDER BY channel_id, bucket"
        ).fetchall()
    return [
        (ms(r[0]), r[1], r[2], r[3], r[4], ms(r[5]), r[6], ms(r[7]), r[8])
        for r in rows
    ]


def ms(time: datetime) -> int:
    return (time - EPOCH) // timedelta(milliseconds=1)


async def send(client: TestClient, fleet: Fleet, batch: dict[str, Any]) -> None:
    status, body = await post(client, fleet.token_a, batch)
    assert status == 200, body


async def test_rollups_resent_and_reordered(client: TestClient, fleet: Fleet) -> None:
    late = make_batch("gw-a", watts((310, 50.0), (320, None)))
    early = make_batch("gw-a", watts((0, 100.0), (10, 300.0)))
    overlap = make_batch("gw-a", watts((10, 300.0), (5, 500.0)))
    await send(client, fleet, late)
    await send(client, fleet, early)
    await send(client, fleet, early)  # the same batch id again
    await send(client, fleet, overlap)  # one reading stored before, one new

    shard = fleet.dbs.shard_dsn("shard-1")
    assert rollup_rows(shard, "rollup_5m") == [
        (T0, 3, 900.0, 100.0, 500.0, T0, 100.0, T0 + 10 * S, 300.0),
        (T0 + 300 * S, 1, 50.0, 50.0, 50.0, T0 + 310 * S, 50.0, T0 + 310 * S, 50.0),
    ]
    assert rollup_rows(shard, "rollup_1h") == [
        (T0, 4, 950.0, 50.0, 500.0, T0, 100.0, T0 + 310 * S, 50.0),
    ]
    day = T0 - 16 * 3_600_000  # T0 is 16:00 UTC
    assert rollup_rows(shard, "rollup_1d") == [
        (day, 4, 950.0, 50.0, 500.0, T0, 100.0, T0 + 310 * S, 50.0),
    ]


async def test_rollups_null_only_bucket(client: TestClient, fleet: Fleet) -> None:
    await send(client, fleet, make_batch("gw-a", watts((0, None), (10, None))))

    assert rollup_rows(fleet.dbs.shard_dsn("shard-1"), "rollup_5m") == []


async def test_rollups_other_shard_untouched(
    client: TestClient, fleet: Fleet
) -> None:
    await send(client, fleet, make_batch("gw-a", watts((0, 1.0))))

    assert rollup_rows(fleet.dbs.shard_dsn("shard-2"), "rollup_5m") == []
    assert len(rollup_rows(fleet.dbs.shard_dsn("shard-1"), "rollup_1d")) == 1


async def test_rollups_bucket_edges(client: TestClient, fleet: Fleet) -> None:
    edge = [["sn-1", "701.W", T0 + ms_, value]
            for ms_, value in ((299_999, 7.0), (300_000, 8.0))]
    await send(client, fleet, make_batch("gw-a", edge))

    shard = fleet.dbs.shard_dsn("shard-1")
    assert [row[0] for row in rollup_rows(shard, "rollup_5m")] == [T0, T0 + 300 * S]
    assert [row[0] for row in rollup_rows(shard, "rollup_1d")] == [
        T0 - 16 * 3_600_000
    ]


async def test_rollups_first_last_by_time(client: TestClient, fleet: Fleet) -> None:
    await send(client, fleet, make_batch("gw-a", watts((20, 2.0), (0, 4.0), (10, None))))

    assert rollup_rows(fleet.dbs.shard_dsn("shard-1"), "rollup_5m") == [
        (T0, 2, 6.0, 2.0, 4.0, T0, 4.0, T0 + 20 * S, 2.0),
    ]
