-- Creates what is missing. The `1` inserted as `schema_version` is `SCHEMA_VERSION` in mod.rs.

-- One row: the schema version and the last fencing token handed out. Every claim that
-- acquires a key increments `last_token` in its own transaction, so tokens strictly increase
-- across keys, processes, restarts and deletions of records.
CREATE TABLE IF NOT EXISTS idem_meta (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    last_token     INTEGER NOT NULL
) STRICT;
INSERT INTO idem_meta (id, schema_version, last_token) VALUES (1, 1, 0) ON CONFLICT (id) DO NOTHING;

-- One row per storage key (64 hex digits; never the raw user key).
CREATE TABLE IF NOT EXISTS idem_records (
    key         TEXT PRIMARY KEY NOT NULL,
    fingerprint BLOB,                                 -- 32 bytes, or NULL: matches any
    token       INTEGER NOT NULL,                     -- fencing token of the claim
    state       INTEGER NOT NULL CHECK (state IN (0, 1)), -- 0 in flight, 1 completed
    expires_at  INTEGER NOT NULL,                     -- unix ms: lease end, or ttl end
    record      BLOB,                                 -- the encoded record once completed
    claimed_at  INTEGER,                              -- unix ms of the claim, or NULL (see below)
    steps       BLOB,                                 -- in flight: the call's steps, or NULL
    -- Readable columns, for operators (the engine reads only the columns above):
    operation       TEXT,    -- the operation's name (NULL in flight and for plain calls)
    status          TEXT,    -- 'processing', 'completed', 'failed' (a kept error), 'unknown'
    result          TEXT,    -- the stored answer as JSON text, when it is JSON
    created_at      TEXT,    -- the claim time, ISO-8601 UTC ('2026-12-07T13:30:00.123Z')
    completed_at    TEXT,    -- the completion time, ISO-8601 UTC
    fingerprint_hex TEXT     -- the fingerprint in hex
) STRICT;
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
-- A table made before `claimed_at`, `steps` or the readable columns existed gets them from
-- has_column.sql and the add_*.sql files, run after this file, and then the status index from
-- status_index.sql; its rows, and the rows that builds of before claim, hold NULL there.
