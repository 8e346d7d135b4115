CREATE TABLE IF NOT EXISTS {table} (
    key             text        PRIMARY KEY,
    token           bigint      NOT NULL,
    fingerprint     bytea,
    state           text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    record          bytea,
    expires_at      timestamptz NOT NULL,
    steps           bytea,
    operation       text,
    status          text,
    result          jsonb,
    created_at      timestamptz,
    completed_at    timestamptz,
    fingerprint_hex text
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS steps bytea;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS operation text, ADD COLUMN IF NOT EXISTS status text, ADD COLUMN IF NOT EXISTS result jsonb, ADD COLUMN IF NOT EXISTS created_at timestamptz, ADD COLUMN IF NOT EXISTS completed_at timestamptz, ADD COLUMN IF NOT EXISTS fingerprint_hex text;
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
CREATE INDEX IF NOT EXISTS {status_index} ON {table} (status, created_at);
