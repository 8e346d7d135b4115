-- A page of a listing: the rows after the key ?1, in key order, at most ?2 of them, read with
-- the same columns as read.sql after the key; whether each still exists is judged on them.
SELECT key, fingerprint, token, state, expires_at, record, claimed_at FROM idem_records
WHERE key > ?1 ORDER BY key LIMIT ?2
