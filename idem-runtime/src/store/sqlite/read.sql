-- The row of a key, for claim, get and forget. ?1 key.
SELECT fingerprint, token, state, expires_at, record, claimed_at FROM idem_records WHERE key = ?1
