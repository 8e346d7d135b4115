-- $1 key. A completed row within its ttl, or an in-flight row not abandoned.
SELECT token, fingerprint, state, record FROM {table} WHERE key = $1::text
    AND expires_at > CASE WHEN state = 'in_flight'
                          THEN now() - interval '{retention_us} microseconds'
                          ELSE now() END
