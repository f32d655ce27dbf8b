"""Power and energy of installations from the rollups, per day in their time zone.

Energy comes from the inverters' lifetime counters (`measures.LIFETIME_ENERGY_CHANNELS`)
with the counter rules of `collector.energy`, applied to each counter's 5-minute `last`
series: the last value of every 5-minute bucket. Local days are built from 5-minute
buckets. A time zone whose UTC offset is a multiple of 5 minutes (every zone in use
today) therefore gets exact days, also the 23- and 25-hour days of daylight saving
time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection

from collector import energy, measures

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BUCKET_MS = 300_000


def to_ms(moment: datetime) -> int:
    """Convert an aware datetime to Unix milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def to_datetime(time_ms: int) -> datetime:
    """Convert Unix milliseconds to an aware UTC datetime."""
    return EPOCH + timedelta(milliseconds=time_ms)


def local_day(day: date, timezone: str) -> tuple[int, int]:
    """Return the start and end of `day` in `timezone` as Unix milliseconds.

    NOTE: where a daylight saving change skips local midnight, the day starts at the
    midnight of the offset before the change, as zoneinfo resolves the missing time.
    """
    zone = ZoneInfo(timezone)
    start = datetime.combine(day, time(0), zone)
    end = datetime.combine(day + timedelta(days=1), time(0), zone)
    return to_ms(start), to_ms(end)


@dataclass(frozen=True, slots=True)
class Counter:
    """An inverter's lifetime energy counter channel and the power limit of its
    device, for the jump rule."""

    installation_id: int
    channel_id: int
    max_power_w: float


_COUNTERS = """
SELECT c.installation_id, c.device_id, c.id, c.name FROM channels c
WHERE c.installation_id = ANY(%(installation_ids)s) AND c.name = ANY(%(names)s)
ORDER BY c.device_id, c.id
"""

# Nameplate ratings, else the highest AC power in the rollups of the window. The
# lateral subquery reads each power channel's rollups by primary key; a plain join
# let the planner scan every channel of the shard.
_MAX_POWER = """
SELECT c.device_id, max(c.last_value), 'rating' FROM channels c
WHERE c.installation_id = ANY(%(installation_ids)s) AND c.name = ANY(%(ratings)s)
  AND c.last_value > 0
GROUP BY c.device_id
UNION ALL
SELECT c.device_id, max(r.observed), 'observed' FROM channels c
CROSS JOIN LATERAL (
    SELECT max(abs(max)) AS observed FROM rollup_5m
    WHERE installation_id = c.installation_id AND channel_id = c.id
      AND bucket >= %(start)s AND bucket < %(end)s
) r
WHERE c.installation_id = ANY(%(installation_ids)s) AND c.name = ANY(%(power)s)
  AND r.observed IS NOT NULL
GROUP BY c.device_id
"""

# One row per channel with its series as two arrays, fetched in binary: row by row,
# parsing the timestamps took longer than the query. The lateral subquery reads each
# channel's buckets by primary key, in order; matching installation_id and channel_id
# lists against each other probed every pair of them.
_LAST_SERIES = """
SELECT c.id, s.times_ms, s.last_values FROM channels c
CROSS JOIN LATERAL (
    SELECT array_agg((extract(epoch FROM last_time) * 1000)::bigint ORDER BY bucket)
               AS times_ms,
           array_agg(last_value ORDER BY bucket) AS last_values
    FROM rollup_5m
    WHERE installation_id = c.installation_id AND channel_id = c.id
      AND bucket >= %(start)s AND bucket < %(end)s
) s
WHERE c.installation_id = ANY(%(installation_ids)s) AND c.id = ANY(%(channel_ids)s)
  AND s.times_ms IS NOT NULL
"""


async def inverter_counters(
    conn: AsyncConnection[Any], installation_ids: list[int], window: tuple[int, int]
) -> list[Counter]:
    """Return the lifetime energy counter of every inverter of the installations."""
    params = {
        "installation_ids": installation_ids,
        "names": list(measures.LIFETIME_ENERGY_CHANNELS),
        "ratings": list(energy.RATING_CHANNELS),
        "power": list(measures.AC_POWER_CHANNELS),
        "start": to_datetime(window[0] - energy.LOOKBACK_MS),
        "end": to_datetime(window[1]),
    }
    cur = await conn.execute(_COUNTERS, params)
    by_device: dict[int, list[tuple[int, int, str]]] = {}
    for installation_id, device, channel_id, name in await cur.fetchall():
        by_device.setdefault(device, []).append((installation_id, channel_id, name))
    cur = await conn.execute(_MAX_POWER, params)
    limits: dict[int, float] = {}
    for device, limit, source in await cur.fetchall():
        if source == "rating" or device not in limits:
            limits[device] = float(limit)
    counters = []
    for device, channels in by_device.items():
        # One counter per device, picked by the measures mapping.
        chosen = measures.measure_channels(name for _, _, name in channels)
        installation_id, channel_id, _ = next(
            c for c in channels if c[2] == chosen.lifetime_energy
        )
        limit = limits.get(device) or energy.DEFAULT_MAX_POWER_W
        counters.append(Counter(installation_id, channel_id, limit))
    return counters


