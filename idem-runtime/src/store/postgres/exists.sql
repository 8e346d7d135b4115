expires_at > CASE WHEN state = 'in_flight'
                 THEN now() - interval '{retention_us} microseconds'
                 ELSE now() END