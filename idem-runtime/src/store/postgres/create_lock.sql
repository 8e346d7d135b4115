SELECT pg_advisory_xact_lock(hashtext('idem_runtime.create_table:{table}'));
