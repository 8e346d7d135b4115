-- $1 the most rows to delete. Completed rows past their ttl, and abandoned in-flight rows.
-- SKIP LOCKED: a row locked right now is being claimed or renewed, so not garbage.
-- One index range scan up to now(); of the in-flight rows in it, only abandoned ones go.
DELETE FROM {table} WHERE expires_at <= now()
    AND (state = 'completed' OR expires_at <= now() - interval '{retention_us} microseconds')
    AND key IN (
        SELECT key FROM {table} WHERE expires_at <= now()
            AND (state = 'completed' OR expires_at <= now() - interval '{retention_us} microseconds')
        LIMIT $1::bigint FOR UPDATE SKIP LOCKED
    )
