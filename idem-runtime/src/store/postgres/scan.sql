-- $1 the last key of the page before ('' for the first page), $2 the most rows. The next
-- records get.sql would return, in key order (a walk of the primary key's index), with the
-- columns of get.sql first, then the claim time (NULL for rows claimed before the column
-- existed).
SELECT token, fingerprint, state, record, key, expires_at, created_at FROM {table}
WHERE key > $1::text AND {exists}
ORDER BY key LIMIT $2::bigint
