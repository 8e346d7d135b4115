-- The index of the readable `status` column (stuck claims, unknown outcomes), run after the
-- columns are added.
CREATE INDEX IF NOT EXISTS idem_records_status ON idem_records (status, created_at)
