-- $1 key, $2 token. The steps (NULL: none) of the claim that holds the key, fenced as
-- save_step.sql is: no row if the token does not hold it.
SELECT steps FROM {table}
WHERE key = $1::text AND token = $2::bigint AND state = 'in_flight'
    AND expires_at > now() - interval '{retention_us} microseconds'
