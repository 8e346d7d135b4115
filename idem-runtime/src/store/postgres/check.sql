-- Whether the table and its token sequence exist (and this role can see them), whether the
-- table has the `steps` column and the readable columns (a table made before they existed lacks
-- them), and whether its two indexes exist, for a store that may not create or alter them:
-- `to_regclass` is NULL for a missing relation or schema, and errs on none; `pg_attribute`,
-- `pg_index` and `pg_class` are readable by every role. A store that may create them runs no
-- DDL when all six are there (an `ALTER TABLE` takes the table's ACCESS EXCLUSIVE lock even when
-- it changes nothing, and `CREATE INDEX IF NOT EXISTS` a SHARE lock: claims would queue behind
-- every process that starts).
SELECT to_regclass('{table}') IS NOT NULL AS has_table,
       to_regclass('{sequence}') IS NOT NULL AS has_sequence,
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass('{table}') AND attname = 'steps' AND NOT attisdropped)
           AS has_steps,
       EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = to_regclass('{table}') AND '"' || c.relname || '"' = '{index}')
           AS has_index,
       (SELECT count(*) FROM pg_attribute
        WHERE attrelid = to_regclass('{table}') AND NOT attisdropped
            AND attname IN ('operation', 'status', 'result', 'created_at', 'completed_at',
                            'fingerprint_hex')) = 6
           AS has_readable,
       EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = to_regclass('{table}')
                   AND '"' || c.relname || '"' = '{status_index}')
           AS has_status_index
