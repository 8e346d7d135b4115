-- Gives the claim ?2/?3 a new lease if it still holds the key: in flight (state 0) under the
-- token and not abandoned (its lease may have ended). ?1 lease end (unix ms), ?2 key,
-- ?3 token, ?4 the lease end an abandoned claim is at or before (unix ms).
UPDATE idem_records SET expires_at = ?1
WHERE key = ?2 AND token = ?3 AND state = 0 AND expires_at > ?4
