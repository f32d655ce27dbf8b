-- Rollups of the readings per channel: 5-minute, hourly and daily (UTC day) buckets.
-- Ingest merges the readings it actually inserted into them in the batch's own
-- transaction, so a resent reading is counted once. Null values are left out: `count`
-- counts values, and a bucket whose readings are all null has no row. `first_*` and
-- `last_*` are the values with the earliest and latest time in the bucket, whatever
-- order the readings arrived in.

CREATE TABLE rollup_5m (
    installation_id bigint NOT NULL,
    channel_id bigint NOT NULL,
    bucket timestamptz NOT NULL,
    count integer NOT NULL,
    sum double precision NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    first_time timestamptz NOT NULL,
    first_value double precision NOT NULL,
    last_time timestamptz NOT NULL,
    last_value double precision NOT NULL,
    PRIMARY KEY (installation_id, channel_id, bucket)
);

CREATE TABLE rollup_1h (LIKE rollup_5m INCLUDING ALL);
CREATE TABLE rollup_1d (LIKE rollup_5m INCLUDING ALL);
