"""Storing a validated batch in its installation's shard, exactly once.

One shard transaction per batch: claim the batch id, register new devices and channels,
COPY the readings into the readings table (through a staging table that skips those
already stored, when there are any), merge the inserted readings into the rollups,
move each channel's latest value, and record the devices' latest states. The caller
replies 200 only after the commit, so a batch whose reply is lost is resent and then
recognised by its id.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection

from collector import gaps, rollups
from collector.batch import Batch

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A row of the readings table: installation id, channel id, time, value.
ReadingRow = tuple[int, int, datetime, float | None]

# ON COMMIT DELETE ROWS empties the table at every commit, and a pooled connection
# reuses it for the next batch instead of creating a table per batch.
_CREATE_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS staging_readings (
    installation_id bigint NOT NULL,
    channel_id bigint NOT NULL,
    time timestamptz NOT NULL,
    value double precision
) ON COMMIT DELETE ROWS
"""

_UPSERT_DEVICES = """
INSERT INTO devices AS d
    (installation_id, device_id, name, manufacturer, model, serial, version, address)
SELECT %(installation_id)s, * FROM unnest(
    %(device_ids)s::text[], %(names)s::text[], %(manufacturers)s::text[],
    %(models)s::text[], %(serials)s::text[], %(versions)s::text[],
    %(addresses)s::text[])
ON CONFLICT (installation_id, device_id) DO UPDATE SET
    name = EXCLUDED.name, manufacturer = EXCLUDED.manufacturer, model = EXCLUDED.model,
    serial = EXCLUDED.serial, version = EXCLUDED.version, address = EXCLUDED.address
WHERE (d.name, d.manufacturer, d.model, d.serial, d.version, d.address)
    IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.manufacturer, EXCLUDED.model,
                      EXCLUDED.serial, EXCLUDED.version, EXCLUDED.address)
"""

_UPSERT_CHANNELS = """
INSERT INTO channels AS c (installation_id, device_id, name, parameter, unit)
SELECT %(installation_id)s, d.id, ch.name, ch.parameter, ch.unit
FROM unnest(%(device_ids)s::text[], %(names)s::text[], %(parameters)s::text[],
            %(units)s::text[]) AS ch (device_id, name, parameter, unit)
JOIN devices d ON d.installation_id = %(installation_id)s AND d.device_id = ch.device_id
ORDER BY d.id, ch.name
ON CONFLICT (device_id, name) DO UPDATE SET unit = EXCLUDED.unit
WHERE c.unit IS DISTINCT FROM EXCLUDED.unit
"""

_SELECT_CHANNELS = """
SELECT d.device_id, c.name, c.id FROM channels c JOIN devices d ON d.id = c.device_id
WHERE c.installation_id = %(installation_id)s AND d.device_id = ANY(%(device_ids)s)
"""

# DISTINCT ON keeps one row per (channel, time) when a batch repeats a reading.
_INSERT_READINGS = """
INSERT INTO readings (installation_id, channel_id, time, value)
SELECT DISTINCT ON (channel_id, time) installation_id, channel_id, time, value
FROM staging_readings ORDER BY channel_id, time
ON CONFLICT DO NOTHING
RETURNING installation_id, channel_id, time, value
"""

_UPDATE_LATEST = """
UPDATE channels c SET last_time = s.time, last_value = s.value
FROM unnest(%(channel_ids)b::bigint[], %(times)b::timestamptz[],
            %(values)b::float8[]) AS s (channel_id, time, value)
WHERE c.id = s.channel_id AND (c.last_time IS NULL OR c.last_time < s.time)
"""

_COPY_READINGS = (
    "COPY readings (installation_id, channel_id, time, value) "
    "FROM STDIN (FORMAT BINARY)"
)
_COPY_STAGING = (
    "COPY staging_readings (installation_id, channel_id, time, value) "
    "FROM STDIN (FORMAT BINARY)"
)

