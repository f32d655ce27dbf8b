"""Read API queries on a shard: what installations and their devices report now,
and a channel's series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection

from collector import measures, production, rollups

_DEVICES = """
SELECT device_id, name, state, (extract(epoch FROM state_time) * 1000)::bigint
FROM devices WHERE installation_id = %s ORDER BY device_id
"""

_CHANNELS = """
SELECT d.device_id, c.name, c.unit, (extract(epoch FROM c.last_time) * 1000)::bigint,
       c.last_value
FROM channels c JOIN devices d ON d.id = c.device_id
WHERE c.installation_id = %s ORDER BY d.device_id, c.name
"""


async def latest(conn: AsyncConnection[Any], installation_id: int) -> dict[str, Any]:
    """Return the devices with their latest state and every channel's latest value.

    Times are Unix milliseconds; a channel without readings has time and value null,
    and so has a reading the device reported without a value.
    """
    cur = await conn.execute(_DEVICES, (installation_id,))
    devices = [
        {"device_id": device_id, "name": name, "state": state, "state_time": state_time}
        for device_id, name, state, state_time in await cur.fetchall()
    ]
    cur = await conn.execute(_CHANNELS, (installation_id,))
    channels = [
        {
            "device_id": device_id,
            "channel": name,
            "unit": unit,
            "time": time_ms,
            "value": value,
        }
        for device_id, name, unit, time_ms, value in await cur.fetchall()
    ]
    return {
        "installation_id": installation_id,
        "devices": devices,
        "channels": channels,
    }


# Device states as the fleet API counts them. `refused` means the TCP connect was
# refused (device switched off, or its port held by another client), so it counts as
# offline like a device that never reported a state. A device that responds but
# cannot be read as SunSpec (not-sunspec, malformed) is faulted.
STATE_GROUPS = {
    "online": "online",
    "sleeping": "sleeping",
    "offline": "offline",
    "refused": "offline",
    "not-sunspec": "faulted",
    "malformed": "faulted",
}
DEVICE_GROUPS = ("online", "sleeping", "offline", "faulted")
# A latest AC power reading older than this does not count as power now.
POWER_FRESH_MS = 900_000

_STATUS_DEVICES = """
SELECT installation_id, id, state, (extract(epoch FROM state_time) * 1000)::bigint
FROM devices WHERE installation_id = ANY(%(installation_ids)s) AND active
"""

_LAST_SEEN = """
SELECT installation_id, (extract(epoch FROM max(last_time)) * 1000)::bigint
FROM channels WHERE installation_id = ANY(%(installation_ids)s)
GROUP BY installation_id
"""

_POWER_NOW = """
SELECT c.installation_id, c.device_id, c.name,
       (extract(epoch FROM c.last_time) * 1000)::bigint, c.last_value
FROM channels c
WHERE c.installation_id = ANY(%(installation_ids)s) AND c.name = ANY(%(names)s)
"""


@dataclass
class Status:
    """An installation's current status: last activity, devices by state, power."""

    last_seen_ms: int | None = None
    devices: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DEVICE_GROUPS, 0)
    )
    power_w: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the status fields of the fleet API's installation entries."""
        return {
            "last_seen_ms": self.last_seen_ms,
            "devices": dict(self.devices),
            "power_w": self.power_w,
        }


async def statuses(
    conn: AsyncConnection[Any], installation_ids: list[int], now_ms: int
) -> dict[int, Status]:
    """Return the status of each installation of this shard, by installation id.

    Power now is the sum of the inverters' latest AC power readings of the last
    `POWER_FRESH_MS`, where a sleeping inverter counts as 0 W and an inverter whose
    latest state reports it unreachable is left out, since its last reading is stale.
    It is None when no inverter has such a reading and none sleeps.
    """
    params = {"installation_ids": installation_ids}
    found = {installation_id: Status() for installation_id in installation_ids}
    cur = await conn.execute(_STATUS_DEVICES, params)
    sleeping: set[int] = set()
    down: set[int] = set()
    for installation_id, device, state, state_ms in await cur.fetchall():
        status = found[installation_id]
        status.devices[STATE_GROUPS.get(state, "offline")] += 1
        status.last_seen_ms = _later(status.last_seen_ms, state_ms)
        if state == "sleeping":
            sleeping.add(device)
        elif state is not None and state != "online":
            down.add(device)
    cur = await conn.execute(_LAST_SEEN, params)
    for installation_id, seen_ms in await cur.fetchall():
        status = found[installation_id]
        status.last_seen_ms = _later(status.last_seen_ms, seen_ms)
    await _add_power_now(conn, params, found, sleeping, down, now_ms)
    return found


def _later(first: int | None, second: int | None) -> int | None:
    if first is None or second is None:
        return first if second is None else second
    return max(first, second)


