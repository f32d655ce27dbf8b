"""Gaps in an installation's data: time ranges without readings, and why.

Three kinds, so that a chart shows "no data" rather than zero production:

- `buffer`: polls that the gateway's buffer dropped (`buffer-full`, `disk-full`), as
  its batches reported them;
- `device`: a device reported `offline`, `refused`, `not-sunspec` or `malformed`;
- `gateway`: neither a reading nor a state of any device for longer than
  `[server] gateway_offline_after`. A gateway that buffers through an uplink outage
  sends its polls later with their own times, so that outage is no gap.

Reported drops are stored as they arrive. Device and gateway gaps are derived from the
stored states and readings when they are read, so a backlog batch that arrives late
closes or splits them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from collector.batch import Batch

DEVICE_DOWN_STATES = ("offline", "refused", "not-sunspec", "malformed")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_INSERT_STATES = """
INSERT INTO device_states (installation_id, device_id, time, state)
SELECT %(installation_id)s, d.id, s.time, s.state
FROM unnest(%(device_ids)s::text[], %(times)s::timestamptz[], %(states)s::text[])
     AS s (device_id, time, state)
JOIN devices d ON d.installation_id = %(installation_id)s AND d.device_id = s.device_id
ON CONFLICT DO NOTHING
"""

_INSERT_GAPS = """
INSERT INTO gaps (installation_id, device_id, first_time, last_time, reason, readings,
                  polls, batch_id)
SELECT %(installation_id)s, d.id, g.first_time, g.last_time, g.reason, g.readings,
       g.polls, %(batch_id)s
FROM unnest(%(device_ids)s::text[], %(first_times)s::timestamptz[],
            %(last_times)s::timestamptz[], %(reasons)s::text[], %(readings)s::bigint[],
            %(polls)s::bigint[])
     AS g (device_id, first_time, last_time, reason, readings, polls)
JOIN devices d ON d.installation_id = %(installation_id)s AND d.device_id = g.device_id
ON CONFLICT DO NOTHING
"""

_SELECT_REPORTED = """
SELECT d.device_id, (extract(epoch FROM g.first_time) * 1000)::bigint,
       (extract(epoch FROM g.last_time) * 1000)::bigint, g.reason, g.readings, g.polls
FROM gaps g JOIN devices d ON d.id = g.device_id
WHERE g.installation_id = %(installation_id)s
  AND g.first_time < %(to)s AND g.last_time >= %(from)s
