-- Whether the table and its token sequence exist (and this role can see them), for a store that
-- may not create them: `to_regclass` is NULL for a missing relation or schema, and errs on none.
SELECT to_regclass('{table}') IS NOT NULL AS has_table,
       to_regclass('{sequence}') IS NOT NULL AS has_sequence
