"""The fleet read API: installations with their status, devices, series, power and
energy charts, and fleet totals.

Every route needs a read API key (`keys add`). An owner key sees only its owner's
installations: lists leave the others out, and a request for one of them gets 403.
Fleet queries run on every shard at once. When a shard cannot be reached, the reply
leaves its installations out and lists the shard, their ids and the reason in
`missing`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import psycopg
from aiohttp import web
from psycopg import AsyncConnection

from collector import fleet, openapi, production
from collector.app import SERVICES, Services, readable_installation, reader
from collector.catalog import Installation
from collector.errors import NotFound, ShardUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Maximum window per series resolution, in milliseconds: under 10,000 buckets for
# the rollups, and 17,280 raw points for a channel polled every 5 seconds.
MAX_SERIES_MS = {
    "raw": 86_400_000,
    "5m": 31 * 86_400_000,
    "1h": 366 * 86_400_000,
    "1d": 10 * 366 * 86_400_000,
}
MAX_DAYS = 366
MIN_DATE = date(2000, 1, 1)
MAX_DATE = date(2099, 12, 31)
# Bounds of `from` and `to` in Unix ms: 2000-01-01 to 2100-01-01 UTC.
MIN_TIME_MS = 946_684_800_000
MAX_TIME_MS = 4_102_444_800_000
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_OPEN_ALERTS = """
SELECT installation_id, count(*) FROM alerts
WHERE installation_id = ANY(%(installation_ids)s) AND resolved_at IS NULL
GROUP BY installation_id
"""


def add_routes(app: web.Application) -> None:
    """Register the fleet API's routes on the collector application."""
    prefix = "/api/v1/installations"
    app.router.add_get(prefix, get_installations)
    app.router.add_get(prefix + "/{installation_id}", get_installation)
    app.router.add_get(prefix + "/{installation_id}/series", get_series)
    app.router.add_get(prefix + "/{installation_id}/power", get_power)
    app.router.add_get(prefix + "/{installation_id}/energy/daily", get_daily_energy)
    app.router.add_get("/api/v1/fleet", get_fleet)
    app.router.add_get("/api/v1/openapi.json", get_openapi)


