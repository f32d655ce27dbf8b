"""`GET /healthz`: per-database reachability and latency over real PostgreSQL."""

from __future__ import annotations

import dataclasses

import pytest

from collector.config import ShardConfig
from collector_http import Fleet, add_fleet, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


def _latency(entry: dict) -> float:
    assert set(entry) == {"reachable", "latency_ms"}
    assert entry["reachable"] is True
    return entry["latency_ms"]


async def test_health_all_reachable(fleet: Fleet) -> None:
    client = await start_client(fleet.dbs.config())
    try:
        response = await client.get("/healthz")
        body = await response.json()
    finally:
        await client.close()

    assert response.status == 200
    assert body["status"] == "ok"
    assert set(body["shards"]) == {"shard-1", "shard-2"}
    assert 0 <= _latency(body["catalog"]) < 1000
    assert 0 <= _latency(body["shards"]["shard-1"]) < 1000
    assert 0 <= _latency(body["shards"]["shard-2"]) < 1000


async def test_health_shard_down_degraded(fleet: Fleet, proxy_factory) -> None:
    proxy = proxy_factory(fleet.dbs.shard_dsn("shard-2"))
    shards = (fleet.dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    config = fleet.dbs.config(shard_timeout=1.0)
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    client = await start_client(config)
    try:
        proxy.stop()
        down = await client.get("/healthz")
        down_body = await down.json()
        proxy.start()
        up = await client.get("/healthz")
        up_body = await up.json()
    finally:
        await client.close()

    assert down.status == 503
    assert down_body["status"] == "degraded"
    assert down_body["shards"]["shard-2"] == {
        "reachable": False,
        "latency_ms": None,
        "error": "shard shard-2 is unavailable, retry later",
    }
    assert _latency(down_body["shards"]["shard-1"]) >= 0
    assert _latency(down_body["catalog"]) >= 0
    assert up.status == 200
    assert up_body["status"] == "ok"
    assert _latency(up_body["shards"]["shard-2"]) >= 0