ORDER BY g.first_time, d.device_id
"""

# Each device's states in the window, the one before it, and the first after it.
_SELECT_STATES = """
SELECT d.device_id, (extract(epoch FROM s.time) * 1000)::bigint, s.state
FROM devices d, LATERAL (
    (SELECT time, state FROM device_states
     WHERE installation_id = d.installation_id AND device_id = d.id
       AND time < %(from)s ORDER BY time DESC LIMIT 1)
    UNION ALL
    (SELECT time, state FROM device_states
     WHERE installation_id = d.installation_id AND device_id = d.id
       AND time >= %(from)s AND time < %(to)s)
    UNION ALL
    (SELECT time, state FROM device_states
     WHERE installation_id = d.installation_id AND device_id = d.id
       AND time >= %(to)s ORDER BY time LIMIT 1)
) AS s
WHERE d.installation_id = %(installation_id)s
ORDER BY d.device_id, s.time
"""

_SELECT_ACTIVITY = """
SELECT DISTINCT (extract(epoch FROM time) * 1000)::bigint AS t FROM (
    SELECT time FROM device_states
    WHERE installation_id = %(installation_id)s AND time >= %(from)s AND time < %(to)s
    UNION ALL
    SELECT time FROM readings
    WHERE installation_id = %(installation_id)s AND time >= %(from)s AND time < %(to)s
) AS activity ORDER BY t
"""

# The newest state or reading before the window, found through the primary keys of
# device_states and readings, one device or channel at a time.
_SELECT_ACTIVITY_BEFORE = """
SELECT (extract(epoch FROM max(t)) * 1000)::bigint FROM (
    SELECT (SELECT max(time) FROM device_states s
            WHERE s.installation_id = d.installation_id AND s.device_id = d.id
              AND s.time < %(from)s) AS t
    FROM devices d WHERE d.installation_id = %(installation_id)s
    UNION ALL
    SELECT (SELECT max(time) FROM readings r
            WHERE r.installation_id = c.installation_id AND r.channel_id = c.id
              AND r.time < %(from)s)
    FROM channels c WHERE c.installation_id = %(installation_id)s
) AS before
"""

_SELECT_ACTIVITY_AFTER = """
SELECT (extract(epoch FROM min(t)) * 1000)::bigint FROM (
    SELECT (SELECT min(time) FROM device_states s
            WHERE s.installation_id = d.installation_id AND s.device_id = d.id
              AND s.time >= %(to)s) AS t
    FROM devices d WHERE d.installation_id = %(installation_id)s
    UNION ALL
    SELECT (SELECT min(time) FROM readings r
            WHERE r.installation_id = c.installation_id AND r.channel_id = c.id
              AND r.time >= %(to)s)
    FROM channels c WHERE c.installation_id = %(installation_id)s
) AS after
"""


@dataclass(frozen=True, slots=True)
class DataGap:
    """A time range without data, clipped to the window that was asked for.

    `first_ms` and `last_ms` are Unix milliseconds. `ongoing` is true when no data
    has come since, so the range still grows.
    """

    kind: str  # "buffer", "device" or "gateway"
    device_id: str | None
    first_ms: int
    last_ms: int
    reason: str  # buffer-full, disk-full, a device state, or "gateway-offline"
    readings: int | None = None
    polls: int | None = None
    ongoing: bool = False

    def to_json(self) -> dict[str, Any]:
        """Return the gap as the gaps API sends it."""
        data = asdict(self)
        data["from"] = data.pop("first_ms")
        data["to"] = data.pop("last_ms")
        return data


async def store_states(
    conn: AsyncConnection[Any], installation_id: int, batch: Batch
) -> None:
    """Add the batch's device states to the state history; a resent one is kept once."""
    if not batch.states:
        return
    await conn.execute(
        _INSERT_STATES,
        {
            "installation_id": installation_id,
            "device_ids": [s.device_id for s in batch.states],
            "times": [_utc(s.time_ms) for s in batch.states],
            "states": [s.state for s in batch.states],
        },
    )


async def store_reported(
    conn: AsyncConnection[Any], installation_id: int, batch: Batch
) -> None:
    """Store the drops that the batch reports; a range reported again is kept once."""
    if not batch.gaps:
        return
    await conn.execute(
        _INSERT_GAPS,
        {
            "installation_id": installation_id,
            "batch_id": batch.batch_id,
            "device_ids": [g.device_id for g in batch.gaps],
            "first_times": [_utc(g.first_ms) for g in batch.gaps],
            "last_times": [_utc(g.last_ms) for g in batch.gaps],
            "reasons": [g.reason for g in batch.gaps],
            "readings": [g.readings for g in batch.gaps],
            "polls": [g.polls for g in batch.gaps],
        },
    )


async def find_gaps(
    conn: AsyncConnection[Any],
    installation_id: int,
    window: tuple[int, int],
    gateway_offline_ms: int,
    now_ms: int,
) -> list[DataGap]:
    """Return the gaps of an installation within `window` (from, to in Unix ms).

    Ranges are clipped to the window. The result is ordered by start time.
    """
    params = _window_params(installation_id, window)
    reported = await _reported(conn, params, window)
    # A gateway that dropped polls was polling, so drops count as its activity.
    dropped = [(gap.first_ms, gap.last_ms) for gap in reported]
    found = reported + await _device_down(conn, params, window)
    found += await _gateway_offline(
        conn, params, window, gateway_offline_ms, now_ms, dropped
    )
    return sorted(found, key=lambda g: (g.first_ms, g.kind, g.device_id or ""))


def _window_params(installation_id: int, window: tuple[int, int]) -> dict[str, Any]:
    start, end = window
    return {
        "installation_id": installation_id,
        "from": _utc(start),
        "to": _utc(end),
    }


async def _reported(
    conn: AsyncConnection[Any], params: dict[str, Any], window: tuple[int, int]
) -> list[DataGap]:
    cur = await conn.execute(_SELECT_REPORTED, params)
    return [
        DataGap(
            "buffer",
            device_id,
            max(first_ms, window[0]),
            min(last_ms, window[1]),
            reason,
            readings,
            polls,
        )
        for device_id, first_ms, last_ms, reason, readings, polls in (
            await cur.fetchall()
        )
    ]


