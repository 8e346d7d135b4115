CREATE TABLE IF NOT EXISTS {table} (
    key         text        PRIMARY KEY,
    token       bigint      NOT NULL,
    fingerprint bytea,
    state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    record      bytea,
    expires_at  timestamptz NOT NULL,
    steps       bytea
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS steps bytea;
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
