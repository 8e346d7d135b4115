-- $1 key, $2 token. Only while the claim holds the key: in flight under the token, its lease
-- perhaps ended, but not abandoned (nobody took over).
-- The key's waiters, in every process, are woken by the notification (see notify.rs).
WITH done AS (
    DELETE FROM {table}
    WHERE key = $1::text AND token = $2::bigint AND state = 'in_flight'
        AND expires_at > now() - interval '{retention_us} microseconds'
    RETURNING key
)
SELECT pg_notify('{channel}', key) FROM done
