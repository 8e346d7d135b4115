-- Removes the row of a key, which forget has read and judged under the write lock. ?1 key.
DELETE FROM idem_records WHERE key = ?1
