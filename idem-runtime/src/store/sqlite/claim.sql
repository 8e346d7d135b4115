-- Writes an acquired claim (in flight, state 0), over an absent or expired row; the claim has
-- checked that under the write lock. ?1 key, ?2 fingerprint (or NULL), ?3 token,
-- ?4 lease end (unix ms), ?5 now (unix ms), ?6 whether it takes over an in-flight row: a
-- takeover keeps the call's steps, any other claim starts with none. The readable columns:
-- ?7 the status ('processing'), ?8 the fingerprint in hex (or NULL), the claim time as
-- ISO-8601 UTC text in `created_at`, no operation, result or completion time yet.
INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record, claimed_at, steps,
    operation, status, result, created_at, completed_at, fingerprint_hex)
VALUES (?1, ?2, ?3, 0, ?4, NULL, ?5, NULL,
    NULL, ?7, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', ?5 / 1000.0, 'unixepoch'), NULL, ?8)
ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, token = excluded.token,
    state = 0, expires_at = excluded.expires_at, record = NULL, claimed_at = excluded.claimed_at,
    steps = CASE WHEN ?6 THEN idem_records.steps END,
    operation = NULL, status = excluded.status, result = NULL, created_at = excluded.created_at,
    completed_at = NULL, fingerprint_hex = excluded.fingerprint_hex
