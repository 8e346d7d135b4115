-- Whether idem_records has the `claimed_at` column (tables made before it existed do not).
SELECT count(*) > 0 FROM pragma_table_info('idem_records') WHERE name = 'claimed_at'
