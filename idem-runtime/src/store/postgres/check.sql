-- Whether the table and its token sequence exist (and this role can see them), and whether the
-- table has the `steps` column (a table made before steps existed lacks it), for a store that
-- may not create or alter them: `to_regclass` is NULL for a missing relation or schema, and
-- errs on none; `pg_attribute` is readable by every role.
SELECT to_regclass('{table}') IS NOT NULL AS has_table,
       to_regclass('{sequence}') IS NOT NULL AS has_sequence,
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass('{table}') AND attname = 'steps' AND NOT attisdropped)
           AS has_steps
