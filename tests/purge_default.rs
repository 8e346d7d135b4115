//! Durable stores clean up by themselves: a SQLite or PostgreSQL store opened with its default
//! options (only the purge interval shortened, so the test need not wait a minute) removes an
//! expired record without a purge call; with `purge_in_background(false)` the record stays; and
//! the purger, holding only a weak reference, lets the store go when the application drops it.
//!
//! PostgreSQL (`IDEM_POSTGRES_URL`, a table of this run's own) is skipped with a printed reason
//! when unreachable, unless `IDEM_REQUIRE_SERVICES=1`.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::time::Duration;

use idempotency::store::{Claim, Purger};
use idempotency::{StorageKey, Store};

/// The short schedule of the tests: a pass every 50 ms.
fn quick() -> Purger {
    Purger::new().interval(Duration::from_millis(50)).batch(2)
}

/// How long a record lives.
const TTL: Duration = Duration::from_millis(100);

/// How long a test waits for the purger: many passes of `quick()`.
const PATIENCE: Duration = Duration::from_secs(5);

/// Claims and completes three keys with [`TTL`], and one with an hour; returns the long one.
async fn fill(store: &dyn Store, label: &str) -> StorageKey {
    let mut long = None;
    for (i, ttl) in [TTL, TTL, TTL, Duration::from_secs(3600)]
        .into_iter()
        .enumerate()
    {
        let key = StorageKey::derive(label, &format!("k{i}")).unwrap();
        let Claim::Acquired { token, .. } = store
            .claim(&key, None, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        store.complete(&key, token, b"result", ttl).await.unwrap();
        long = Some(key);
    }
    long.unwrap()
}

/// Polls `rows` every 20 ms until it returns `want`, for at most `limit`; the last count.
async fn rows_until<F, Fut>(want: i64, limit: Duration, mut rows: F) -> i64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = rows().await;
        if n == want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use idempotency::sqlite::SqliteOptions;
    use idempotency::SqliteStore;
    use std::path::Path;

    /// The rows of `idem_records` in the file, read by a connection of the test's own.
    fn count(path: &Path) -> i64 {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row("SELECT count(*) FROM idem_records", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_sqlite_store_purges_expired_records_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.sqlite");
        // The defaults, but for the interval.
        let store = SqliteStore::open_with(&path, &SqliteOptions::new().purger(quick()))
            .await
            .unwrap();
        let live = fill(&store, "purge-default-sqlite").await;
        assert_eq!(count(&path), 4);
        let left = rows_until(1, PATIENCE, || async { count(&path) }).await;
        assert_eq!(
            left, 1,
            "the expired rows went by themselves; the live one stays"
        );
        assert!(store.get(&live).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_sqlite_store_with_the_purger_off_keeps_expired_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.sqlite");
        let options = SqliteOptions::new()
            .purger(quick())
            .purge_in_background(false);
        let store = SqliteStore::open_with(&path, &options).await.unwrap();
        fill(&store, "purge-off-sqlite").await;
        tokio::time::sleep(TTL + Duration::from_millis(600)).await;
        assert_eq!(count(&path), 4, "nothing purged without a purger");
        // The rows were expired all along: an explicit purge removes them.
        assert_eq!(store.purge_expired().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_bad_schedule_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::new().purger(Purger::new().interval(Duration::ZERO));
        let err = SqliteStore::open_with(dir.path().join("idem.sqlite"), &options)
            .await
            .expect_err("refused");
        assert!(matches!(err, idempotency::Error::Config { .. }), "{err:?}");
    }

    /// The purger keeps no strong reference: once the application drops the store (and the
    /// purger has run meanwhile), the file's connection closes, which in WAL mode removes the
    /// `-wal` file.
    #[tokio::test]
    async fn the_purger_lets_the_store_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.sqlite");
        let wal = dir.path().join("idem.sqlite-wal");
        let store = SqliteStore::open_with(&path, &SqliteOptions::new().purger(quick()))
            .await
            .unwrap();
        fill(&store, "purge-drop-sqlite").await;
        let left = rows_until(1, PATIENCE, || async { count(&path) }).await;
        assert_eq!(left, 1, "the purger ran");
        assert!(wal.exists(), "open in WAL mode");
        drop(store);
        let mut closed = false;
        for _ in 0..100 {
            if !wal.exists() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the connection closed once the store was dropped");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_support::postgres::{admin, fresh_table, url};
    use idempotency::postgres::PostgresOptions;
    use idempotency::PostgresStore;

    /// The rows of `table`, read by a client of the test's own.
    async fn count(table: &str) -> i64 {
        let (schema, name) = table.split_once('.').unwrap();
        admin()
            .await
            .unwrap()
            .query_one(
                &format!("SELECT count(*) FROM \"{schema}\".\"{name}\""),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn a_postgres_store_purges_expired_records_by_default() {
        let Some(table) = fresh_table("purge_default").await else {
            return;
        };
        let options = PostgresOptions::new().table(&table).purger(quick());
        let store = PostgresStore::connect_with(&url(), &options).await.unwrap();
        let live = fill(&store, "purge-default-postgres").await;
        assert_eq!(count(&table).await, 4);
        let left = rows_until(1, PATIENCE, || count(&table)).await;
        assert_eq!(
            left, 1,
            "the expired rows went by themselves; the live one stays"
        );
        assert!(store.get(&live).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_postgres_store_with_the_purger_off_keeps_expired_rows() {
        let Some(table) = fresh_table("purge_off").await else {
            return;
        };
        let options = PostgresOptions::new()
            .table(&table)
            .purger(quick())
            .purge_in_background(false);
        let store = PostgresStore::connect_with(&url(), &options).await.unwrap();
        fill(&store, "purge-off-postgres").await;
        tokio::time::sleep(TTL + Duration::from_millis(600)).await;
        assert_eq!(count(&table).await, 4, "nothing purged without a purger");
        assert_eq!(store.purge_expired().await.unwrap(), 3);
    }

    /// The purger holds the pool only weakly: once the application drops the store, the
    /// server sees this store's connections close (they are told apart by `application_name`).
    #[tokio::test]
    async fn the_purger_lets_the_store_go() {
        let Some(table) = fresh_table("purge_drop").await else {
            return;
        };
        let app = format!("idem_purge_drop_{:08x}", rand::random::<u32>());
        let separator = if url().contains('?') { '&' } else { '?' };
        let store_url = format!("{}{separator}application_name={app}", url());
        let options = PostgresOptions::new().table(&table).purger(quick());
        let store = PostgresStore::connect_with(&store_url, &options)
            .await
            .unwrap();
        fill(&store, "purge-drop-postgres").await;
        assert_eq!(
            rows_until(1, PATIENCE, || count(&table)).await,
            1,
            "the purger ran"
        );
        let client = admin().await.unwrap();
        let connections = || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        assert!(connections().await > 0, "the store's pool is connected");
        drop(store);
        assert_eq!(
            rows_until(0, PATIENCE, connections).await,
            0,
            "the store's connections closed once it was dropped"
        );
    }
}
