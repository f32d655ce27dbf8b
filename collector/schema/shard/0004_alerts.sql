-- Alerts with an open / resolved lifecycle, written by the alert evaluator.
-- An alert concerns an installation, or one of its devices when device_id is set.
-- The id is a UUID so that it stays unique across shards and when an installation
-- moves to another shard.

CREATE TABLE alerts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    installation_id bigint NOT NULL,
    device_id bigint REFERENCES devices (id),
    kind text NOT NULL,
    severity text NOT NULL,
    message text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    opened_at timestamptz NOT NULL,
    resolved_at timestamptz,
    CHECK (resolved_at IS NULL OR resolved_at >= opened_at)
);

-- At most one open alert per installation, device and kind. Device row ids start at
-- 1, so 0 stands for "the installation itself".
CREATE UNIQUE INDEX alerts_open ON alerts (installation_id, coalesce(device_id, 0), kind)
    WHERE resolved_at IS NULL;

-- The alerts API lists an installation's alerts newest first.
CREATE INDEX alerts_installation_opened ON alerts (installation_id, opened_at DESC);
