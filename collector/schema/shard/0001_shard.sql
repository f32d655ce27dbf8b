-- Shard: devices, channels and readings of the installations assigned to this shard.
-- Every table carries installation_id, so an installation can move between shards and
-- a distributed engine can use it as the distribution column.

CREATE TABLE devices (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    installation_id bigint NOT NULL,
    -- The device's own identity: its serial number, or "<host>:<port>/<unit id>".
    device_id text NOT NULL,
    name text NOT NULL DEFAULT '',
    manufacturer text,
    model text,
    serial text,
    version text,
    address text,
    active boolean NOT NULL DEFAULT true,
    -- Latest reported state (online, sleeping, offline, ...) and when it was reported.
    state text,
    state_time timestamptz,
    first_seen timestamptz NOT NULL DEFAULT now(),
    UNIQUE (installation_id, device_id)
);

CREATE TABLE channels (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    installation_id bigint NOT NULL,
    device_id bigint NOT NULL REFERENCES devices (id),
    name text NOT NULL,
    -- The measured quantity without its model prefix: "W" for "701.W".
    parameter text NOT NULL,
    unit text,
    last_time timestamptz,
    last_value double precision,
    first_seen timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, name)
);

CREATE INDEX channels_installation_id ON channels (installation_id);

-- One partition per calendar month (UTC), created by ensure_readings_partition().
CREATE TABLE readings (
    installation_id bigint NOT NULL,
    channel_id bigint NOT NULL,
    time timestamptz NOT NULL,
    value double precision,
    PRIMARY KEY (installation_id, channel_id, time)
) PARTITION BY RANGE (time);

-- Batches already committed, so that a resent batch is recognised and not stored again.
CREATE TABLE batches (
    installation_id bigint NOT NULL,
    batch_id text NOT NULL,
    gateway_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    readings integer NOT NULL,
    stored integer,
    PRIMARY KEY (installation_id, batch_id)
);

-- Create the readings partition for the UTC month holding `at`, unless it exists, and
-- return its name. Concurrent callers are serialised by an advisory lock, and a caller
-- that still loses a race to a concurrent CREATE treats the partition as existing.
CREATE FUNCTION ensure_readings_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at, 'UTC');
    -- Month arithmetic in UTC, whatever the session's TimeZone is.
    month_end timestamptz :=
        ((month_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    partition_name text := 'readings_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('solarfleet.readings_partitions'));
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
            partition_name, month_start, month_end);
    EXCEPTION WHEN duplicate_table OR unique_violation THEN
        NULL;
    END;
    RETURN partition_name;
END
$$;
