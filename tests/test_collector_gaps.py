"""The gaps and energy read routes over real HTTP and PostgreSQL shards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from collector_http import T0, Fleet, add_fleet, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

S = 1_000  # one second in milliseconds


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config(gateway_offline_after=60.0))
    yield client
    await client.close()


async def get(
    client: TestClient, key: str, path: str, start: int, end: int
) -> tuple[int, dict[str, Any]]:
    response = await client.get(
        path,
        params={"from": str(start), "to": str(end)},
        headers={"Authorization": f"Bearer {key}"},
    )
    return response.status, await response.json()


def polls(*seconds: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Readings and online states of sn-1 at T0 + each of `seconds`."""
    readings = [["sn-1", "701.W", T0 + s * S, 100.0] for s in seconds]
    states = [["sn-1", T0 + s * S, "online"] for s in seconds]
    return readings, states


def batch_of(seconds: list[int], offline: list[int] = (), **extra: Any):
    readings, states = polls(*seconds)
    states += [["sn-1", T0 + s * S, "offline"] for s in offline]
    return make_batch("gw-a", readings, states=states) | extra


DROPPED = {
    "device_id": "sn-1",
    "first_time": T0 + 100 * S,
    "last_time": T0 + 200 * S,
    "readings": 20,
    "polls": 10,
    "reason": "buffer-full",
}


async def send_site_history(client: TestClient, fleet: Fleet) -> None:
    """Online 0-10 s, offline 20-30 s, online 40 s, drops 100-200 s, online 300 s.

    The batches arrive newest first, as after an uplink outage.
    """
    batches = [
        batch_of([300], gaps=[DROPPED]),
        batch_of([40], offline=[20, 30]),
        batch_of([0, 10]),
    ]
    for batch in batches:
        status, _ = await post(client, fleet.token_a, batch)
        assert status == 200


async def test_gaps_all_kinds(client: TestClient, fleet: Fleet) -> None:
    await send_site_history(client, fleet)
    path = f"/api/v1/installations/{fleet.installation_a}/gaps"

    status, body = await get(client, fleet.operator_key, path, T0, T0 + 600 * S)

    assert status == 200
    assert body == {
        "installation_id": fleet.installation_a,
        "from": T0,
        "to": T0 + 600 * S,
        "gaps": [
            {
                "kind": "device",
                "device_id": "sn-1",
                "from": T0 + 20 * S,
                "to": T0 + 40 * S,
                "reason": "offline",
                "readings": None,
                "polls": None,
                "ongoing": False,
            },
            {
                "kind": "buffer",
                "device_id": "sn-1",
                "from": T0 + 100 * S,
                "to": T0 + 200 * S,
                "reason": "buffer-full",
                "readings": 20,
                "polls": 10,
                "ongoing": False,
            },
            {
                "kind": "gateway",
                "device_id": None,
                "from": T0 + 200 * S,
                "to": T0 + 300 * S,
                "reason": "gateway-offline",
                "readings": None,
                "polls": None,
                "ongoing": False,
            },
            {
                "kind": "gateway",
                "device_id": None,
                "from": T0 + 300 * S,
                "to": T0 + 600 * S,
                "reason": "gateway-offline",
                "readings": None,
                "polls": None,
                "ongoing": True,
            },
        ],
    }


async def test_gaps_clipped_to_window(client: TestClient, fleet: Fleet) -> None:
    await send_site_history(client, fleet)
    path = f"/api/v1/installations/{fleet.installation_a}/gaps"

    status, body = await get(
        client, fleet.operator_key, path, T0 + 25 * S, T0 + 150 * S
    )

    assert status == 200
    spans = [(g["kind"], g["from"] - T0, g["to"] - T0) for g in body["gaps"]]
    assert spans == [("device", 25 * S, 40 * S), ("buffer", 100 * S, 150 * S)]


async def test_gaps_resent_report_once(client: TestClient, fleet: Fleet) -> None:
    batch = batch_of([300], gaps=[DROPPED])

    await post(client, fleet.token_a, batch)
    await post(client, fleet.token_a, batch_of([310], gaps=[DROPPED]))

    with psycopg.connect(fleet.dbs.shard_dsn("shard-1")) as conn:
        rows = conn.execute("SELECT readings, polls, reason FROM gaps").fetchall()
    assert rows == [(20, 10, "buffer-full")]


async def test_gaps_none_while_polling(client: TestClient, fleet: Fleet) -> None:
    await post(client, fleet.token_a, batch_of(list(range(0, 120, 10))))
    path = f"/api/v1/installations/{fleet.installation_a}/gaps"

    status, body = await get(client, fleet.operator_key, path, T0, T0 + 110 * S)

    assert status == 200
    assert body["gaps"] == []


