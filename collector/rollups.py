"""Rollups of the readings: 5-minute, hourly and daily (UTC) buckets per channel.

Ingest merges the rows that a batch inserted into the three rollup tables, inside the
batch's transaction and statement, so a reading already stored, and thus not inserted
again, is never counted twice. PostgreSQL aggregates the inserted rows into 5-minute
buckets, the 5-minute buckets into hourly ones and those into daily ones. Merging a
bucket into a stored one adds up counts and sums, widens min and max, and keeps as
`first` and `last` the value with the earliest and the latest time, so batches may
arrive in any order. Null values are left out of every rollup.
"""

from __future__ import annotations

# Rollup tables by resolution name, with their bucket width in milliseconds.
RESOLUTIONS: dict[str, tuple[str, int]] = {
    "5m": ("rollup_5m", 300_000),
    "1h": ("rollup_1h", 3_600_000),
    "1d": ("rollup_1d", 86_400_000),
}

_COLUMNS = (
    "channel_id, bucket, count, sum, min, max, first_time, first_value, last_time, "
    "last_value"
)

# Buckets are aligned to the Unix epoch, which makes them UTC-aligned.
_FIVE_MINUTES = """
SELECT channel_id, date_bin('5 minutes', time, timestamptz 'epoch') AS bucket,
       count(*)::integer AS count, sum(value) AS sum, min(value) AS min,
       max(value) AS max, min(time) AS first_time,
       (array_agg(value ORDER BY time))[1] AS first_value, max(time) AS last_time,
       (array_agg(value ORDER BY time DESC))[1] AS last_value
FROM {source} WHERE value IS NOT NULL GROUP BY 1, 2
"""

_COARSER = """
SELECT channel_id, date_bin('{width}', bucket, timestamptz 'epoch') AS bucket,
       sum(count)::integer AS count, sum(sum) AS sum, min(min) AS min,
       max(max) AS max, min(first_time) AS first_time,
       (array_agg(first_value ORDER BY first_time))[1] AS first_value,
       max(last_time) AS last_time,
       (array_agg(last_value ORDER BY last_time DESC))[1] AS last_value
FROM {source} GROUP BY 1, 2
"""

# Ordered by channel and bucket, so that concurrent batches of one installation lock
# shared rollup rows in the same order and do not deadlock. NOTE: PostgreSQL inserts the
# rows of INSERT ... SELECT ... ORDER BY in that order, but the SQL standard does not
# promise it.
_MERGE = """
INSERT INTO {table} AS r (installation_id, {columns})
SELECT %(installation_id)s, {columns} FROM {source} ORDER BY channel_id, bucket
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


def merge_ctes(source: str) -> str:
    """Return common table expressions that merge the rows of `source` into the
    5-minute, hourly and daily rollups.

    `source` names an earlier common table expression of the same statement with
    the columns `channel_id`, `time` and `value`: the rows that the statement
    inserted into readings, never readings that were already stored. The statement
    must bind `installation_id`. Each expression starts with a comma, to follow
    the statement's earlier ones; data-modifying ones run to completion whether or
    not the main statement reads them.
    """
    parts = [
        ("rollup_five", _FIVE_MINUTES.format(source=source)),
        ("rollup_hour", _COARSER.format(width="1 hour", source="rollup_five")),
        ("rollup_day", _COARSER.format(width="1 day", source="rollup_hour")),
    ]
    for name, (table, _) in zip(("rollup_five", "rollup_hour", "rollup_day"),
                                RESOLUTIONS.values()):
        merge = _MERGE.format(table=table, columns=_COLUMNS, source=name)
        parts.append((f"merge_{table}", merge))
    return "".join(f",\n{name} AS ({sql})" for name, sql in parts)