_UPDATE_STATES = """
UPDATE devices d SET state = s.state, state_time = s.time
FROM (SELECT DISTINCT ON (device_id) device_id, time, state
      FROM unnest(%(device_ids)s::text[], %(times)s::timestamptz[], %(states)s::text[])
           AS u (device_id, time, state)
      ORDER BY device_id, time DESC) AS s
WHERE d.installation_id = %(installation_id)s AND d.device_id = s.device_id
  AND (d.state_time IS NULL OR d.state_time <= s.time)
"""


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Counts of a batch's readings stored now, already stored before, and rejected
    for a time that cannot be right."""

    batch_id: str
    stored: int
    duplicates: int
    rejected: int = 0


_channel_and_time = operator.itemgetter(1, 2)  # the sort key of reading rows


def to_datetime(time_ms: int) -> datetime:
    """Convert Unix milliseconds to an aware UTC datetime, exactly."""
    return EPOCH + timedelta(milliseconds=time_ms)


async def store_batch(
    conn: AsyncConnection[Any], installation_id: int, batch: Batch
) -> IngestResult:
    """Store `batch` for `installation_id` and commit.

    A batch id already stored for the installation stores nothing, and so does each
    reading whose channel and time are already stored.
    """
    await _ensure_partitions(conn, batch)
    async with conn.transaction():
        if not await _claim_batch(conn, installation_id, batch):
            logger.debug(
                "batch %s of %s already stored", batch.batch_id, batch.gateway_id
            )
            return IngestResult(
                batch.batch_id, 0, len(batch.readings), batch.rejected.readings
            )
        params = {"installation_id": installation_id}
        await _upsert_devices(conn, params, batch)
        channel_ids = await _upsert_channels(conn, params, batch)
        stored = await _insert_readings(conn, params, batch, channel_ids)
        await _update_states(conn, params, batch)
        await _store_history(conn, installation_id, batch)
        await conn.execute(
            "UPDATE batches SET stored = %s, rejected = %s "
            "WHERE installation_id = %s AND batch_id = %s",
            (stored, batch.rejected.readings, installation_id, batch.batch_id),
        )
    logger.debug(
        "batch %s of %s: %d stored, %d duplicates",
        batch.batch_id,
        batch.gateway_id,
        stored,
        len(batch.readings) - stored,
    )
    return IngestResult(
        batch.batch_id, stored, len(batch.readings) - stored, batch.rejected.readings
    )


async def _store_history(
    conn: AsyncConnection[Any], installation_id: int, batch: Batch
) -> None:
    # The state history and the reported drops feed the gaps API.
    await gaps.store_states(conn, installation_id, batch)
    await gaps.store_reported(conn, installation_id, batch)


async def _ensure_partitions(conn: AsyncConnection[Any], batch: Batch) -> None:
    # Creating a partition locks the whole readings table, so it happens in a short
    # transaction of its own before the batch transaction takes its row locks.
    # A batch holds few distinct times (one per poll round), so they are converted
    # once each.
    times = {r.time_ms for r in batch.readings}
    months = sorted(
        {
            to_datetime(time_ms).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
            for time_ms in times
        }
    )
    if not months:
        return
    async with conn.transaction():
        await conn.execute(
            "SELECT ensure_readings_partition(m) FROM unnest(%s::timestamptz[]) AS m",
            (months,),
        )


async def _claim_batch(
    conn: AsyncConnection[Any], installation_id: int, batch: Batch
) -> bool:
    # A concurrent transaction sending the same batch id waits here for this one's
    # outcome, so the same batch is never stored twice.
    cur = await conn.execute(
        "INSERT INTO batches (installation_id, batch_id, gateway_id, readings) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
        (installation_id, batch.batch_id, batch.gateway_id, len(batch.readings)),
    )
    return await cur.fetchone() is not None


async def _upsert_devices(
    conn: AsyncConnection[Any], params: dict[str, Any], batch: Batch
) -> None:
    # Sorted, so that concurrent batches lock shared rows in the same order.
    devices = sorted(batch.devices, key=lambda d: d.device_id)
    await conn.execute(
        _UPSERT_DEVICES,
        params
        | {
            "device_ids": [d.device_id for d in devices],
            "names": [d.name for d in devices],
            "manufacturers": [d.manufacturer for d in devices],
            "models": [d.model for d in devices],
            "serials": [d.serial for d in devices],
            "versions": [d.version for d in devices],
            "addresses": [d.address for d in devices],
        },
    )


async def _upsert_channels(
    conn: AsyncConnection[Any], params: dict[str, Any], batch: Batch
) -> dict[tuple[str, str], int]:
    channels = batch.channels
    await conn.execute(
        _UPSERT_CHANNELS,
        params
        | {
            "device_ids": [c.device_id for c in channels],
            "names": [c.name for c in channels],
            "parameters": [c.parameter for c in channels],
            "units": [c.unit for c in channels],
        },
    )
    cur = await conn.execute(
        _SELECT_CHANNELS,
        params
        | {
            "device_ids": sorted({c.device_id for c in channels}),
        },
    )
    return {(device_id, name): id_ for device_id, name, id_ in await cur.fetchall()}


async def _insert_readings(
    conn: AsyncConnection[Any],
    params: dict[str, Any],
    batch: Batch,
    channel_ids: dict[tuple[str, str], int],
) -> int:
    """Insert the batch's readings that are not stored yet; return how many."""
    if not batch.readings:
        return 0
    rows = _reading_rows(params["installation_id"], batch, channel_ids)
    # Nearly every batch holds only new readings, so they are copied straight into
    # readings. A reading already stored (the same poll resent under another batch
    # id) raises a unique violation, and then the batch takes the slower way through
    # a staging table that skips the stored ones.
    try:
        async with conn.transaction():
            await _copy(conn, _COPY_READINGS, rows)
        inserted = rows
    except psycopg.errors.UniqueViolation:
        inserted = await _insert_new_readings(conn, params, rows)
    await rollups.add_readings(conn, params["installation_id"], inserted)
    await _update_latest(conn, rows)
    return len(inserted)


