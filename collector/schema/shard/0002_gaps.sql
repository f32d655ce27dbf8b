-- Data gaps, device state history, and readings rejected for their time.

-- Readings of a batch not stored because their time cannot be right: more than the
-- collector's future tolerance ahead of its clock, or before 2000-01-01 UTC.
ALTER TABLE batches ADD COLUMN rejected integer NOT NULL DEFAULT 0;

-- Every state a gateway reported, one row per device and poll time. Ranges of
-- offline, refused, not-sunspec and malformed states are derived from it at read
-- time, so a backlog batch that arrives late still closes or splits them.
CREATE TABLE device_states (
    installation_id bigint NOT NULL,
    device_id bigint NOT NULL REFERENCES devices (id),
    time timestamptz NOT NULL,
    state text NOT NULL,
    PRIMARY KEY (installation_id, device_id, time)
);

-- The gateway-offline check looks for the newest state of any device before a time.
CREATE INDEX device_states_installation_time ON device_states (installation_id, time);

-- Polls that a gateway's buffer dropped (reason buffer-full or disk-full), as its
-- batches reported them. A resent report of the same range is stored once.
CREATE TABLE gaps (
    installation_id bigint NOT NULL,
    device_id bigint NOT NULL REFERENCES devices (id),
    first_time timestamptz NOT NULL,
    last_time timestamptz NOT NULL,
    reason text NOT NULL,
    readings bigint NOT NULL,
    polls bigint NOT NULL,
    batch_id text NOT NULL,
    PRIMARY KEY (installation_id, device_id, first_time, last_time, reason)
);
