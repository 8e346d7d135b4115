-- The schema version of the file, after schema.sql ran.
SELECT schema_version FROM idem_meta WHERE id = 1
