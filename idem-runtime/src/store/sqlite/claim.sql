-- Writes an acquired claim (in flight, state 0), over an absent or expired row; the claim has
-- checked that under the write lock. ?1 key, ?2 fingerprint (or NULL), ?3 token,
-- ?4 lease end (unix ms), ?5 now (unix ms), ?6 whether it takes over an in-flight row: a
-- takeover keeps the call's steps, any other claim starts with none.
INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record, claimed_at, steps)
VALUES (?1, ?2, ?3, 0, ?4, NULL, ?5, NULL)
ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, token = excluded.token,
    state = 0, expires_at = excluded.expires_at, record = NULL, claimed_at = excluded.claimed_at,
    steps = CASE WHEN ?6 THEN idem_records.steps END
