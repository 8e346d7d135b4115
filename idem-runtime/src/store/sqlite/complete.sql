-- Stores the result of the claim ?3/?4 if it still holds the key: in flight (state 0) under
-- the token and not abandoned (its lease may have ended). The result replaces the call's
-- steps. ?1 record, ?2 ttl end (unix ms), ?3 key, ?4 token, ?5 the lease end an abandoned
-- claim is at or before (unix ms). The readable columns the record module derives from the
-- record: ?6 operation, ?7 status, ?8 result as JSON text (each may be NULL), ?9 now (unix ms)
-- as the completion time.
UPDATE idem_records SET state = 1, record = ?1, expires_at = ?2, steps = NULL,
    operation = ?6, status = ?7, result = ?8,
    completed_at = strftime('%Y-%m-%dT%H:%M:%fZ', ?9 / 1000.0, 'unixepoch')
WHERE key = ?3 AND token = ?4 AND state = 0 AND expires_at > ?5
