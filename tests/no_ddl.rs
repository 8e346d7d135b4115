//! Opening a store without DDL: `PostgresOptions::create_table(false)` and
//! `SqliteOptions::create_tables(false)` create nothing and refuse a missing table with
//! `Error::Config` naming it; the README's "PostgreSQL without DDL" gives the statements the
//! store runs (read from its `.sql` file here) and grants that are enough: a role with exactly
//! those runs the whole protocol.
//!
//! PostgreSQL (`IDEM_POSTGRES_URL`) is skipped with a printed reason when unreachable, unless
//! `IDEM_REQUIRE_SERVICES=1`.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::path::Path;

/// The `sql` blocks of the README section `heading`, in order.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn readme_sql(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has the section `{heading}`"));
    let section = &readme[start + heading.len() + 2..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    section
        .split("```sql\n")
        .skip(1)
        .map(|block| block[..block.find("```").expect("a closed block")].to_owned())
        .collect()
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::{Duration, Instant};

    use super::*;
    use idem_support::postgres::{admin, describe, fresh_table, run_schema, url};
    use idempotency::postgres::PostgresOptions;
    use idempotency::store::{Claim, Forgotten, RecordState};
    use idempotency::{Error, PostgresStore, StorageKey, Store};

    const HEADING: &str = "### PostgreSQL without DDL";

    /// The store's schema file with the default table's names, as a DBA would run it.
    fn schema_for_the_default_table() -> String {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("idem-runtime/src/store/postgres/schema.sql"),
        )
        .expect("read schema.sql");
        template
            .replace("{table}", "idem_records")
            .replace("{sequence}", "idem_records_token_seq")
            .replace("{index}", "idem_records_expires_idx")
            .replace("{status_index}", "idem_records_status_idx")
    }

    #[test]
    fn the_readme_gives_the_statements_the_store_runs() {
        let blocks = readme_sql(HEADING);
        assert_eq!(blocks.len(), 2, "the DDL, then the grants");
        assert_eq!(blocks[0].trim(), schema_for_the_default_table().trim());
        // And the store runs that file: its own statements, names quoted.
        let pool = idem_support::postgres::pool(&url().parse().unwrap(), 1);
        let store = PostgresStore::from_pool(pool, "idem_records").unwrap();
        assert_eq!(
            store.schema_sql().replace('"', "").trim(),
            schema_for_the_default_table().trim()
        );
        for grant in blocks[1].lines() {
            assert!(grant.starts_with("GRANT "), "{grant}");
            assert!(grant.ends_with(" TO idem_app;"), "{grant}");
        }
    }

    /// `url` with `user` instead of its user (and no password).
    fn as_user(url: &str, user: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{user}@{rest}")
    }

    /// Whether `name` (as `to_regclass` reads it) exists.
    async fn exists(client: &idempotency::postgres::tokio_postgres::Client, name: &str) -> bool {
        client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn a_missing_table_is_a_configuration_error_and_nothing_is_created() {
        let Some(table) = fresh_table("no_ddl_missing").await else {
            return;
        };
        let client = admin().await.unwrap();
        let options = PostgresOptions::new().table(&table).create_table(false);
        let err = PostgresStore::connect_with(&url(), &options)
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(
            message.contains(&format!("table `{table}` does not exist")),
            "{message}"
        );
        assert!(
            message.contains("schema_sql"),
            "says what to run: {message}"
        );
        assert!(!exists(&client, &table).await);
        assert!(!exists(&client, &format!("{table}_token_seq")).await);

        // A table without its sequence: the sequence is named.
        let (schema, name) = table.split_once('.').unwrap();
        client
            .batch_execute(&format!(
                "CREATE TABLE \"{schema}\".\"{name}\" (key text PRIMARY KEY, token bigint NOT NULL, fingerprint bytea, state text NOT NULL, record bytea, expires_at timestamptz NOT NULL)"
            ))
            .await
            .unwrap();
        let err = PostgresStore::connect_with(&url(), &options)
            .await
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains(&format!("token sequence `{table}_token_seq`")),
            "{err}"
        );
        assert!(!exists(&client, &format!("{table}_token_seq")).await);

        // Created as the store would: connecting without DDL works.
        PostgresStore::connect_with_table(&url(), &table)
            .await
            .unwrap();
        PostgresStore::connect_with(&url(), &options).await.unwrap();
    }

    /// Whether the table `table` (`schema.name`) has the column `column`.
    async fn has_column(
        client: &idempotency::postgres::tokio_postgres::Client,
        table: &str,
        column: &str,
    ) -> bool {
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1)
                     AND attname = $2 AND NOT attisdropped)",
                &[&table, &column],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// A table an earlier version made (no `steps` column): refused without DDL, naming the one
    /// statement to run and changing nothing; upgraded in place, its records kept, by a default
    /// connect; then accepted without DDL.
    #[tokio::test]
    async fn a_table_without_steps_is_upgraded_or_refused() {
        let Some(table) = fresh_table("no_ddl_steps").await else {
            return;
        };
        let client = admin().await.unwrap();
        let (schema, name) = table.split_once('.').unwrap();
        let quoted = format!("\"{schema}\".\"{name}\"");
        // The schema of the version before steps.
        client
            .batch_execute(&format!(
                "CREATE TABLE {quoted} (key text PRIMARY KEY, token bigint NOT NULL, fingerprint bytea, state text NOT NULL CHECK (state IN ('in_flight', 'completed')), record bytea, expires_at timestamptz NOT NULL);
                 CREATE SEQUENCE \"{schema}\".\"{name}_token_seq\" AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
                 CREATE INDEX \"{name}_expires_idx\" ON {quoted} (expires_at);
                 INSERT INTO {quoted} VALUES ('{}', 1, NULL, 'completed', 'r', now() + interval '1 hour')",
                StorageKey::derive("no-ddl", "old").unwrap().as_str()
            ))
            .await
            .unwrap_or_else(|e| panic!("{}", describe(&e)));

        let options = PostgresOptions::new().table(&table).create_table(false);
        let err = PostgresStore::connect_with(&url(), &options)
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(
            message.contains(&format!("table `{table}` has no column `steps`")),
            "{message}"
        );
        assert!(
            message.contains(&format!(
                "run `ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS steps bytea; ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS operation text, "
            )),
            "names the statement: {message}"
        );
        assert!(
            !has_column(&client, &table, "steps").await,
            "nothing changed"
        );

        // A default connect adds the column; the record made before is still there.
        let store = PostgresStore::connect_with_table(&url(), &table)
            .await
            .unwrap();
        assert!(has_column(&client, &table, "steps").await);
        let old = StorageKey::derive("no-ddl", "old").unwrap();
        assert!(matches!(
            store.get(&old).await.unwrap(),
            Some(r) if matches!(r.state, RecordState::Completed { .. })
        ));
        // Connecting again with DDL changes nothing, and without DDL is accepted; steps work.
        PostgresStore::connect_with_table(&url(), &table)
            .await
            .unwrap();
        let store = PostgresStore::connect_with(&url(), &options).await.unwrap();
        let key = StorageKey::derive("no-ddl", "steps").unwrap();
        let Claim::Acquired { token, .. } = store
            .claim(&key, None, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        store.save_step(&key, token, "a", b"1").await.unwrap();
        let steps = store.load_steps(&key, token).await.unwrap();
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!((steps[0].0.as_str(), &steps[0].1[..]), ("a", &b"1"[..]));

        client
            .batch_execute(&format!(
                "DROP TABLE {quoted}; DROP SEQUENCE \"{schema}\".\"{name}_token_seq\""
            ))
            .await
            .unwrap_or_else(|e| panic!("{}", describe(&e)));
    }

    /// A role with exactly the README's grants on a table the README's DDL made (in a schema of
    /// its own, where the role may not create anything) runs every step of the protocol, and
    /// only with `create_table(false)`.
    #[tokio::test]
    async fn the_readme_grants_are_enough() {
        if run_schema().await.is_none() {
            return;
        }
        let client = admin().await.unwrap();
        let unique = format!("{:016x}", rand::random::<u64>());
        let (schema, role) = (format!("idem_dba_{unique}"), format!("idem_app_{unique}"));
        let blocks = readme_sql(HEADING);
        let setup = format!(
            "CREATE SCHEMA \"{schema}\"; CREATE ROLE \"{role}\" LOGIN; SET search_path TO \"{schema}\";\n{}\n{}",
            blocks[0],
            blocks[1]
                .replace("SCHEMA public", &format!("SCHEMA \"{schema}\""))
                .replace("idem_app", &format!("\"{role}\""))
        );
        client
            .batch_execute(&setup)
            .await
            .unwrap_or_else(|e| panic!("{}", describe(&e)));
        let outcome = run_as(&as_user(&url(), &role), &format!("{schema}.idem_records")).await;
        client
            .batch_execute(&format!(
                "RESET search_path; DROP SCHEMA \"{schema}\" CASCADE; DROP ROLE \"{role}\""
            ))
            .await
            .unwrap_or_else(|e| panic!("{}", describe(&e)));
        outcome.unwrap();
    }

    /// The protocol as the restricted role; an error says which step failed.
    async fn run_as(role_url: &str, table: &str) -> Result<(), String> {
        let step = |what: &'static str| move |e: Error| format!("{what}: {e}");
        // With DDL allowed (the default), connecting runs none when everything is in place, so
        // the role, which may not create or alter anything, connects all the same.
        PostgresStore::connect_with_table(role_url, table)
            .await
            .map_err(step("connecting by default, with the schema in place"))?;
        let options = PostgresOptions::new().table(table).create_table(false);
        let store = PostgresStore::connect_with(role_url, &options)
            .await
            .map_err(step("connect"))?;
        let key = StorageKey::derive("no-ddl", "k1").unwrap();
        let lease = Duration::from_secs(30);
        let Claim::Acquired { token, .. } = store
            .claim(&key, None, lease)
            .await
            .map_err(step("claim"))?
        else {
            return Err("a fresh key is acquired".into());
        };
        store
            .renew(&key, token, lease)
            .await
            .map_err(step("renew"))?;
        store
            .save_step(&key, token, "s", b"1")
            .await
            .map_err(step("save_step"))?;
        let steps = store
            .load_steps(&key, token)
            .await
            .map_err(step("load_steps"))?;
        if steps.len() != 1 {
            return Err(format!("load_steps: {steps:?}"));
        }
        store
            .complete(&key, token, b"r", Duration::from_secs(60))
            .await
            .map_err(step("complete"))?;
        let got = store.get(&key).await.map_err(step("get"))?;
        if !matches!(got, Some(ref r) if matches!(r.state, RecordState::Completed { .. })) {
            return Err(format!("get: {got:?}"));
        }
        match store
            .claim(&key, None, lease)
            .await
            .map_err(step("replay"))?
        {
            Claim::Completed(_) => {}
            other => return Err(format!("replay: {other:?}")),
        }
        match store.forget(&key, false).await.map_err(step("forget"))? {
            Forgotten::Completed { .. } => {}
            other => return Err(format!("forget: {other:?}")),
        }
        let Claim::Acquired { token, .. } = store
            .claim(&key, None, lease)
            .await
            .map_err(step("claim again"))?
        else {
            return Err("a forgotten key is acquired".into());
        };
        store.release(&key, token).await.map_err(step("release"))?;

        // A waiter is woken by the completion (LISTEN as this role).
        let Claim::Acquired { token, .. } = store
            .claim(&key, None, lease)
            .await
            .map_err(step("claim to wait"))?
        else {
            return Err("a released key is acquired".into());
        };
        let waiter = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                store.wait_for_change(&key, Duration::from_secs(20)).await;
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .complete(&key, token, b"r", Duration::from_millis(1))
            .await
            .map_err(step("complete to wake"))?;
        let waited = waiter.await.unwrap();
        if waited >= Duration::from_secs(10) {
            return Err(format!("the waiter was not woken ({waited:?})"));
        }

        tokio::time::sleep(Duration::from_millis(50)).await;
        let purged = store.purge_expired().await.map_err(step("purge"))?;
        if purged != 1 {
            return Err(format!("purge removed {purged}, expected 1"));
        }
        Ok(())
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use idempotency::sqlite::SqliteOptions;
    use idempotency::{Error, SqliteStore, Store};

    fn no_ddl() -> SqliteOptions {
        SqliteOptions::new().create_tables(false)
    }

    #[tokio::test]
    async fn a_missing_file_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sqlite");
        let err = SqliteStore::open_with(&path, &no_ddl())
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(err.to_string().contains("no SQLite database at"), "{err}");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_file_without_the_tables_is_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sqlite");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let err = SqliteStore::open_with(&path, &no_ddl())
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(err.to_string().contains("`idem_records`"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "unchanged");
    }

    #[tokio::test]
    async fn a_file_with_the_tables_opens_without_ddl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.sqlite");
        drop(SqliteStore::open(&path).await.unwrap());
        let store = SqliteStore::open_with(&path, &no_ddl()).await.unwrap();
        assert_eq!(store.purge_expired().await.unwrap(), 0);
    }
}
