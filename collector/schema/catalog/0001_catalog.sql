-- Catalog: owners, the shard of each installation, and the gateways that may send data.

CREATE TABLE shards (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    -- Connection string as last registered by `migrate`, without a password. The
    -- collector connects with the DSN from its config.
    dsn text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE owners (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    organization text,
    email text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE installations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES owners (id),
    name text NOT NULL,
    timezone text NOT NULL DEFAULT 'UTC',
    shard_id integer NOT NULL REFERENCES shards (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX installations_owner_id ON installations (owner_id);
CREATE INDEX installations_shard_id ON installations (shard_id);

-- A gateway sends batches for one installation. Only the SHA-256 of its token is kept.
CREATE TABLE gateways (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway_id text NOT NULL UNIQUE,
    installation_id bigint NOT NULL REFERENCES installations (id),
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX gateways_installation_id ON gateways (installation_id);

-- Operator API keys for the read API. Only the SHA-256 of each key is kept.
CREATE TABLE keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
