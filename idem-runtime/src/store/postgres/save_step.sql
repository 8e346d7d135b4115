-- $1 key, $2 token, $3 the step as one frame (`steps_blob::append(None, ..)`). Only while the
-- claim holds the key: in flight under the token, its lease perhaps ended, but not abandoned
-- (nobody took over).
--
-- The frame is appended without reading the steps first, so a save is one statement: a name
-- saved again is then in the value twice, and its last frame counts (`row::steps`).
--
-- Fenced also against a concurrent takeover, under READ COMMITTED: an UPDATE that finds the
-- row locked by another writer (a claim taking over, a complete, a release, a forget) waits
-- for it to end, then evaluates this WHERE again on the row as that writer left it. A takeover
-- left a newer token, so no row is changed and the holder is told it lost its lease. The step
-- is thus either in the row before the takeover (which keeps it for the new holder), or not
-- saved at all.
UPDATE {table} SET steps = coalesce(steps, ''::bytea) || $3::bytea
WHERE key = $1::text AND token = $2::bigint AND state = 'in_flight'
    AND expires_at > now() - interval '{retention_us} microseconds'
