-- The row of a key, for claim and get. ?1 key.
SELECT fingerprint, token, state, expires_at, record FROM idem_records WHERE key = ?1
