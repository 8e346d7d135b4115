-- Deletes at most ?3 (-1: every one) completed rows past their ttl and abandoned in-flight
-- rows: one range scan of the expiry index up to now; of the in-flight rows in it, only
-- abandoned ones go. ?1 now (unix ms), ?2 the lease end an abandoned claim is at or before
-- (unix ms).
DELETE FROM idem_records WHERE key IN (
    SELECT key FROM idem_records
    WHERE expires_at <= ?1 AND (state = 1 OR expires_at <= ?2)
    LIMIT ?3
)
