"""The alert evaluator on real PostgreSQL shards, with injected evaluation times."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from collector import alert_rules, alerts, ingest
from collector import batch as wire
from collector.config import AlertsConfig, ShardConfig
from collector.sharding import ShardPools
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

T0 = 1_764_864_000_000  # 2025-12-04 16:00:00 UTC
S = 1_000
MIN = 60 * S
SITE = 7  # installation id on shard-1
OTHER_SITE = 8  # installation id on shard-2

Poll = tuple[str, int, str, dict[str, float | None]]


def poll(device: str, time_ms: int, state: str = "online", **values: float) -> Poll:
    """One poll of a device; keyword names are channel names with `_` for `.`."""
    channels = {name.replace("_", ".", 1): value for name, value in values.items()}
    return device, time_ms, state, channels


def polls(
    device: str, start: int, end: int, step: int = 10 * S, state: str = "online",
    **values: float,
) -> list[Poll]:
    return [poll(device, t, state, **values) for t in range(start, end, step)]


def _unit(name: str) -> str | None:
    return {"W": "W", "WH": "Wh", "WRtg": "W"}.get(name.rsplit(".", 1)[1])


def batch_of(items: list[Poll]) -> wire.Batch:
    devices = sorted({item[0] for item in items})
    channels = sorted({(item[0], name) for item in items for name in item[3]})
    body = {
        "format": 1,
        "batch_id": f"b-{items[0][0]}-{items[0][1]}-{len(items)}",
        "gateway_id": "gw",
        "devices": [{"device_id": d, "name": f"inv {d}"} for d in devices],
        "channels": [
            {"device_id": d, "name": c, "unit": _unit(c)} for d, c in channels
        ],
        "readings": [
            [d, name, t, value] for d, t, _, values in items
            for name, value in values.items()
        ],
        "states": [[d, t, state] for d, t, state, _ in items],
    }
    return wire.parse(json.dumps(body).encode(), T0 + 1000 * 86_400_000, 300_000)


async def store(dsn: str, installation_id: int, items: list[Poll]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await ingest.store_batch(conn, installation_id, batch_of(items))


@pytest.fixture
def settings() -> AlertsConfig:
    return AlertsConfig()


@pytest.fixture
async def pools(collector_databases: CollectorDatabases) -> AsyncIterator[ShardPools]:
    pools = ShardPools(collector_databases.shards, 2.0)
    await pools.open()
    yield pools
    await pools.close()


@pytest.fixture
def shard_1(collector_databases: CollectorDatabases) -> str:
    return collector_databases.shard_dsn("shard-1")


def rows(dsn: str) -> list[tuple[Any, ...]]:
    """Every alert: installation, device identity, kind, opened and resolved ms."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT a.installation_id, d.device_id, a.kind, "
            "(extract(epoch FROM a.opened_at) * 1000)::bigint, "
            "(extract(epoch FROM a.resolved_at) * 1000)::bigint "
            "FROM alerts a LEFT JOIN devices d ON d.id = a.device_id "
            "ORDER BY a.opened_at, a.kind, d.device_id"
        ).fetchall()


def messages(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT message FROM alerts ORDER BY kind")]


async def test_gateway_silent_opens_resolves(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    await store(shard_1, SITE, polls("sn-1", T0, T0 + MIN, **{"103_W": 3000.0}))
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(T0 + 15 * MIN)  # 15 min after the last poll at T0+50s
    assert rows(shard_1) == []
    await evaluator.evaluate(T0 + 16 * MIN)
    assert rows(shard_1) == [(SITE, None, "gateway-silent", T0 + 16 * MIN, None)]
    assert messages(shard_1) == [
        "gateway of installation 7 silent since 2025-12-04 16:00 UTC: no reading "
        "or device state for 15 min"
    ]

    await store(shard_1, SITE, [poll("sn-1", T0 + 17 * MIN, **{"103_W": 3000.0})])
    result = await evaluator.evaluate(T0 + 17 * MIN + 10 * S)
    assert rows(shard_1) == [
        (SITE, None, "gateway-silent", T0 + 16 * MIN, T0 + 17 * MIN + 10 * S)
    ]
    assert [c.kind for c in result["shard-1"].resolved] == ["gateway-silent"]
    assert result["shard-1"].opened == ()


async def test_device_offline_opens_resolves(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    await store(shard_1, SITE, polls("sn-a", T0, T0 + 3 * MIN, **{"103_W": 3000.0}))
    await store(
        shard_1, SITE,
        polls("sn-b", T0, T0 + MIN, **{"103_W": 2900.0})
        + polls("sn-b", T0 + MIN, T0 + 3 * MIN, state="offline"),
    )
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(T0 + 3 * MIN)
    assert rows(shard_1) == [(SITE, "sn-b", "device-not-reporting", T0 + 3 * MIN, None)]
    assert messages(shard_1) == [
        "device inv sn-b (sn-b) is not reporting while its gateway does: reported "
        "offline since 2025-12-04 16:00 UTC"
    ]

    await store(shard_1, SITE, [poll("sn-b", T0 + 3 * MIN, **{"103_W": 2900.0})])
    await evaluator.evaluate(T0 + 3 * MIN + 5 * S)
    assert rows(shard_1) == [
        (SITE, "sn-b", "device-not-reporting", T0 + 3 * MIN, T0 + 3 * MIN + 5 * S)
    ]


async def test_device_without_data_opens(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    # Polls every 10 s: 5 missed polls are 50 s, below the 2 minute floor.
    await store(shard_1, SITE, polls("sn-b", T0, T0 + MIN, **{"103_W": 2900.0}))
    await store(shard_1, SITE, polls("sn-a", T0, T0 + 170 * S, **{"103_W": 3000.0}))
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(T0 + 170 * S)  # sn-b silent for 110 s
    assert rows(shard_1) == []
    await store(shard_1, SITE, polls("sn-a", T0 + 170 * S, T0 + 4 * MIN, **{"103_W": 3000.0}))
    await evaluator.evaluate(T0 + 4 * MIN)
    assert rows(shard_1) == [(SITE, "sn-b", "device-not-reporting", T0 + 4 * MIN, None)]
    assert messages(shard_1) == [
        "device inv sn-b (sn-b) is not reporting while its gateway does: no reading "
        "or state since 2025-12-04 16:00 UTC"
    ]
