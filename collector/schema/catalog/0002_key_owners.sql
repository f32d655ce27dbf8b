-- Owner keys: a key with an owner_id reads only that owner's installations. A key
-- without one is an operator key and reads the whole fleet.
ALTER TABLE keys ADD COLUMN owner_id bigint REFERENCES owners (id);

CREATE INDEX keys_owner_id ON keys (owner_id);
