-- Adds the readable column `result` to a table made before it existed: nullable, so SQLite
-- only changes the schema (no row is rewritten), and builds of before, which name their
-- columns, keep working on the file.
ALTER TABLE idem_records ADD COLUMN result TEXT
