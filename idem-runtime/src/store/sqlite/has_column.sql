-- Whether idem_records has the column ?1 (tables made before it was added do not).
SELECT count(*) > 0 FROM pragma_table_info('idem_records') WHERE name = ?1
