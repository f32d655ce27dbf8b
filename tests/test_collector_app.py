"""Read API, health and shard outages over real HTTP and real PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from collector.config import ShardConfig
from conftest import CollectorDatabases
from collector_http import (
    READINGS_A,
    T0,
    Fleet,
    add_fleet,
    make_batch,
    post,
    start_client,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config())
    yield client
    await client.close()


async def get(client: TestClient, path: str, key: str) -> tuple[int, dict]:
    response = await client.get(path, headers={"Authorization": f"Bearer {key}"})
    return response.status, await response.json()


async def test_latest_exact_values(client: TestClient, fleet: Fleet) -> None:
    states = [
        ["sn-1", T0, "online"],
        ["sn-1", T0 + 10_000, "sleeping"],
        ["sn-2", T0, "offline"],
    ]
    await post(client, fleet.token_a, make_batch("gw-a", READINGS_A, states=states))
    older = [["sn-1", "701.W", T0 - 60_000, 1.0]]
    await post(client, fleet.token_a, make_batch("gw-a", older))

    status, reply = await get(
        client,
        f"/api/v1/installations/{fleet.installation_a}/latest",
        fleet.operator_key,
    )

    assert status == 200
    assert reply == {
        "installation_id": fleet.installation_a,
        "devices": [
            {
                "device_id": "sn-1",
                "name": "inverter sn-1",
                "state": "sleeping",
                "state_time": T0 + 10_000,
            },
            {
                "device_id": "sn-2",
                "name": "inverter sn-2",
                "state": "offline",
                "state_time": T0,
            },
        ],
        "channels": [
            {
                "device_id": "sn-1",
                "channel": "701.PhVphB",
                "unit": "V",
                "time": T0,
                "value": None,
            },
            {
                "device_id": "sn-1",
                "channel": "701.W",
                "unit": "W",
                "time": T0 + 10_000,
                "value": 9750.5,
            },
            {
                "device_id": "sn-2",
                "channel": "160.module[2].DCW",
                "unit": "W",
                "time": T0,
                "value": 1234.0,
            },
        ],
    }


async def test_latest_other_installation_empty(
    client: TestClient, fleet: Fleet
) -> None:
    await post(client, fleet.token_a, make_batch("gw-a", READINGS_A))

    status, reply = await get(
        client,
        f"/api/v1/installations/{fleet.installation_b}/latest",
        fleet.operator_key,
    )

    assert status == 200
    assert reply == {
        "installation_id": fleet.installation_b,
        "devices": [],
        "channels": [],
    }


async def test_latest_needs_operator_key(client: TestClient, fleet: Fleet) -> None:
    path = f"/api/v1/installations/{fleet.installation_a}/latest"

    status, reply = await get(client, path, fleet.token_a)

    assert status == 401
    assert reply == {"error": "unknown or revoked API key: create one with `keys add`"}


@pytest.mark.parametrize(
    ("installation", "expected"),
    [
        ("999", "installation 999 not found"),
        ("abc", "installation 'abc' not found: ids are positive integers"),
    ],
)
async def test_latest_unknown_installation(
    client: TestClient, fleet: Fleet, installation: str, expected: str
) -> None:
    status, reply = await get(
        client, f"/api/v1/installations/{installation}/latest", fleet.operator_key
    )

    assert status == 404
    assert reply == {"error": expected}


async def test_unknown_route_json_error(client: TestClient) -> None:
    response = await client.get("/api/v1/nothing")

    assert response.status == 404
    assert await response.json() == {"error": "Not Found"}


async def test_shard_down_only_its_installations(fleet: Fleet, proxy_factory) -> None:
    proxy = proxy_factory(fleet.dbs.shard_dsn("shard-2"))
    shards = (fleet.dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    config = fleet.dbs.config(shard_timeout=2.0)
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    client = await start_client(config)
    try:
        proxy.stop()
        down = await post(client, fleet.token_b, make_batch("gw-b", READINGS_A))
        other = await post(client, fleet.token_a, make_batch("gw-a", READINGS_A))
        health = await (await client.get("/healthz")).json()
        proxy.start()
        retried = await post(client, fleet.token_b, make_batch("gw-b", READINGS_A))
    finally:
        await client.close()

    assert down == (503, {"error": "shard shard-2 is unavailable, retry later"})
    assert other[0] == 200
    assert health["status"] == "degraded"
    assert health["shards"]["shard-1"]["reachable"] is True
    assert health["shards"]["shard-2"]["reachable"] is False
    assert retried[0] == 200
    assert retried[1]["stored"] == 4


async def test_shard_lost_mid_connection(fleet: Fleet, proxy_factory) -> None:
    proxy = proxy_factory(fleet.dbs.shard_dsn("shard-2"))
    shards = (fleet.dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    config = fleet.dbs.config(shard_timeout=3.0)
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    client = await start_client(config)
    try:
        first = await post(client, fleet.token_b, make_batch("gw-b", READINGS_A[:1]))
        proxy.stop()  # cuts the pooled connection
        proxy.start()
        second = await post(client, fleet.token_b, make_batch("gw-b", READINGS_A[1:]))
    finally:
        await client.close()

    assert first[0] == 200
    assert second == (
        200,
        {
            "batch_id": second[1]["batch_id"],
            "stored": 3,
            "duplicates": 0,
            "rejected": 0,
        },
    )
