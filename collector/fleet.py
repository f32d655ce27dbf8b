"""Read API queries on a shard: what an installation's devices report now."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

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
