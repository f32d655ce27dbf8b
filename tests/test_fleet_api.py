"""The fleet read API over real HTTP and PostgreSQL shards, with exact values.

Installation A (owner Alice, shard-1, Europe/Zurich, UTC+1 in December) has two
inverters and a meter, B (Alice, shard-2, UTC) one inverter, C (Bob, shard-2) none.
The API's clock is fixed at NOW, five minutes after the latest readings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from collector import catalog, fleet_api, openapi
from collector.app import create_app
from collector.config import ShardConfig
from collector_http import T0, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

H = 3_600_000
NOW = T0 - H + 300_000
DAY_START = T0 - 17 * H  # 2025-12-04 00:00 in Zurich

READINGS_A = [
    ["sn-1", "103.WH", T0 - 18 * H, 900.0],  # 23:00 local on the day before
    ["sn-1", "103.WH", T0 - 16 * H, 1000.0],
    ["sn-1", "103.WH", T0 - 2 * H, 5000.0],
    ["sn-1", "103.WH", T0 - H, 8000.0],
    ["sn-1", "103.W", T0 - 2 * H, 3000.0],
    ["sn-1", "103.W", T0 - 2 * H + 60_000, 2000.0],
    ["sn-1", "103.W", T0 - H, 3500.0],
    ["sn-2", "701.TotWhInj", T0 - 2 * H, 100.0],
    ["sn-2", "701.TotWhInj", T0 - H, 600.0],
    ["sn-2", "701.W", T0 - H, 1500.0],
    ["sn-m", "203.W", T0 - H, -200.0],
    ["sn-m", "203.TotWhExp", T0 - 2 * H, 10.0],
    ["sn-m", "203.TotWhExp", T0 - H, 20000.0],
]
STATES_A = [
    ["sn-1", T0 - H, "online"],
    ["sn-2", T0 - H, "online"],
    ["sn-m", T0 - H, "refused"],
]


@dataclasses.dataclass(frozen=True)
class Site:
    """Three installations, two owners, and keys of every kind."""

    dbs: CollectorDatabases
    a: int
    b: int
    c: int
    tokens: dict[str, str]
    keys: dict[str, str]


@pytest.fixture
def site(collector_databases: CollectorDatabases) -> Site:
    dsn = collector_databases.catalog_dsn
    alice = catalog.add_owner(dsn, "Alice Meyer")
    bob = catalog.add_owner(dsn, "Bob Keller")
    a = catalog.add_installation(dsn, "Roof A", alice.id, "shard-1", "Europe/Zurich")
    b = catalog.add_installation(dsn, "Barn B", alice.id, "shard-2")
    c = catalog.add_installation(dsn, "Shed C", bob.id, "shard-2")
    tokens = {
        "a": catalog.add_gateway(dsn, "gw-a", a.id)[1],
        "b": catalog.add_gateway(dsn, "gw-b", b.id)[1],
    }
    keys = {
        "ops": catalog.add_key(dsn, "ops")[1],
        "alice": catalog.add_key(dsn, "alice", alice.id)[1],
        "bob": catalog.add_key(dsn, "bob", bob.id)[1],
        "gone": catalog.add_key(dsn, "gone")[1],
    }
    catalog.revoke_key(dsn, "gone")
    return Site(collector_databases, a.id, b.id, c.id, tokens, keys)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fleet_api, "_now_ms", lambda: NOW)
    yield


async def load(client: TestClient, site: Site) -> None:
    status, body = await post(
        client, site.tokens["a"], make_batch("gw-a", READINGS_A, states=STATES_A)
    )
    assert status == 200, body
    readings_b = [["sn-9", "103.W", T0 - H, 1000.0]]
    states_b = [["sn-9", T0 - H, "online"], ["sn-8", T0 - H, "malformed"]]
    status, body = await post(
        client, site.tokens["b"], make_batch("gw-b", readings_b, states=states_b)
    )
    assert status == 200, body


@pytest.fixture
async def client(site: Site, clock: None) -> AsyncIterator[TestClient]:
    client = await start_client(site.dbs.config())
    await load(client, site)
    yield client
    await client.close()


async def get(
    client: TestClient, key: str, path: str, **params: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.get(
        path, params=params, headers={"Authorization": f"Bearer {key}"}
    )
    return response.status, await response.json()


def summary(installation_id: int, name: str, owner: int, timezone: str, shard: str,
            **status: Any) -> dict[str, Any]:
    return {
        "id": installation_id, "name": name, "owner_id": owner,
        "timezone": timezone, "shard": shard,
    } | status


def devices(online: int = 0, sleeping: int = 0, offline: int = 0, faulted: int = 0):
    return {"online": online, "sleeping": sleeping, "offline": offline,
            "faulted": faulted}


def expected_a(site: Site) -> dict[str, Any]:
    return summary(
        site.a, "Roof A", 1, "Europe/Zurich", "shard-1",
        last_seen_ms=T0 - H, devices=devices(online=2, offline=1),
        power_w=5000.0, energy_today_wh=7600.0, open_alerts=0,
    )


def expected_b(site: Site) -> dict[str, Any]:
    return summary(
        site.b, "Barn B", 1, "UTC", "shard-2", last_seen_ms=T0 - H,
        devices=devices(online=1, faulted=1), power_w=1000.0, energy_today_wh=None,
        open_alerts=0,
    )


def expected_c(site: Site) -> dict[str, Any]:
    return summary(
        site.c, "Shed C", 2, "UTC", "shard-2", last_seen_ms=None,
        devices=devices(), power_w=None, energy_today_wh=None, open_alerts=0,
    )


async def test_installations_operator_sees_all(
    client: TestClient, site: Site
) -> None:
    status, body = await get(client, site.keys["ops"], "/api/v1/installations")

    assert status == 200
    assert body == {
        "installations": [expected_a(site), expected_b(site), expected_c(site)],
        "missing": [],
    }


async def test_installations_owner_filtered(client: TestClient, site: Site) -> None:
    _, alice = await get(client, site.keys["alice"], "/api/v1/installations")
    _, bob = await get(client, site.keys["bob"], "/api/v1/installations")

    assert [i["id"] for i in alice["installations"]] == [site.a, site.b]
    assert bob["installations"] == [expected_c(site)]


async def test_fleet_totals(client: TestClient, site: Site) -> None:
    status, body = await get(client, site.keys["ops"], "/api/v1/fleet")

    assert status == 200
    assert body == {
        "installations": 3,
        "power_w": 6000.0,
        "energy_today_wh": 7600.0,
        "devices": devices(online=3, offline=1, faulted=1),
        "open_alerts": 0,
        "missing": [],
    }


async def test_fleet_owner_totals(client: TestClient, site: Site) -> None:
    _, body = await get(client, site.keys["bob"], "/api/v1/fleet")

    assert body == {
        "installations": 1,
        "power_w": None,
        "energy_today_wh": None,
        "devices": devices(),
        "open_alerts": 0,
        "missing": [],
    }


async def test_installation_devices_and_measures(
    client: TestClient, site: Site
) -> None:
    status, body = await get(
        client, site.keys["alice"], f"/api/v1/installations/{site.a}"
    )

    assert status == 200
    expected = expected_a(site)
    expected["device_counts"] = expected.pop("devices")
    assert {k: v for k, v in body.items() if k != "devices"} == expected
    by_id = {d["device_id"]: d for d in body["devices"]}
    assert list(by_id) == ["sn-1", "sn-2", "sn-m"]
    assert by_id["sn-1"]["measures"] == {
        "ac_power_w": 3500.0, "lifetime_energy_wh": 8000.0, "dc_power_w": [],
        "grid_import_wh": None, "grid_export_wh": None,
    }
    assert by_id["sn-2"]["measures"]["lifetime_energy_wh"] == 600.0
    assert by_id["sn-m"]["measures"]["grid_export_wh"] == 20000.0
    assert by_id["sn-m"]["measures"]["ac_power_w"] is None
    assert by_id["sn-m"]["state"] == "refused"
    assert by_id["sn-m"]["state_ms"] == T0 - H
    assert [c["name"] for c in by_id["sn-1"]["channels"]] == ["103.W", "103.WH"]
    assert by_id["sn-1"]["channels"][0] | {"id": 0} == {
        "id": 0, "name": "103.W", "unit": "W", "value": 3500.0, "time_ms": T0 - H,
    }


async def channel_id(client: TestClient, site: Site, name: str) -> int:
    _, body = await get(client, site.keys["ops"], f"/api/v1/installations/{site.a}")
    return next(
        c["id"] for d in body["devices"] for c in d["channels"] if c["name"] == name
    )


@pytest.mark.parametrize(
    ("resolution", "points"),
    [
        ("raw", [[T0 - 2 * H, 3000.0, 3000.0, 3000.0],
                 [T0 - 2 * H + 60_000, 2000.0, 2000.0, 2000.0],
                 [T0 - H, 3500.0, 3500.0, 3500.0]]),
        ("5m", [[T0 - 2 * H, 2500.0, 2000.0, 3000.0], [T0 - H, 3500.0, 3500.0, 3500.0]]),
        ("1h", [[T0 - 2 * H, 2500.0, 2000.0, 3000.0], [T0 - H, 3500.0, 3500.0, 3500.0]]),
        ("1d", [[T0 - 16 * H, 2833.3333333333335, 2000.0, 3500.0]]),
    ],
)
async def test_series_resolutions(
    client: TestClient, site: Site, resolution: str, points: list[list[Any]]
) -> None:
    channel = await channel_id(client, site, "103.W")
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/series",
        channel=str(channel), resolution=resolution,
        **{"from": str(T0 - 16 * H), "to": str(T0)},
    )

    assert status == 200
    assert body["channel"] == {"id": channel, "name": "103.W", "unit": "W",
                               "device_id": "sn-1"}
    assert body["resolution"] == resolution
    assert body["points"] == points


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"channel": "x", "from": "1", "to": "2"},
         "query parameter channel='x' is invalid: send a channel id from the "
         "installation's devices"),
        ({"channel": "1", "resolution": "2m", "from": str(T0), "to": str(T0 + 1)},
         "resolution '2m' is invalid: use one of raw, 5m, 1h, 1d"),
        ({"channel": "1", "from": str(T0), "to": str(T0 + 2 * 86_400_000)},
         "window of 172800000 ms is longer than the limit of 86400000 ms for "
         "resolution raw: ask for a shorter range or a coarser resolution"),
        ({"channel": "1", "from": str(T0), "to": str(T0)},
         f"to {T0} must be later than from {T0}"),
    ],
)
async def test_series_bad_query(
    client: TestClient, site: Site, params: dict[str, str], error: str
) -> None:
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/series", **params
    )

    assert status == 400
    assert body == {"error": error}


async def test_series_other_installation_channel(
    client: TestClient, site: Site
) -> None:
    # Channel ids are per shard, and B's shard has a single channel.
    channel = await channel_id(client, site, "203.TotWhExp")
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.b}/series",
        channel=str(channel), **{"from": str(T0 - H), "to": str(T0)},
    )

    assert status == 404
    assert body == {"error": f"channel {channel} not found in installation {site.b}"}


async def test_power_chart_local_day(client: TestClient, site: Site) -> None:
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/power",
        date="2025-12-04",
    )

    assert status == 200
    assert body["date"] == "2025-12-04"
    assert body["timezone"] == "Europe/Zurich"
    points = body["points"]
    assert len(points) == 288
    assert points[0] == [DAY_START, None]
    assert points[-1] == [DAY_START + 24 * H - 300_000, None]
    known = [p for p in points if p[1] is not None]
    assert known == [[T0 - 2 * H, 2500.0], [T0 - H, 5000.0]]


async def test_power_chart_dst_day(client: TestClient, site: Site) -> None:
    # 2025-10-26 in Zurich has 25 hours: clocks went back from 03:00 to 02:00.
    _, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/power",
        date="2025-10-26",
    )

    assert len(body["points"]) == 300
    assert body["points"][0][0] == 1_761_429_600_000  # 2025-10-25 22:00 UTC


async def test_daily_energy_local_days(client: TestClient, site: Site) -> None:
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/energy/daily",
        **{"from": "2025-12-03", "to": "2025-12-05"},
    )

    assert status == 200
    assert body["days"] == [
        {"date": "2025-12-03", "energy_wh": 0.0},
        {"date": "2025-12-04", "energy_wh": 7600.0},
        {"date": "2025-12-05", "energy_wh": None},
    ]


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"from": "2025-12-05", "to": "2025-12-03"},
         "to 2025-12-03 must not be before from 2025-12-05"),
        ({"from": "2024-01-01", "to": "2025-01-01"},
         "range of 367 days is longer than the limit of 366 days: ask for a "
         "shorter range"),
        ({"from": "2025-13-01", "to": "2025-12-03"},
         "query parameter from='2025-13-01' is invalid: send a date YYYY-MM-DD "
         "from 2000-01-01 to 2099-12-31"),
    ],
)
async def test_daily_energy_bad_range(
    client: TestClient, site: Site, params: dict[str, str], error: str
) -> None:
    status, body = await get(
        client, site.keys["ops"], f"/api/v1/installations/{site.a}/energy/daily",
        **params,
    )

    assert status == 400
    assert body == {"error": error}


READ_ROUTES = [
    ("", {}),
    ("/latest", {}),
    ("/energy", {"from": str(T0 - H), "to": str(T0)}),
    ("/gaps", {"from": str(T0 - H), "to": str(T0)}),
    ("/series", {"channel": "1", "from": str(T0 - H), "to": str(T0)}),
    ("/power", {"date": "2025-12-04"}),
    ("/energy/daily", {"from": "2025-12-04", "to": "2025-12-04"}),
]


@pytest.mark.parametrize(("suffix", "params"), READ_ROUTES)
async def test_owner_key_other_owner_forbidden(
    client: TestClient, site: Site, suffix: str, params: dict[str, str]
) -> None:
    path = f"/api/v1/installations/{site.a}{suffix}"

    status, body = await get(client, site.keys["bob"], path, **params)

    assert status == 403
    assert body == {"error": f"key 'bob' may not read installation {site.a}"}


@pytest.mark.parametrize(("suffix", "params"), READ_ROUTES)
async def test_owner_key_unknown_id_forbidden(
    client: TestClient, site: Site, suffix: str, params: dict[str, str]
) -> None:
    status, body = await get(
        client, site.keys["bob"], f"/api/v1/installations/999{suffix}", **params
    )

    assert status == 403
    assert body == {"error": "key 'bob' may not read installation 999"}


@pytest.mark.parametrize(("suffix", "params"), READ_ROUTES)
async def test_owner_key_own_installation_allowed(
    client: TestClient, site: Site, suffix: str, params: dict[str, str]
) -> None:
    path = f"/api/v1/installations/{site.a}{suffix}"

    status, _ = await get(client, site.keys["alice"], path, **params)

    assert status == 200


ALL_PATHS = [*(f"/api/v1/installations/1{s}" for s, _ in READ_ROUTES),
             "/api/v1/installations", "/api/v1/fleet"]


@pytest.mark.parametrize("path", ALL_PATHS)
async def test_revoked_key_unauthorized(
    client: TestClient, site: Site, path: str
) -> None:
    status, body = await get(client, site.keys["gone"], path)

    assert status == 401
    assert body == {"error": "unknown or revoked API key: create one with `keys add`"}


@pytest.mark.parametrize("path", ALL_PATHS)
async def test_gateway_token_unauthorized(
    client: TestClient, site: Site, path: str
) -> None:
    status, body = await get(client, site.tokens["a"], path)

    assert status == 401
    assert body == {"error": "unknown or revoked API key: create one with `keys add`"}


async def test_shard_down_partial_answer(site: Site, clock: None, proxy_factory) -> None:
    proxy = proxy_factory(site.dbs.shard_dsn("shard-2"))
    shards = (site.dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    config = site.dbs.config()
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    client = await start_client(config)
    try:
        await load(client, site)
        proxy.stop()
        listed = await get(client, site.keys["ops"], "/api/v1/installations")
        totals = await get(client, site.keys["ops"], "/api/v1/fleet")
        one = await get(client, site.keys["ops"], f"/api/v1/installations/{site.b}")
    finally:
        await client.close()

    missing = [{"shard": "shard-2", "installation_ids": [site.b, site.c],
                "reason": "shard shard-2 is unavailable, retry later"}]
    assert listed == (200, {"installations": [expected_a(site)], "missing": missing})
    assert totals == (200, {
        "installations": 3,
        "power_w": 5000.0,
        "energy_today_wh": 7600.0,
        "devices": devices(online=2, offline=1),
        "open_alerts": 0,
        "missing": missing,
    })
    assert one == (503, {"error": "shard shard-2 is unavailable, retry later"})


async def test_openapi_documents_every_route(site: Site) -> None:
    app = create_app(site.dbs.config())
    paths = openapi.document()["paths"]

    routes = [
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
        and not isinstance(route.resource, web.StaticResource)
    ]

    assert routes
    for path, method in routes:
        assert method in paths.get(path, {}), f"{method.upper()} {path}"


async def test_openapi_served_without_key(client: TestClient) -> None:
    response = await client.get("/api/v1/openapi.json")

    assert response.status == 200
    assert (await response.json())["openapi"] == "3.1.0"


async def test_power_now_skips_unreachable_device(
    client: TestClient, site: Site
) -> None:
    # sn-7's last AC power is fresh, but its latest state reports it unreachable.
    readings = [["sn-7", "103.W", T0 - H, 500.0]]
    states = [["sn-7", T0 - H, "offline"]]
    status, body = await post(
        client, site.tokens["b"], make_batch("gw-b", readings, states=states)
    )
    assert status == 200, body

    status, body = await get(client, site.keys["ops"], "/api/v1/installations")

    assert status == 200
    barn = next(row for row in body["installations"] if row["id"] == site.b)
    assert barn["devices"] == devices(online=1, offline=1, faulted=1)
    assert barn["power_w"] == 1000.0
