-- $1 key, $2 token, $3 lease in microseconds. Only while the claim holds the key: in flight
-- under the token, its lease perhaps ended, but not abandoned (nobody took over).
UPDATE {table} SET expires_at = clock_timestamp() + $3::bigint * interval '1 microsecond'
WHERE key = $1::text AND token = $2::bigint AND state = 'in_flight'
    AND expires_at > now() - interval '{retention_us} microseconds'