@dataclass(frozen=True, slots=True)
class Missing:
    """A shard whose installations are left out of a fleet reply, and why."""

    shard: str
    installation_ids: tuple[int, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Return the entry of a reply's `missing` list."""
        return {
            "shard": self.shard,
            "installation_ids": list(self.installation_ids),
            "reason": self.reason,
        }


async def on_shards(
    services: Services,
    installations: list[Installation],
    query: Callable[[AsyncConnection[Any], list[Installation]], Awaitable[T]],
) -> tuple[dict[str, T], list[Missing]]:
    """Run `query` on every shard holding some of `installations`, all at once.

    Returns the results by shard name and the shards that failed.
    """
    by_shard: dict[str, list[Installation]] = {}
    for installation in installations:
        by_shard.setdefault(installation.shard, []).append(installation)

    async def one(shard: str, members: list[Installation]) -> T | Missing:
        try:
            async with services.shards.connection(shard) as conn:
                return await query(conn, members)
        except (ShardUnavailable, psycopg.Error) as err:
            # ShardPools already logs when a shard starts and stops failing.
            logger.debug("fleet query left out shard %s: %s", shard, err)
            ids = tuple(i.id for i in members)
            return Missing(shard, ids, _first_line(err))

    names = list(by_shard)
    answers = await asyncio.gather(*(one(name, by_shard[name]) for name in names))
    results = {n: a for n, a in zip(names, answers) if not isinstance(a, Missing)}
    missing = [a for a in answers if isinstance(a, Missing)]
    return results, missing


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _today(installation: Installation, now_ms: int) -> tuple[int, int]:
    zone = ZoneInfo(installation.timezone)
    day = production.to_datetime(now_ms).astimezone(zone).date()
    return production.local_day(day, installation.timezone)


async def _open_alerts(
    conn: AsyncConnection[Any], installation_ids: list[int]
) -> dict[int, int]:
    # The alerts table comes with a later shard migration than the rollups.
    cur = await conn.execute("SELECT to_regclass('alerts') IS NOT NULL")
    exists = await cur.fetchone()
    if not exists or not exists[0]:
        return {}
    cur = await conn.execute(_OPEN_ALERTS, {"installation_ids": installation_ids})
    return dict(await cur.fetchall())


async def _shard_summaries(
    conn: AsyncConnection[Any], members: list[Installation], now_ms: int
) -> dict[int, dict[str, Any]]:
    """Return the status, energy today and open alerts of installations of one shard."""
    ids = [i.id for i in members]
    statuses = await fleet.statuses(conn, ids, now_ms)
    windows = {i.id: [_today(i, now_ms)] for i in members}
    energy = await production.installation_energy(conn, ids, windows)
    alerts = await _open_alerts(conn, ids)
    return {
        i: statuses[i].to_json()
        | {"energy_today_wh": energy[i][0], "open_alerts": alerts.get(i, 0)}
        for i in ids
    }


async def _summaries(
    request: web.Request,
) -> tuple[list[Installation], dict[int, dict[str, Any]], list[Missing]]:
    services = request.app[SERVICES]
    key = await reader(request)
    installations = await services.auth.installations(key.owner_id)
    now_ms = _now_ms()

    async def query(conn: AsyncConnection[Any], members: list[Installation]):
        return await _shard_summaries(conn, members, now_ms)

    results, missing = await on_shards(services, installations, query)
    summaries = {i: s for shard in results.values() for i, s in shard.items()}
    return installations, summaries, missing


def _describe(installation: Installation) -> dict[str, Any]:
    return {
        "id": installation.id,
        "name": installation.name,
        "owner_id": installation.owner_id,
        "timezone": installation.timezone,
        "shard": installation.shard,
    }


async def get_installations(request: web.Request) -> web.Response:
    """List the installations the key may read, with their status."""
    installations, summaries, missing = await _summaries(request)
    return web.json_response(
        {
            "installations": [
                _describe(i) | summaries[i.id]
                for i in installations
                if i.id in summaries
            ],
            "missing": [m.to_json() for m in missing],
        }
    )


async def get_fleet(request: web.Request) -> web.Response:
    """Return totals over the installations the key may read.

    Totals cover the installations whose shard answered; `missing` names the rest.
    """
    installations, summaries, missing = await _summaries(request)
    devices = dict.fromkeys(fleet.DEVICE_GROUPS, 0)
    for summary in summaries.values():
        for group, count in summary["devices"].items():
            devices[group] += count
    return web.json_response(
        {
            "installations": len(installations),
            "power_w": _sum(s["power_w"] for s in summaries.values()),
            "energy_today_wh": _sum(s["energy_today_wh"] for s in summaries.values()),
            "devices": devices,
            "open_alerts": sum(s["open_alerts"] for s in summaries.values()),
            "missing": [m.to_json() for m in missing],
        }
    )


def _sum(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


async def get_installation(request: web.Request) -> web.Response:
    """Return one installation with its status, devices, channels and measures."""
    services = request.app[SERVICES]
    installation = await readable_installation(request)
    now_ms = _now_ms()
    async with services.shards.connection(installation.shard) as conn:
        summary = await _shard_summaries(conn, [installation], now_ms)
        devices = await fleet.devices(conn, installation.id)
    status = summary[installation.id]
    # `devices` lists the devices here, so their counts by state move aside.
    status["device_counts"] = status.pop("devices")
    return web.json_response(_describe(installation) | status | {"devices": devices})


async def get_series(request: web.Request) -> web.Response:
    """Return one channel's points at a resolution: raw, 5m, 1h or 1d."""
    services = request.app[SERVICES]
    installation = await readable_installation(request)
    channel_id = _channel_id(request)
    resolution = request.query.get("resolution", "raw")
    if resolution not in MAX_SERIES_MS:
        raise web.HTTPBadRequest(
            reason=f"resolution {resolution!r} is invalid: use one of "
            f"{', '.join(MAX_SERIES_MS)}"
        )
    window = _window(request, MAX_SERIES_MS[resolution], resolution)
    async with services.shards.connection(installation.shard) as conn:
        found = await fleet.channel(conn, installation.id, channel_id)
        if found is None:
            raise NotFound(
                f"channel {channel_id} not found in installation {installation.id}"
            )
        points = await fleet.series(conn, installation.id, channel_id, window,
                                    resolution)
    return web.json_response(
        {
            "installation_id": installation.id,
            "channel": found,
            "resolution": resolution,
            "from": window[0],
            "to": window[1],
            "points": points,
        }
    )


async def get_power(request: web.Request) -> web.Response:
    """Return the installation's AC power in 5-minute buckets of a local date."""
    services = request.app[SERVICES]
    installation = await readable_installation(request)
    day = _date(request, "date")
    window = production.local_day(day, installation.timezone)
    async with services.shards.connection(installation.shard) as conn:
        points = await production.power_buckets(conn, installation.id, window)
    return web.json_response(
        {
            "installation_id": installation.id,
            "date": day.isoformat(),
            "timezone": installation.timezone,
            "points": points,
        }
    )


async def get_daily_energy(request: web.Request) -> web.Response:
    """Return the installation's inverter energy of each local date in a range."""
    services = request.app[SERVICES]
    installation = await readable_installation(request)
    first, last = _date(request, "from"), _date(request, "to")
    if last < first:
        raise web.HTTPBadRequest(reason=f"to {last} must not be before from {first}")
    count = (last - first).days + 1
    if count > MAX_DAYS:
        raise web.HTTPBadRequest(
            reason=f"range of {count} days is longer than the limit of {MAX_DAYS} "
            "days: ask for a shorter range"
        )
    days = [first + timedelta(days=n) for n in range(count)]
    windows = [production.local_day(d, installation.timezone) for d in days]
    async with services.shards.connection(installation.shard) as conn:
        energy = await production.installation_energy(
            conn, [installation.id], {installation.id: windows}
        )
    return web.json_response(
        {
            "installation_id": installation.id,
            "timezone": installation.timezone,
            "days": [
                {"date": d.isoformat(), "energy_wh": wh}
                for d, wh in zip(days, energy[installation.id])
            ],
        }
    )


async def get_openapi(request: web.Request) -> web.Response:
    """Return the OpenAPI 3.1 document of every route; no key needed."""
    return web.json_response(openapi.document())


def _channel_id(request: web.Request) -> int:
    text = request.query.get("channel", "")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise web.HTTPBadRequest(
            reason=f"query parameter channel={text!r} is invalid: send a channel id "
            "from the installation's devices"
        )
    return int(text)


def _window(request: web.Request, limit_ms: int, resolution: str) -> tuple[int, int]:
    start = _query_ms(request, "from")
    end = _query_ms(request, "to")
    if end <= start:
        raise web.HTTPBadRequest(reason=f"to {end} must be later than from {start}")
    if end - start > limit_ms:
        raise web.HTTPBadRequest(
            reason=f"window of {end - start} ms is longer than the limit of "
            f"{limit_ms} ms for resolution {resolution}: ask for a shorter range "
            "or a coarser resolution"
        )
    return start, end


def _query_ms(request: web.Request, name: str) -> int:
    text = request.query.get(name, "")
    low, high = MIN_TIME_MS, MAX_TIME_MS
    valid = text.isascii() and text.isdigit() and len(text) <= 16
    if not valid or not low <= int(text) <= high:
        raise web.HTTPBadRequest(
            reason=f"query parameter {name}={text!r} is invalid: send Unix "
            f"milliseconds from {low} to {high}"
        )
    return int(text)


def _date(request: web.Request, name: str) -> date:
    text = request.query.get(name, "")
    try:
        if not _DATE.match(text):
            raise ValueError(text)
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is None or not MIN_DATE <= day <= MAX_DATE:
        raise web.HTTPBadRequest(
            reason=f"query parameter {name}={text!r} is invalid: send a date "
            f"YYYY-MM-DD from {MIN_DATE} to {MAX_DATE}"
        )
    return day
