-- $1 key. A completed row within its ttl, or an in-flight row not abandoned (exists.sql).
SELECT token, fingerprint, state, record FROM {table} WHERE key = $1::text AND {exists}