async def _add_power_now(
    conn: AsyncConnection[Any],
    params: dict[str, Any],
    found: dict[int, Status],
    sleeping: set[int],
    down: set[int],
    now_ms: int,
) -> None:
    cur = await conn.execute(
        _POWER_NOW, params | {"names": list(measures.AC_POWER_CHANNELS)}
    )
    by_device: dict[int, tuple[int, dict[str, tuple[int | None, float | None]]]] = {}
    for installation_id, device, name, time_ms, value in await cur.fetchall():
        by_device.setdefault(device, (installation_id, {}))[1][name] = (time_ms, value)
    for device, (installation_id, channels) in by_device.items():
        chosen = measures.measure_channels(channels).ac_power
        assert chosen is not None
        time_ms, value = channels[chosen]
        if device in sleeping:
            value = 0.0
        elif device in down:
            continue
        elif time_ms is None or value is None or now_ms - time_ms > POWER_FRESH_MS:
            continue
        status = found[installation_id]
        status.power_w = (status.power_w or 0.0) + value


# One row per device, its channels ordered by name as parallel arrays, sent in
# binary so that the arrays keep their types.
_DEVICE_ROWS = """
SELECT d.device_id, d.name, d.manufacturer, d.model, d.serial, d.state,
       (extract(epoch FROM d.state_time) * 1000)::bigint,
       c.ids, c.names, c.units, c.last_values, c.times_ms
FROM devices d
CROSS JOIN LATERAL (
    SELECT array_agg(id ORDER BY name) AS ids, array_agg(name ORDER BY name) AS names,
           array_agg(unit ORDER BY name) AS units,
           array_agg(last_value ORDER BY name) AS last_values,
           array_agg((extract(epoch FROM last_time) * 1000)::bigint ORDER BY name)
               AS times_ms
    FROM channels WHERE device_id = d.id
) c
WHERE d.installation_id = %s ORDER BY d.device_id
"""


async def devices(
    conn: AsyncConnection[Any], installation_id: int
) -> list[dict[str, Any]]:
    """Return the installation's devices with their channels' latest values and
    their normalised measures."""
    cur = await conn.execute(_DEVICE_ROWS, (installation_id,), binary=True)
    found = []
    for row in await cur.fetchall():
        device_id, name, manufacturer, model, serial, state, state_ms = row[:7]
        columns = [column or [] for column in row[7:]]
        channels = [
            {"id": channel_id, "name": channel_name, "unit": unit, "value": value,
             "time_ms": time_ms}
            for channel_id, channel_name, unit, value, time_ms in zip(*columns)
        ]
        values = {channel["name"]: channel["value"] for channel in channels}
        found.append(
            {
                "device_id": device_id,
                "name": name,
                "manufacturer": manufacturer,
                "model": model,
                "serial": serial,
                "state": state,
                "state_ms": state_ms,
                "measures": measures.device_measures(values).to_json(),
                "channels": channels,
            }
        )
    return found


_CHANNEL = """
SELECT c.id, c.name, c.unit, d.device_id FROM channels c
JOIN devices d ON d.id = c.device_id
WHERE c.installation_id = %s AND c.id = %s
"""

_RAW_POINTS = """
SELECT (extract(epoch FROM time) * 1000)::bigint, value FROM readings
WHERE installation_id = %(installation_id)s AND channel_id = %(channel_id)s
  AND time >= %(start)s AND time < %(end)s
ORDER BY time
"""

_ROLLUP_POINTS = """
SELECT (extract(epoch FROM bucket) * 1000)::bigint, sum / count, min, max FROM {table}
WHERE installation_id = %(installation_id)s AND channel_id = %(channel_id)s
  AND bucket >= %(start)s AND bucket < %(end)s
ORDER BY bucket
"""


async def channel(
    conn: AsyncConnection[Any], installation_id: int, channel_id: int
) -> dict[str, Any] | None:
    """Return a channel of the installation (id, name, unit, device_id), or None."""
    cur = await conn.execute(_CHANNEL, (installation_id, channel_id))
    row = await cur.fetchone()
    if row is None:
        return None
    return {"id": row[0], "name": row[1], "unit": row[2], "device_id": row[3]}


async def series(
    conn: AsyncConnection[Any],
    installation_id: int,
    channel_id: int,
    window: tuple[int, int],
    resolution: str,
) -> list[list[Any]]:
    """Return a channel's points in `window` as `[t_ms, avg, min, max]`.

    `resolution` is `raw` (every reading, `[t, v, v, v]`, null values included) or
    a rollup resolution of `rollups.RESOLUTIONS`, whose points start at their
    bucket's start and leave out buckets without values.
    """
    params = {
        "installation_id": installation_id,
        "channel_id": channel_id,
        "start": production.to_datetime(window[0]),
        "end": production.to_datetime(window[1]),
    }
    if resolution == "raw":
        cur = await conn.execute(_RAW_POINTS, params)
        return [[t, v, v, v] for t, v in await cur.fetchall()]
    table = rollups.RESOLUTIONS[resolution][0]
    cur = await conn.execute(_ROLLUP_POINTS.format(table=table), params)
    return [list(row) for row in await cur.fetchall()]
