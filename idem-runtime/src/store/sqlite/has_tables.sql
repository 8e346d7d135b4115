-- How many of idem's two tables the file holds (2: both), read before anything is written when
-- the store may not create them.
SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('idem_meta', 'idem_records')
