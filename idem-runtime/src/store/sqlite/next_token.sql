-- The next fencing token, taken inside the claim's write transaction.
UPDATE idem_meta SET last_token = last_token + 1 WHERE id = 1 RETURNING last_token
