-- $1 key, $2 fingerprint (or NULL), $3 lease in microseconds. See the module docs.
-- An acquired claim also writes the readable columns: status '{processing}', the claim time in
-- `created_at`, the fingerprint in hex, and no operation, result or completion time yet.
-- A takeover of an in-flight row keeps its steps for the new holder; acquiring a completed row
-- past its ttl starts with none, as does an insert. `cur` does not read the steps: a claim that
-- finds a live record never needs them.
WITH cur AS (
    SELECT token, fingerprint, state, record, expires_at > now() AS live
    FROM {table} WHERE key = $1::text
),
next AS MATERIALIZED (
    SELECT nextval('{sequence}') AS token
    WHERE NOT EXISTS (SELECT 1 FROM cur WHERE live)
),
ins AS (
    INSERT INTO {table} AS r (key, token, fingerprint, state, record, expires_at,
                              operation, status, result, created_at, completed_at, fingerprint_hex)
    SELECT $1::text, next.token, $2::bytea, 'in_flight', NULL,
           clock_timestamp() + $3::bigint * interval '1 microsecond',
           NULL, '{processing}', NULL, clock_timestamp(), NULL, encode($2::bytea, 'hex')
    FROM next
    ON CONFLICT (key) DO UPDATE SET
        token       = CASE WHEN r.expires_at <= now() THEN excluded.token       ELSE r.token       END,
        fingerprint = CASE WHEN r.expires_at <= now() THEN excluded.fingerprint ELSE r.fingerprint END,
        state       = CASE WHEN r.expires_at <= now() THEN excluded.state       ELSE r.state       END,
        record      = CASE WHEN r.expires_at <= now() THEN excluded.record      ELSE r.record      END,
        expires_at  = CASE WHEN r.expires_at <= now() THEN excluded.expires_at  ELSE r.expires_at  END,
        operation   = CASE WHEN r.expires_at <= now() THEN excluded.operation   ELSE r.operation   END,
        status      = CASE WHEN r.expires_at <= now() THEN excluded.status      ELSE r.status      END,
        result      = CASE WHEN r.expires_at <= now() THEN excluded.result      ELSE r.result      END,
        created_at  = CASE WHEN r.expires_at <= now() THEN excluded.created_at  ELSE r.created_at  END,
        completed_at = CASE WHEN r.expires_at <= now() THEN excluded.completed_at ELSE r.completed_at END,
        fingerprint_hex = CASE WHEN r.expires_at <= now() THEN excluded.fingerprint_hex ELSE r.fingerprint_hex END,
        steps       = CASE WHEN r.expires_at <= now() AND r.state <> 'in_flight' THEN NULL ELSE r.steps END
    RETURNING r.token, r.fingerprint, r.state, r.record
),
found AS (
    SELECT token, fingerprint, state, record FROM ins
    UNION ALL
    SELECT token, fingerprint, state, record FROM cur WHERE live
)
SELECT outcome, token,
       CASE WHEN outcome = 'completed' THEN record END AS record,
       outcome = 'acquired' AND EXISTS (SELECT 1 FROM cur WHERE state = 'in_flight') AS takeover
FROM (
    SELECT CASE
               WHEN token = (SELECT token FROM next) THEN 'acquired'
               WHEN fingerprint <> $2::bytea THEN 'key_reuse'
               WHEN state = 'completed' THEN 'completed'
               ELSE 'in_flight'
           END AS outcome,
           token, record
    FROM found
) AS o
