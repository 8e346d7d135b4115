-- Writes an acquired claim (in flight, state 0), over an absent or expired row; the claim has
-- checked that under the write lock. ?1 key, ?2 fingerprint (or NULL), ?3 token,
-- ?4 lease end (unix ms), ?5 now (unix ms).
INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record, claimed_at)
VALUES (?1, ?2, ?3, 0, ?4, NULL, ?5)
ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, token = excluded.token,
    state = 0, expires_at = excluded.expires_at, record = NULL, claimed_at = excluded.claimed_at
