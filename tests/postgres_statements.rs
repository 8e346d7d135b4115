//! Statements per call, counted by the server: a replayed call (hit) is one statement, a first
//! call (miss) two: claim, complete. One test in its own binary, so nothing else runs on the
//! server from this process while it counts.
//!
//! Every statement `PostgresStore` runs is a transaction of its own, so PostgreSQL's
//! `pg_stat_database.xact_commit` counts them. The test works in a database of its own (so other
//! clients do not count) through a pool of one connection (so the test's own statistics queries
//! go through the store's connection in a known number), and makes that connection flush its
//! statistics with `pg_stat_force_next_flush()` (PostgreSQL 15+) before reading them.
//! Autovacuum may add transactions to a window; it never removes any, so each measurement is
//! repeated and the smallest count must be exact.
#![cfg(feature = "postgres")]

#[allow(unused_imports)] // only `unavailable` is used here
mod conformance;

use std::time::Duration;

use idempotency::postgres::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use idempotency::postgres::tokio_postgres::{self, NoTls};
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, PostgresStore, StorageKey};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const CALLS: u64 = 100;
const ROUNDS: usize = 4;

fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Counters read through the store's own connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counters {
    /// Committed transactions in the database.
    xact_commit: i64,
    /// Rows inserted, updated and deleted in the store's table.
    inserted: i64,
    updated: i64,
    deleted: i64,
    /// The token sequence's last value.
    last_token: i64,
}

struct Counting {
    pool: Pool,
    database: String,
}

impl Counting {
    /// Flushes the connection's pending statistics (this statement included), then reads the
    /// counters (a statement that stays pending until the next flush). Two transactions.
    async fn read(&self) -> Counters {
        let client = self.pool.get().await.unwrap();
        client
            .simple_query("SELECT pg_stat_force_next_flush()")
            .await
            .unwrap();
        // Prepared once (a prepare is a transaction of its own), then one transaction per read.
        let statement = client
            .prepare_cached(
                "SELECT d.xact_commit, t.n_tup_ins, t.n_tup_upd, t.n_tup_del,
                        (SELECT last_value FROM idem_records_token_seq)
                 FROM pg_stat_database d, pg_stat_user_tables t
                 WHERE d.datname = $1 AND t.relid = 'idem_records'::regclass",
            )
            .await
            .unwrap();
        let row = client
            .query_one(&statement, &[&self.database])
            .await
            .unwrap();
        Counters {
            xact_commit: row.get(0),
            inserted: row.get(1),
            updated: row.get(2),
            deleted: row.get(3),
            last_token: row.get(4),
        }
    }

    /// Runs `calls` between two readings, `ROUNDS` times, and returns the differences of the
    /// round with the fewest transactions, less the two the reading itself adds.
    async fn measure<F: std::future::Future<Output = ()>>(
        &self,
        mut calls: impl FnMut() -> F,
    ) -> Counters {
        let mut best: Option<Counters> = None;
        for _ in 0..ROUNDS {
            let before = self.read().await;
            calls().await;
            let after = self.read().await;
            let delta = Counters {
                xact_commit: after.xact_commit - before.xact_commit - 2,
                inserted: after.inserted - before.inserted,
                updated: after.updated - before.updated,
                deleted: after.deleted - before.deleted,
                last_token: after.last_token - before.last_token,
            };
            if best.is_none_or(|b| delta.xact_commit < b.xact_commit) {
                best = Some(delta);
            }
        }
        best.unwrap()
    }
}

fn key(label: &str, i: u64) -> StorageKey {
    StorageKey::derive("statements", &format!("{label}:{i}")).unwrap()
}

/// One idempotent call through the runtime, as `#[idempotent]` makes it.
async fn call(store: &PostgresStore, key: StorageKey) {
    let out: Result<u64, Error> = Call::new(key)
        .store(store)
        .fingerprint(Some(Fingerprint([7; 32])))
        .lease(Duration::from_secs(30))
        .run(ErrorPolicy::never(), async { Ok(42) })
        .await;
    assert_eq!(out.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_per_hit_two_per_miss() {
    let admin = match tokio_postgres::connect(&url(), NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client
        }
        Err(e) => {
            conformance::unavailable("PostgreSQL", format!("{e} ({})", url()));
            return;
        }
    };
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        version >= 150000,
        "pg_stat_force_next_flush() needs PostgreSQL 15, the server is {version}"
    );

    // A database of this run's own; drop those older runs left behind (ten minutes by the
    // server's clock, which named them).
    let stale = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname ~ '^idem_stmt_[0-9]+_[0-9]+$'
             AND split_part(datname, '_', 3)::bigint < extract(epoch FROM now())::bigint - 600",
            &[],
        )
        .await
        .unwrap();
    for row in stale {
        let name: &str = row.get(0);
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    let epoch: i64 = admin
        .query_one("SELECT extract(epoch FROM now())::bigint", &[])
        .await
        .unwrap()
        .get(0);
    let database = format!("idem_stmt_{epoch}_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await
        .unwrap();

    let mut config: tokio_postgres::Config = url().parse().unwrap();
    config.dbname(&database);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(1).build().unwrap();
    let store = PostgresStore::from_pool(pool.clone(), "idem_records").unwrap();
    store.create_table().await.unwrap();
    let counting = Counting {
        pool,
        database: database.clone(),
    };

    // Prepare every statement on the one connection first: a prepare is a transaction too.
    for i in 0..3 {
        call(&store, key("warm", i)).await;
        call(&store, key("warm", i)).await;
    }
    counting.read().await;

    let store = &store;
    let mut round = 0;
    let misses = counting
        .measure(|| {
            round += 1;
            let label = format!("miss{round}");
            async move {
                for i in 0..CALLS {
                    call(store, key(&label, i)).await;
                }
            }
        })
        .await;
    let hits = counting
        .measure(|| async move {
            for _ in 0..CALLS {
                call(store, key("warm", 0)).await;
            }
        })
        .await;
    println!("{CALLS} misses: {misses:?}\n{CALLS} hits: {hits:?}");

    assert_eq!(
        misses.xact_commit,
        2 * CALLS as i64,
        "two statements per miss: {misses:?}"
    );
    assert_eq!(
        misses.inserted, CALLS as i64,
        "a claim inserts a row: {misses:?}"
    );
    assert_eq!(
        misses.updated, CALLS as i64,
        "a complete updates it: {misses:?}"
    );
    assert_eq!(
        misses.last_token, CALLS as i64,
        "one token per claim: {misses:?}"
    );
    assert_eq!(
        hits.xact_commit, CALLS as i64,
        "one statement per hit: {hits:?}"
    );
    assert_eq!(
        (hits.inserted, hits.updated, hits.deleted),
        (0, 0, 0),
        "a hit writes nothing: {hits:?}"
    );
    assert_eq!(hits.last_token, 0, "a hit draws no token: {hits:?}");

    drop(counting);
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await
        .unwrap();
}
