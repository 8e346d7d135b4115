-- Writes the steps of the claim ?2/?3, read with load_steps.sql in the same write transaction,
-- guarded again the same way. ?1 the steps (steps_blob framing), ?2 key, ?3 token, ?4 the lease
-- end an abandoned claim is at or before (unix ms).
UPDATE idem_records SET steps = ?1
WHERE key = ?2 AND token = ?3 AND state = 0 AND expires_at > ?4
