-- $1 key, $2 force. Removes the record of the key if there is one (as get.sql finds it) and it
-- is completed, or in flight and $2 is true. Returns no row for no record, else the state and
-- token found and how many rows it removed (0: in flight and not forced). FOR UPDATE holds the
-- row against a concurrent claim, complete or renew until the end, and re-reads it if one
-- changed it meanwhile. The key's waiters, in every process, are woken by the notification
-- (see notify.rs).
WITH cur AS (
    SELECT key, token, state FROM {table}
    WHERE key = $1::text AND {exists}
    FOR UPDATE
),
gone AS (
    DELETE FROM {table} AS r USING cur
    WHERE r.key = cur.key AND (cur.state = 'completed' OR $2::boolean)
    RETURNING r.key, pg_notify('{channel}', r.key)
)
SELECT state, token, (SELECT count(*) FROM gone) AS removed FROM cur