async def test_gaps_needs_operator_key(client: TestClient, fleet: Fleet) -> None:
    path = f"/api/v1/installations/{fleet.installation_a}/gaps"

    status, body = await get(client, fleet.token_a, path, T0, T0 + S)

    assert status == 401
    assert body == {"error": "unknown or revoked API key: create one with `keys add`"}


async def test_gaps_unknown_installation(client: TestClient, fleet: Fleet) -> None:
    status, body = await get(
        client, fleet.operator_key, "/api/v1/installations/999/gaps", T0, T0 + S
    )

    assert status == 404
    assert body == {"error": "installation 999 not found"}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            {"from": "x", "to": "1"},
            "query parameter from='x' is invalid: send Unix milliseconds from "
            "946684800000 to 4102444800000",
        ),
        (
            {"from": str(T0), "to": str(T0)},
            f"to {T0} must be later than from {T0}",
        ),
        (
            {"from": str(T0), "to": str(T0 + 367 * 86_400_000)},
            "window of 31708800000 ms is longer than the limit of 31622400000 ms "
            "(366 days): ask for a shorter range",
        ),
    ],
)
async def test_read_window_invalid(
    client: TestClient, fleet: Fleet, query: dict[str, str], message: str
) -> None:
    response = await client.get(
        f"/api/v1/installations/{fleet.installation_a}/energy",
        params=query,
        headers={"Authorization": f"Bearer {fleet.operator_key}"},
    )

    assert response.status == 400
    assert await response.json() == {"error": message}


def counter_batch(seconds: list[int], values: list[float | None], watts: float):
    """Readings of sn-1's 103.WH counter (Wh) and 103.W power at T0 + seconds."""
    readings = [["sn-1", "103.WH", T0 + s * S, v] for s, v in zip(seconds, values)]
    readings += [["sn-1", "103.W", T0 + s * S, watts] for s in seconds]
    batch = make_batch("gw-a", readings)
    for channel in batch["channels"]:
        channel["unit"] = "Wh" if channel["name"] == "103.WH" else "W"
    return batch


async def send_counter(client: TestClient, fleet: Fleet) -> None:
    # 0 Wh at 30 s is a glitch; the rise to 2,000,000 Wh at 50 s is beyond 3600 W.
    # The later batch arrives first.
    later = counter_batch([30, 40, 50, 60], [0, 1030, 2_000_000, 2_000_010], 3600)
    earlier = counter_batch([0, 10, 20], [1000, 1010, 1020], 3600)
    for batch in (later, earlier):
        status, _ = await post(client, fleet.token_a, batch)
        assert status == 200


async def test_energy_out_of_order(client: TestClient, fleet: Fleet) -> None:
    await send_counter(client, fleet)
    path = f"/api/v1/installations/{fleet.installation_a}/energy"

    status, body = await get(client, fleet.operator_key, path, T0, T0 + 600 * S)

    assert status == 200
    assert body == {
        "installation_id": fleet.installation_a,
        "from": T0,
        "to": T0 + 600 * S,
        "counters": [
            {
                "device_id": "sn-1",
                "channel": "103.WH",
                "unit": "Wh",
                "energy": 40.0,
                "max_power_w": 3600.0,
                "max_power_source": "observed",
                "restarts": [],
                "jumps": [
                    {
                        "time": T0 + 50 * S,
                        "before": 1030.0,
                        "after": 2_000_000.0,
                        "allowed": 20.0,
                    }
                ],
                "pending": 0,
            }
        ],
    }


async def test_energy_window_part(client: TestClient, fleet: Fleet) -> None:
    await send_counter(client, fleet)
    path = f"/api/v1/installations/{fleet.installation_a}/energy"

    status, body = await get(
        client, fleet.operator_key, path, T0 + 20 * S, T0 + 50 * S
    )

    assert status == 200
    (counter,) = body["counters"]
    assert counter["energy"] == 20.0
    assert counter["jumps"] == []


async def test_energy_nameplate_rating(client: TestClient, fleet: Fleet) -> None:
    batch = counter_batch([0, 10], [1000, 1030], 100)
    batch["readings"].append(["sn-1", "120.WRtg", T0, 7200.0])
    batch["channels"].append({"device_id": "sn-1", "name": "120.WRtg", "unit": "W"})
    await post(client, fleet.token_a, batch)
    path = f"/api/v1/installations/{fleet.installation_a}/energy"

    status, body = await get(client, fleet.operator_key, path, T0, T0 + 60 * S)

    assert status == 200
    (counter,) = body["counters"]
    assert counter["max_power_w"] == 7200.0
    assert counter["max_power_source"] == "rating"
    assert counter["energy"] == 30.0