def _reading_rows(
    installation_id: int, batch: Batch, channel_ids: dict[tuple[str, str], int]
) -> list[ReadingRow]:
    """Return the readings as rows of readings, sorted by channel and time.

    Sorted, so that concurrent batches that hold the same readings take their locks
    in the same order and cannot deadlock.
    """
    times = {time_ms: to_datetime(time_ms) for time_ms in {r.time_ms for r in
                                                           batch.readings}}
    rows = [
        (installation_id, channel_ids[(r.device_id, r.channel)], times[r.time_ms],
         r.value)
        for r in batch.readings
    ]
    rows.sort(key=_channel_and_time)
    return rows


async def _copy(conn: AsyncConnection[Any], statement: str,
                rows: list[ReadingRow]) -> None:
    async with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(["int8", "int8", "timestamptz", "float8"])
        for row in rows:
            await copy.write_row(row)


async def _insert_new_readings(
    conn: AsyncConnection[Any], params: dict[str, Any], rows: list[ReadingRow]
) -> list[ReadingRow]:
    """Insert the rows not stored yet, through the staging table; return those."""
    await conn.execute(_CREATE_STAGING)
    await _copy(conn, _COPY_STAGING, rows)
    cur = await conn.execute(_INSERT_READINGS, params)
    return await cur.fetchall()


async def _update_latest(conn: AsyncConnection[Any], rows: list[ReadingRow]) -> None:
    # Rows are sorted by channel and time, so each channel's last row is its latest.
    latest = {channel_id: (time, value) for _, channel_id, time, value in rows}
    await conn.execute(
        _UPDATE_LATEST,
        {
            "channel_ids": list(latest),
            "times": [time for time, _ in latest.values()],
            "values": [value for _, value in latest.values()],
        },
    )


async def _update_states(
    conn: AsyncConnection[Any], params: dict[str, Any], batch: Batch
) -> None:
    if not batch.states:
        return
    await conn.execute(
        _UPDATE_STATES,
        params
        | {
            "device_ids": [s.device_id for s in batch.states],
            "times": [to_datetime(s.time_ms) for s in batch.states],
            "states": [s.state for s in batch.states],
        },
    )
