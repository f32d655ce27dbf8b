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
        "device inv sn-b (sn-b) is not reporting while its gateway does: no answer "
        "from the device since 2025-12-04 16:00 UTC"
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
    more = polls("sn-a", T0 + 170 * S, T0 + 4 * MIN, **{"103_W": 3000.0})
    await store(shard_1, SITE, more)
    await evaluator.evaluate(T0 + 4 * MIN)
    assert rows(shard_1) == [(SITE, "sn-b", "device-not-reporting", T0 + 4 * MIN, None)]
    assert messages(shard_1) == [
        "device inv sn-b (sn-b) is not reporting while its gateway does: no reading "
        "or state since 2025-12-04 16:00 UTC"
    ]


async def test_fault_and_alarm_open_resolve(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    faulted = {"103_St": 7.0, "103_Evt1": 0b1000_0001, "103_W": 0.0}
    await store(shard_1, SITE, polls("sn-1", T0, T0 + MIN, **faulted))
    await store(shard_1, SITE, polls("sn-2", T0, T0 + MIN, **{"701_InvSt": 6.0}))
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(T0 + MIN)
    assert rows(shard_1) == [
        (SITE, "sn-1", "inverter-alarm", T0 + MIN, None),
        (SITE, "sn-1", "inverter-fault", T0 + MIN, None),
        (SITE, "sn-2", "inverter-fault", T0 + MIN, None),
    ]
    assert messages(shard_1) == [
        "inverter inv sn-1 (sn-1) reports alarms: 103.Evt1 GROUND_FAULT, OVER_TEMP",
        "inverter inv sn-1 (sn-1) reports 103.St = FAULT (7)",
        "inverter inv sn-2 (sn-2) reports 701.InvSt = FAULT (6)",
    ]

    cleared = {"103_St": 4.0, "103_Evt1": 0.0, "103_W": 2000.0}
    await store(shard_1, SITE, [poll("sn-1", T0 + MIN, **cleared)])
    await evaluator.evaluate(T0 + MIN + 10 * S)
    assert rows(shard_1) == [
        (SITE, "sn-1", "inverter-alarm", T0 + MIN, T0 + MIN + 10 * S),
        (SITE, "sn-1", "inverter-fault", T0 + MIN, T0 + MIN + 10 * S),
        (SITE, "sn-2", "inverter-fault", T0 + MIN, None),
    ]


async def test_counter_jump_opens_resolves(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    # 3000 W for 10 s allows a rise of at most 16.7 Wh (2 x the maximum power).
    energy = [
        poll("sn-1", T0 + i * 10 * S, **{"103_W": 3000.0, "103_WH": 1000.0 + 8 * i})
        for i in range(6)
    ]
    energy.append(poll("sn-1", T0 + MIN, **{"103_W": 3000.0, "103_WH": 900_000.0}))
    await store(shard_1, SITE, energy)
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(T0 + 2 * MIN)
    assert rows(shard_1) == [(SITE, "sn-1", "energy-counter", T0 + 2 * MIN, None)]
    assert messages(shard_1) == [
        "device inv sn-1 (sn-1): energy counter 103.WH jump from 1040 to 900000 Wh "
        "at 2025-12-04 16:01 UTC (1 in the last 1 h)"
    ]

    # One hour after the jump it leaves the counter window.
    later = T0 + 61 * MIN
    last = poll("sn-1", later, **{"103_W": 0.0, "103_WH": 900_010.0})
    await store(shard_1, SITE, [last])
    await evaluator.evaluate(later + S)
    assert [r[2:] for r in rows(shard_1)] == [
        ("energy-counter", T0 + 2 * MIN, later + S)
    ]


async def test_underperforming_opens_resolves(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    start, end = T0, T0 + 15 * MIN
    await store(shard_1, SITE, polls("sn-a", start, end, **{"103_W": 3000.0}))
    await store(shard_1, SITE, polls("sn-b", start, end, **{"103_W": 2800.0}))
    await store(shard_1, SITE, polls("sn-c", start, end, **{"103_W": 1000.0}))
    evaluator = alerts.AlertEvaluator(pools, settings)

    await evaluator.evaluate(end)
    assert rows(shard_1) == [(SITE, "sn-c", "underperforming", end, None)]
    assert messages(shard_1) == [
        "inverter inv sn-c (sn-c) produces 34% of the median of 2 other inverters "
        "on the site (1000 W mean over 15 min, compared in W)"
    ]

    later = end + 15 * MIN
    await store(shard_1, SITE, polls("sn-a", end, later, **{"103_W": 3000.0}))
    await store(shard_1, SITE, polls("sn-b", end, later, **{"103_W": 2800.0}))
    await store(shard_1, SITE, polls("sn-c", end, later, **{"103_W": 2500.0}))
    await evaluator.evaluate(later)
    assert rows(shard_1) == [(SITE, "sn-c", "underperforming", end, later)]


async def test_night_sleep_opens_nothing(
    pools: ShardPools, shard_1: str, settings: AlertsConfig
) -> None:
    # Dusk: both inverters fall to a few watts, then sleep. sn-b then powers down
    # and stops responding, so the gateway reports it offline all night.
    dusk = {"103_W": 5.0, "103_St": 4.0}
    night = {"103_W": 0.0, "103_St": 2.0}
    await store(
        shard_1, SITE,
        polls("sn-a", T0, T0 + MIN, **dusk)
        + polls("sn-a", T0 + MIN, T0 + 10 * 3600 * S, step=MIN, state="sleeping",
                **night),
    )
    await store(
        shard_1, SITE,
        polls("sn-b", T0, T0 + MIN, **dusk)
        + polls("sn-b", T0 + MIN, T0 + 2 * MIN, state="sleeping", **night)
        + polls("sn-b", T0 + 2 * MIN, T0 + 10 * 3600 * S, step=MIN, state="offline"),
    )
    evaluator = alerts.AlertEvaluator(pools, settings)

    for hour in (1, 5, 10):
        result = await evaluator.evaluate(T0 + hour * 3600 * S)
        assert result["shard-1"].opened == ()
    assert rows(shard_1) == []

    # At dawn sn-a produces again while sn-b stays offline: now it is an outage.
    dawn = T0 + 10 * 3600 * S
    await store(shard_1, SITE, polls("sn-a", dawn, dawn + MIN, **{"103_W": 900.0}))
    await store(shard_1, SITE, polls("sn-b", dawn, dawn + MIN, state="offline"))
    await evaluator.evaluate(dawn + MIN)
    assert rows(shard_1) == [(SITE, "sn-b", "device-not-reporting", dawn + MIN, None)]


async def test_shard_down_spares_others(
    collector_databases: CollectorDatabases,
    proxy_factory: Any,
    shard_1: str,
    settings: AlertsConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shard_2 = collector_databases.shard_dsn("shard-2")
    await store(shard_1, SITE, polls("sn-1", T0, T0 + MIN, **{"103_St": 7.0}))
    await store(shard_2, OTHER_SITE, polls("sn-9", T0, T0 + MIN, **{"103_St": 7.0}))
    proxy = proxy_factory(shard_2)
    shards = (ShardConfig("shard-1", shard_1), ShardConfig("shard-2", proxy.dsn))
    pools = ShardPools(shards, 1.0)
    await pools.open()
    evaluator = alerts.AlertEvaluator(pools, settings)
    proxy.stop()

    caplog.set_level(logging.WARNING, logger="collector.alerts")
    first = await evaluator.evaluate(T0 + MIN)
    second = await evaluator.evaluate(T0 + MIN + 10 * S)
    await pools.close()

    assert rows(shard_1) == [(SITE, "sn-1", "inverter-fault", T0 + MIN, None)]
    assert rows(shard_2) == []
    assert first["shard-2"].error is not None
    assert second["shard-2"].error is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == "collector.alerts"]
    assert len(warnings) == 1
    assert warnings[0].startswith("shard shard-2 (alert evaluation) unavailable: ")


def test_bit_names_from_definitions() -> None:
    assert alert_rules.bit_names(701, "Alrm", 1 << 16 | 1 << 3) == [
        "DC_DISCONNECT", "MANUFACTURER_ALRM"
    ]
    assert alert_rules.bit_names(103, "Evt1", 1 << 20) == ["bit 20"]
    assert alert_rules.symbol_value(103, "St", "FAULT") == 7
    assert alert_rules.symbol_value(701, "InvSt", "FAULT") == 6