Series = tuple[list[int], list[float | None]]


async def last_series(
    conn: AsyncConnection[Any],
    installation_ids: list[int],
    channel_ids: list[int],
    window: tuple[int, int],
) -> dict[int, Series]:
    """Return each channel's 5-minute `last` series within `window`, with the
    counter rules' look-back before it, as times (Unix ms) and values by channel
    id."""
    cur = await conn.execute(
        _LAST_SERIES,
        {
            "installation_ids": installation_ids,
            "channel_ids": channel_ids,
            "start": to_datetime(window[0] - energy.LOOKBACK_MS),
            "end": to_datetime(window[1]),
        },
        binary=True,
    )
    return {
        channel_id: (times_ms, values)
        for channel_id, times_ms, values in await cur.fetchall()
    }


def energy_in_windows(
    series: Series, max_power_w: float, windows: list[tuple[int, int]]
) -> list[float | None]:
    """Compute a counter's energy in each window; None where no reading lies in it.

    Each window is computed from the readings within it and the look-back before it,
    so a long run of windows costs about twice the series, not its square.
    """
    times, values = series
    found: list[float | None] = []
    for start, end in windows:
        first = bisect.bisect_left(times, start - energy.LOOKBACK_MS)
        inside = bisect.bisect_left(times, start)
        last = bisect.bisect_left(times, end)
        if inside == last:
            found.append(None)
            continue
        found.append(
            energy.window_energy(
                times[first:last], values[first:last], max_power_w, (start, end)
            )
        )
    return found


async def installation_energy(
    conn: AsyncConnection[Any],
    installation_ids: list[int],
    windows: dict[int, list[tuple[int, int]]],
) -> dict[int, list[float | None]]:
    """Compute each installation's inverter energy in each of its windows, in Wh.

    `windows` maps an installation id to its windows (Unix ms, from inclusive, to
    exclusive). A window in which no counter has a reading is None.
    """
    span = (
        min(w[0] for ws in windows.values() for w in ws),
        max(w[1] for ws in windows.values() for w in ws),
    )
    counters = await inverter_counters(conn, installation_ids, span)
    series = await last_series(
        conn, installation_ids, [c.channel_id for c in counters], span
    )
    totals: dict[int, list[float | None]] = {
        installation_id: [None] * len(ws) for installation_id, ws in windows.items()
    }
    for counter in counters:
        per_window = energy_in_windows(
            series.get(counter.channel_id, ([], [])),
            counter.max_power_w,
            windows[counter.installation_id],
        )
        total = totals[counter.installation_id]
        for index, value in enumerate(per_window):
            if value is not None:
                total[index] = (total[index] or 0.0) + value
    return totals


_POWER_BUCKETS = """
SELECT (extract(epoch FROM r.bucket) * 1000)::bigint, sum(r.sum / r.count)
FROM rollup_5m r JOIN channels c ON c.id = r.channel_id
WHERE r.installation_id = %(installation_id)s AND c.installation_id = r.installation_id
  AND c.id = ANY(%(channel_ids)s) AND r.bucket >= %(start)s AND r.bucket < %(end)s
GROUP BY r.bucket ORDER BY r.bucket
"""

_AC_POWER_CHANNELS = """
SELECT device_id, id, name FROM channels
WHERE installation_id = %(installation_id)s AND name = ANY(%(names)s)
"""


async def power_buckets(
    conn: AsyncConnection[Any], installation_id: int, window: tuple[int, int]
) -> list[list[Any]]:
    """Return the installation's AC power per 5-minute bucket of `window`.

    Each point is `[bucket start ms, watts]`: the sum over inverters of each one's
    average AC power in the bucket, or None where no inverter reported one.
    """
    cur = await conn.execute(
        _AC_POWER_CHANNELS,
        {"installation_id": installation_id, "names": list(measures.AC_POWER_CHANNELS)},
    )
    by_device: dict[int, dict[str, int]] = {}
    for device, channel_id, name in await cur.fetchall():
        by_device.setdefault(device, {})[name] = channel_id
    channel_ids = []
    for names in by_device.values():
        chosen = measures.measure_channels(names).ac_power
        if chosen is not None:
            channel_ids.append(names[chosen])
    cur = await conn.execute(
        _POWER_BUCKETS,
        {
            "installation_id": installation_id,
            "channel_ids": channel_ids,
            "start": to_datetime(window[0]),
            "end": to_datetime(window[1]),
        },
    )
    watts = dict(await cur.fetchall())
    return [
        [bucket, watts.get(bucket)]
        for bucket in range(window[0], window[1], BUCKET_MS)
    ]
