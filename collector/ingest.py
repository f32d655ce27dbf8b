"""Storing a validated batch in its installation's shard, exactly once.

One shard transaction per batch: claim the batch id, register new devices and channels,
COPY the readings into a staging table, insert those not stored yet into readings,
merge the inserted ones into the rollups and move each channel's latest value (one
statement), and record the devices' latest states. The caller
replies 200 only after the commit, so a batch whose reply is lost is resent and then
recognised by its id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection

from collector import gaps, rollups
from collector.batch import Batch

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# ON COMMIT DELETE ROWS empties the table at every commit, and a pooled connection
# reuses it for the next batch instead of creating a table per batch. It contains the
# batch's readings as they came, and PostgreSQL resolves their channel ids.
_CREATE_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS staging_batch_readings (
    device_id text NOT NULL,
    channel text NOT NULL,
    time_ms bigint NOT NULL,
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

_COPY_STAGING = (
    "COPY staging_batch_readings (device_id, channel, time_ms, value) "
    "FROM STDIN (FORMAT BINARY)"
)

# One statement inserts the staged readings, moves each channel's latest value and
# merges the inserted rows into the rollups. DISTINCT ON keeps one row per channel
# and time when a batch repeats a reading. Rows are sorted by channel and time, so
# that concurrent batches with the same readings lock them in the same order.
# PostgreSQL materialises `batch_rows` in that order because it is read twice.
_STORE_READINGS = """
WITH batch_rows AS (
    SELECT DISTINCT ON (c.id, s.time_ms) c.id AS channel_id,
           timestamptz 'epoch' + s.time_ms * interval '1 millisecond' AS time,
           s.value
    FROM staging_batch_readings s
    JOIN devices d
      ON d.installation_id = %(installation_id)s AND d.device_id = s.device_id
    JOIN channels c ON c.device_id = d.id AND c.name = s.channel
    ORDER BY c.id, s.time_ms
),
inserted AS (
    INSERT INTO readings (installation_id, channel_id, time, value)
    SELECT %(installation_id)s, channel_id, time, value FROM batch_rows
    {on_conflict}
    RETURNING channel_id, time, value
),
latest AS (
    UPDATE channels c SET last_time = l.time, last_value = l.value
    FROM (SELECT DISTINCT ON (channel_id) channel_id, time, value FROM batch_rows
          ORDER BY channel_id, time DESC) AS l
    WHERE c.id = l.channel_id AND (c.last_time IS NULL OR c.last_time < l.time)
){rollups}
SELECT count(*) FROM inserted
"""
# Nearly every batch contains only new readings. The second form skips stored ones.
_INSERT_NEW = _STORE_READINGS.format(on_conflict="", rollups=rollups.merge_ctes(
    "inserted"))
_INSERT_SKIPPING_STORED = _STORE_READINGS.format(
    on_conflict="ON CONFLICT DO NOTHING", rollups=rollups.merge_ctes("inserted"))

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
        await _upsert_channels(conn, params, batch)
        stored = await _insert_readings(conn, params, batch)
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
) -> None:
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


async def _insert_readings(
    conn: AsyncConnection[Any], params: dict[str, Any], batch: Batch
) -> int:
    """Insert the batch's readings that are not stored yet; return how many.

    The readings go to the staging table as they came, because building a row per
    reading in Python costs more than PostgreSQL's join to the channels.
    """
    if not batch.readings:
        return 0
    await conn.execute(_CREATE_STAGING)
    async with conn.cursor() as cur, cur.copy(_COPY_STAGING) as copy:
        copy.set_types(["text", "text", "int8", "float8"])
        for reading in batch.readings:
            await copy.write_row(reading)
    # A reading already stored (the same poll resent under another batch id) raises
    # a unique violation, and then the statement runs again skipping stored ones.
    try:
        async with conn.transaction():
            cur = await conn.execute(_INSERT_NEW, params)
    except psycopg.errors.UniqueViolation:
        cur = await conn.execute(_INSERT_SKIPPING_STORED, params)
    row = await cur.fetchone()
    assert row is not None  # a count(*) always returns one row
    return int(row[0])


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
