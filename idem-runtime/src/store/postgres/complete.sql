-- $1 key, $2 token, $3 record, $4 ttl in microseconds, and the readable columns the record
-- module derives from the record: $5 operation, $6 status, $7 result as JSON text (each may be
-- NULL). Only while the claim holds the key: in
-- flight under the token, its lease perhaps ended, but not abandoned (nobody took over).
-- The result replaces the call's steps.
-- The key's waiters, in every process, are woken by the notification (see notify.rs).
WITH done AS (
    UPDATE {table} SET state = 'completed', record = $3::bytea, steps = NULL,
        expires_at = clock_timestamp() + $4::bigint * interval '1 microsecond',
        operation = $5::text, status = $6::text, result = $7::text::jsonb,
        completed_at = clock_timestamp()
    WHERE key = $1::text AND token = $2::bigint AND state = 'in_flight'
        AND expires_at > now() - interval '{retention_us} microseconds'
    RETURNING key
)
SELECT pg_notify('{channel}', key) FROM done
