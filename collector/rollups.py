"""Rollups of the readings: 5-minute, hourly and daily (UTC) buckets per channel.

Ingest calls `add_readings` with the rows it inserted, inside the batch's transaction,
so a reading already stored, and thus not inserted again, is never counted twice. The
rows are first aggregated here into buckets. One statement then merges the buckets into
the three rollup tables: counts and sums add up, min and max widen, and `first` and
`last` keep the value with the earliest and the latest time. Batches may therefore
arrive in any order. Null values are left out of every rollup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Rollup tables by resolution name, with their bucket width in milliseconds.
RESOLUTIONS: dict[str, tuple[str, int]] = {
    "5m": ("rollup_5m", 300_000),
    "1h": ("rollup_1h", 3_600_000),
    "1d": ("rollup_1d", 86_400_000),
}

# A row of the readings table: installation id, channel id, time, value.
ReadingRow = tuple[int, int, datetime, float | None]


@dataclass(slots=True)
class Bucket:
    """Aggregate of one channel's non-null values within one bucket."""

    count: int
    sum: float
    min: float
    max: float
    first_time: datetime
    first_value: float
    last_time: datetime
    last_value: float

    def merge(self, other: Bucket) -> None:
        """Fold `other`, an aggregate of the same channel and bucket, into this one."""
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.first_time < self.first_time:
            self.first_time, self.first_value = other.first_time, other.first_value
        if other.last_time > self.last_time:
            self.last_time, self.last_value = other.last_time, other.last_value

    def add(self, time: datetime, value: float) -> None:
        """Fold one reading into this aggregate."""
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if time < self.first_time:
            self.first_time, self.first_value = time, value
        if time > self.last_time:
            self.last_time, self.last_value = time, value


# Buckets by (channel id, bucket start).
Buckets = dict[tuple[int, datetime], Bucket]


def _merge_sql(table: str, prefix: str) -> str:
    return f"""
INSERT INTO {table} AS r (installation_id, channel_id, bucket, count, sum, min, max,
                          first_time, first_value, last_time, last_value)
SELECT %(installation_id)s, * FROM unnest(
    %({prefix}channel)b::bigint[], %({prefix}bucket)b::timestamptz[],
    %({prefix}count)b::integer[], %({prefix}sum)b::float8[], %({prefix}min)b::float8[],
    %({prefix}max)b::float8[], %({prefix}first_time)b::timestamptz[],
    %({prefix}first_value)b::float8[], %({prefix}last_time)b::timestamptz[],
    %({prefix}last_value)b::float8[])
ON CONFLICT (installation_id, channel_id, bucket) DO UPDATE SET
    count = r.count + EXCLUDED.count,
    sum = r.sum + EXCLUDED.sum,
    min = least(r.min, EXCLUDED.min),
    max = greatest(r.max, EXCLUDED.max),
    first_time = least(r.first_time, EXCLUDED.first_time),
    first_value = CASE WHEN EXCLUDED.first_time < r.first_time
                       THEN EXCLUDED.first_value ELSE r.first_value END,
    last_time = greatest(r.last_time, EXCLUDED.last_time),
    last_value = CASE WHEN EXCLUDED.last_time > r.last_time
                      THEN EXCLUDED.last_value ELSE r.last_value END
"""


# One round trip merges all three resolutions: data-modifying CTEs all run to
# completion whether or not the main statement reads them.
_MERGE_ALL = (
    f"WITH m5 AS ({_merge_sql('rollup_5m', 'm5_')}), "
    f"h1 AS ({_merge_sql('rollup_1h', 'h1_')}) "
    f"{_merge_sql('rollup_1d', 'd1_')}"
)


def aggregate(rows: Iterable[ReadingRow], width_ms: int) -> Buckets:
    """Aggregate readings into buckets of `width_ms`, aligned to the Unix epoch."""
    bucket_of: dict[datetime, datetime] = {}
    buckets: Buckets = {}
    for _, channel_id, time, value in rows:
        if value is None:
            continue
        start = bucket_of.get(time)
        if start is None:
            start = bucket_of[time] = bucket_start(time, width_ms)
        found = buckets.get((channel_id, start))
        if found is None:
            buckets[(channel_id, start)] = Bucket(
                1, value, value, value, time, value, time, value
            )
        else:
            found.add(time, value)
    return buckets


def coarsen(buckets: Buckets, width_ms: int) -> Buckets:
    """Merge buckets into wider ones of `width_ms`, a multiple of their width."""
    wider: Buckets = {}
    for (channel_id, start), bucket in buckets.items():
        key = (channel_id, bucket_start(start, width_ms))
        found = wider.get(key)
        if found is None:
            wider[key] = Bucket(*_fields(bucket))
        else:
            found.merge(bucket)
    return wider


def bucket_start(time: datetime, width_ms: int) -> datetime:
    """Return the start of the bucket of `width_ms` that contains `time`."""
    time_ms = (time - EPOCH) // timedelta(milliseconds=1)
    return EPOCH + timedelta(milliseconds=time_ms - time_ms % width_ms)


def _fields(bucket: Bucket) -> tuple[Any, ...]:
    return (
        bucket.count,
        bucket.sum,
        bucket.min,
        bucket.max,
        bucket.first_time,
        bucket.first_value,
        bucket.last_time,
        bucket.last_value,
    )


def _columns(prefix: str, buckets: Buckets) -> dict[str, list[Any]]:
    # Sorted by channel and bucket, so that concurrent batches of one installation
    # lock shared rollup rows in the same order and cannot deadlock.
    keys = sorted(buckets)
    columns: dict[str, list[Any]] = {
        f"{prefix}channel": [channel_id for channel_id, _ in keys],
        f"{prefix}bucket": [start for _, start in keys],
    }
    names = ("count", "sum", "min", "max", "first_time", "first_value", "last_time",
             "last_value")
    rows = [_fields(buckets[key]) for key in keys]
    for index, name in enumerate(names):
        columns[f"{prefix}{name}"] = [row[index] for row in rows]
    return columns


async def add_readings(
    conn: AsyncConnection[Any], installation_id: int, rows: list[ReadingRow]
) -> None:
    """Merge newly inserted readings into the 5-minute, hourly and daily rollups.

    Call it in the transaction that inserted `rows`, and only with rows that were
    inserted, never with readings that were already stored.
    """
    five = aggregate(rows, RESOLUTIONS["5m"][1])
    if not five:
        return
    hourly = coarsen(five, RESOLUTIONS["1h"][1])
    daily = coarsen(hourly, RESOLUTIONS["1d"][1])
    params: dict[str, Any] = {"installation_id": installation_id}
    params |= _columns("m5_", five) | _columns("h1_", hourly) | _columns("d1_", daily)
    await conn.execute(_MERGE_ALL, params)