async def _device_down(
    conn: AsyncConnection[Any], params: dict[str, Any], window: tuple[int, int]
) -> list[DataGap]:
    cur = await conn.execute(_SELECT_STATES, params)
    by_device: dict[str, list[tuple[int, str]]] = {}
    for device_id, time_ms, state in await cur.fetchall():
        by_device.setdefault(device_id, []).append((time_ms, state))
    found: list[DataGap] = []
    for device_id, states in by_device.items():
        found += down_ranges(device_id, states, window)
    return found


def down_ranges(
    device_id: str, states: list[tuple[int, str]], window: tuple[int, int]
) -> list[DataGap]:
    """Turn a device's states, ordered by time, into its down ranges in `window`.

    A range starts at the first down state after an up one (online, sleeping) and
    ends at the next up state. A range with no state after it is ongoing and ends at
    its last down state. `states` may hold one state before the window and one after.
    """
    start, end = window
    found: list[DataGap] = []
    run: tuple[int, int, str] | None = None  # first time, last time, first state
    for time_ms, state in states:
        if state in DEVICE_DOWN_STATES:
            run = (run[0], time_ms, run[2]) if run else (time_ms, time_ms, state)
            continue
        if run is not None:
            found.append(_clipped_down(device_id, run[0], time_ms, run[2], window))
            run = None
    if run is not None:
        # Only the first state after the window is read, so a run that reaches past
        # the window is clipped at its end and not known to be ongoing.
        ongoing = run[1] < end
        last_ms = run[1] if ongoing else end
        found.append(
            _clipped_down(device_id, run[0], last_ms, run[2], window, ongoing=ongoing)
        )
    return [
        g
        for g in found
        if g.first_ms < g.last_ms or (g.ongoing and start <= g.first_ms < end)
    ]


def _clipped_down(
    device_id: str,
    first_ms: int,
    last_ms: int,
    state: str,
    window: tuple[int, int],
    ongoing: bool = False,
) -> DataGap:
    first = max(first_ms, window[0])
    last = min(last_ms, window[1])
    return DataGap("device", device_id, first, last, state, ongoing=ongoing)


async def _gateway_offline(
    conn: AsyncConnection[Any],
    params: dict[str, Any],
    window: tuple[int, int],
    gateway_offline_ms: int,
    now_ms: int,
    dropped: list[tuple[int, int]],
) -> list[DataGap]:
    cur = await conn.execute(_SELECT_ACTIVITY, params)
    busy = [(row[0], row[0]) for row in await cur.fetchall()] + dropped
    cur = await conn.execute(_SELECT_ACTIVITY_BEFORE, params)
    before = (await cur.fetchone() or (None,))[0]
    cur = await conn.execute(_SELECT_ACTIVITY_AFTER, params)
    after = (await cur.fetchone() or (None,))[0]
    return silent_ranges(busy, before, after, window, gateway_offline_ms, now_ms)


def silent_ranges(
    busy: list[tuple[int, int]],
    before: int | None,
    after: int | None,
    window: tuple[int, int],
    gateway_offline_ms: int,
    now_ms: int,
) -> list[DataGap]:
    """Find the ranges longer than `gateway_offline_ms` without any activity.

    `busy` contains the (first, last) times of activity in the window: a reading or
    state is one instant, a reported drop a range. `before` is the last activity
    before the window and `after` the first one after it (None if there is none).
    With nothing before, the window's start counts as the last activity. With nothing
    after, silence up to the window's end or `now_ms`, whichever is earlier, is an
    ongoing gap.
    """
    start, end = window
    closing = after if after is not None else min(end, now_ms)
    spans = sorted([*busy, (closing, closing)])
    covered = start if before is None else before
    found = []
    for index, (first, last) in enumerate(spans):
        silent = (max(covered, start), min(first, end))  # clipped to the window
        if first - covered > gateway_offline_ms and silent[0] < silent[1]:
            ongoing = after is None and index == len(spans) - 1
            found.append(DataGap("gateway", None, *silent, "gateway-offline",
                                 ongoing=ongoing))
        covered = max(covered, last)
    return found


def _utc(time_ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=time_ms)
