"""GET /api/v1/alerts over real HTTP and PostgreSQL shards."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from collector import alerts, catalog
from collector.config import AlertsConfig, CollectorConfig, ShardConfig
from collector.sharding import ShardPools
from collector_http import Fleet, add_fleet, start_client
from conftest import CollectorDatabases
from test_alerts import MIN, T0, poll, polls, store

pytestmark = pytest.mark.postgres


@dataclasses.dataclass(frozen=True)
class AlertFleet:
    """Alice's installations A (shard-1) and B (shard-2), Bob's C (shard-1), keys."""

    fleet: Fleet
    installation_c: int
    alice_key: str
    bob_key: str


def quiet_config(dbs: CollectorDatabases, **shard_dsns: str) -> CollectorConfig:
    """A config whose background evaluator does not run during a test."""
    config = dbs.config()
    shards = tuple(
        ShardConfig(s.name, shard_dsns.get(s.name.replace("-", "_"), s.dsn))
        for s in config.database.shards
    )
    return dataclasses.replace(
        config,
        alerts=AlertsConfig(interval=3600.0),
        database=dataclasses.replace(config.database, shards=shards),
    )


@pytest.fixture
async def alert_fleet(collector_databases: CollectorDatabases) -> AlertFleet:
    """The fleet with alerts: a fault on A and C, and B's gateway silent."""
    dbs = collector_databases
    fleet = add_fleet(dbs)
    bob = catalog.add_owner(dbs.catalog_dsn, "Bob Keller")
    site_c = catalog.add_installation(dbs.catalog_dsn, "Shed C", bob.id, "shard-1")
    _, alice_key = catalog.add_key(dbs.catalog_dsn, "alice", owner_id=1)
    _, bob_key = catalog.add_key(dbs.catalog_dsn, "bob", owner_id=bob.id)
    shard_1, shard_2 = dbs.shard_dsn("shard-1"), dbs.shard_dsn("shard-2")

    await store(shard_2, fleet.installation_b, polls("sn-b", T0, T0 + MIN))
    fault = {"103_St": 7.0}
    await store(shard_1, fleet.installation_a, polls("sn-a", T0, T0 + MIN, **fault))
    await store(shard_1, site_c.id, polls("sn-c", T0, T0 + MIN, **fault))
    pools = ShardPools(dbs.shards, 2.0)
    await pools.open()
    evaluator = alerts.AlertEvaluator(pools, AlertsConfig())
    await evaluator.evaluate(T0 + MIN)
    # A's fault clears; A and C keep reporting while B stays silent.
    later = T0 + 20 * MIN
    await store(shard_1, fleet.installation_a, [poll("sn-a", later, **{"103_St": 4.0})])
    await store(shard_1, site_c.id, [poll("sn-c", later, **fault)])
    await evaluator.evaluate(T0 + 20 * MIN)
    await pools.close()
    return AlertFleet(fleet, site_c.id, alice_key, bob_key)


@pytest.fixture
async def client(alert_fleet: AlertFleet) -> AsyncIterator[TestClient]:
    client = await start_client(quiet_config(alert_fleet.fleet.dbs))
    yield client
    await client.close()


async def get_alerts(
    client: TestClient, key: str, **params: str
) -> tuple[int, dict[str, Any]]:
    response = await client.get(
        "/api/v1/alerts", params=params, headers={"Authorization": f"Bearer {key}"}
    )
    return response.status, await response.json()


def summary(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (a["installation_id"], a["device_id"], a["kind"], a["state"], a["opened_ms"],
         a["resolved_ms"])
        for a in body["alerts"]
    ]


async def test_alerts_operator_sees_open(
    client: TestClient, alert_fleet: AlertFleet
) -> None:
    fleet = alert_fleet.fleet
    status, body = await get_alerts(client, fleet.operator_key)
    assert status == 200
    assert summary(body) == [
        (fleet.installation_b, None, "gateway-silent", "open", T0 + 20 * MIN, None),
        (alert_fleet.installation_c, "sn-c", "inverter-fault", "open", T0 + MIN, None),
    ]
    assert body["missing"] == []
    first = body["alerts"][0]
    assert first["severity"] == "critical"
    assert first["details"] == {"last_ms": T0 + 50_000}
    assert len(first["id"]) == 36  # a UUID, unique across shards


async def test_alerts_state_filters(
    client: TestClient, alert_fleet: AlertFleet
) -> None:
    fleet = alert_fleet.fleet
    resolved_a = (fleet.installation_a, "sn-a", "inverter-fault", "resolved",
                  T0 + MIN, T0 + 20 * MIN)
    _, body = await get_alerts(client, fleet.operator_key, state="resolved")
    assert summary(body) == [resolved_a]
    _, body = await get_alerts(client, fleet.operator_key, state="all")
    assert len(body["alerts"]) == 3
    _, body = await get_alerts(
        client, fleet.operator_key, state="all",
        installation_id=str(fleet.installation_a),
    )
    assert summary(body) == [resolved_a]
    status, body = await get_alerts(client, fleet.operator_key, state="closed")
    assert status == 400
    assert body == {"error": "state='closed' is invalid: use open, resolved or all"}


async def test_alerts_owner_scoped(
    client: TestClient, alert_fleet: AlertFleet
) -> None:
    fleet = alert_fleet.fleet
    _, body = await get_alerts(client, alert_fleet.alice_key, state="all")
    assert {a["installation_id"] for a in body["alerts"]} == {
        fleet.installation_a, fleet.installation_b
    }
    _, body = await get_alerts(client, alert_fleet.bob_key)
    assert [a["installation_id"] for a in body["alerts"]] == [
        alert_fleet.installation_c
    ]


async def test_alerts_owner_denied(
    client: TestClient, alert_fleet: AlertFleet
) -> None:
    for installation_id in (str(alert_fleet.fleet.installation_a), "999"):
        status, body = await get_alerts(
            client, alert_fleet.bob_key, installation_id=installation_id
        )
        assert status == 403
        assert body == {
            "error": f"key 'bob' may not read installation '{installation_id}'"
        }
    status, body = await get_alerts(client, "not-a-key")
    assert status == 401
    assert list(body) == ["error"]


async def test_alerts_shard_down_partial(
    alert_fleet: AlertFleet, proxy_factory: Any
) -> None:
    dbs = alert_fleet.fleet.dbs
    proxy = proxy_factory(dbs.shard_dsn("shard-2"))
    client = await start_client(quiet_config(dbs, shard_2=proxy.dsn))
    try:
        proxy.stop()
        status, body = await get_alerts(
            client, alert_fleet.fleet.operator_key, state="all"
        )
    finally:
        await client.close()
    assert status == 200
    # Both were opened at the same time, so their order is the ids' order.
    assert sorted(a["installation_id"] for a in body["alerts"]) == [
        alert_fleet.fleet.installation_a, alert_fleet.installation_c
    ]
    assert [(m["shard"], m["installation_ids"]) for m in body["missing"]] == [
        ("shard-2", [alert_fleet.fleet.installation_b])
    ]
