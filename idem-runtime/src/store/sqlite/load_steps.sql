-- The steps of the claim ?1/?2 (NULL: none yet) if it still holds the key: in flight (state 0)
-- under the token and not abandoned (its lease may have ended); no row otherwise. ?1 key,
-- ?2 token, ?3 the lease end an abandoned claim is at or before (unix ms).
SELECT steps FROM idem_records WHERE key = ?1 AND token = ?2 AND state = 0 AND expires_at > ?3
