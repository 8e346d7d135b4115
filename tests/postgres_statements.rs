//! Statements per call, counted by the server: a replayed call (hit) is one statement, a first
//! call (miss) two: claim, complete; the readable columns (issue 24) are written by those same
//! two statements. Durable steps cost one statement each on a first run (a
//! body of three steps: claim, three `save_step`, complete, five) and none on a replay of the
//! completed call (its claim alone, one). The two tests are the only ones of this binary, each
//! in a database of its own, and they take turns (`SERIAL`), so nothing else runs on the server
//! from this process while one counts.
//!
//! Every statement `PostgresStore` runs is a transaction of its own, so PostgreSQL's
//! `pg_stat_database.xact_commit` counts them. The test works in a database of its own (so other
//! clients do not count) through a pool of one connection (so the test's own statistics queries
//! go through the store's connection in a known number), and makes that connection flush its
//! statistics with `pg_stat_force_next_flush()` (PostgreSQL 15+) before reading them.
//! Autovacuum may add transactions to a window; it never removes any, so each measurement is
//! repeated and the smallest count must be exact.
#![cfg(feature = "postgres")]

use std::time::Duration;

use idem_support::postgres::{self, Own};
use idempotency::postgres::deadpool_postgres::Pool;
use idempotency::postgres::tokio_postgres;
use idempotency::{step, Call, Error, ErrorPolicy, Fingerprint, PostgresStore, StorageKey};

const CALLS: u64 = 100;
const ROUNDS: usize = 4;

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
    async fn read(&self) -> Result<Counters, String> {
        let row = postgres::flushed_row(
            &self.pool,
            "SELECT d.xact_commit, t.n_tup_ins, t.n_tup_upd, t.n_tup_del,
                    (SELECT last_value FROM idem_records_token_seq)
             FROM pg_stat_database d, pg_stat_user_tables t
             WHERE d.datname = $1 AND t.relid = 'idem_records'::regclass",
            &[&self.database],
        )
        .await?;
        Ok(Counters {
            xact_commit: row.get(0),
            inserted: row.get(1),
            updated: row.get(2),
            deleted: row.get(3),
            last_token: row.get(4),
        })
    }

    /// Runs `calls` between two readings, `ROUNDS` times, and returns the differences of the
    /// round with the fewest transactions, less the two the reading itself adds.
    async fn measure<F: std::future::Future<Output = ()>>(
        &self,
        mut calls: impl FnMut() -> F,
    ) -> Counters {
        let delta = |before: &Counters, after: &Counters| Counters {
            xact_commit: after.xact_commit - before.xact_commit - 2,
            inserted: after.inserted - before.inserted,
            updated: after.updated - before.updated,
            deleted: after.deleted - before.deleted,
            last_token: after.last_token - before.last_token,
        };
        let calls = |_| {
            let round = calls();
            async move {
                round.await;
                Ok::<_, String>(())
            }
        };
        postgres::fewest(ROUNDS, || self.read(), calls, delta, |c| c.xact_commit)
            .await
            .unwrap()
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
    let _serial = SERIAL.lock().await;
    let admin = match postgres::admin().await {
        Ok(client) => client,
        Err(e) => {
            idem_support::unavailable("PostgreSQL", format!("{e} ({})", postgres::url()));
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

    // A database of this run's own (those older runs left behind are dropped), and a pool of
    // one connection to it, shared by the store and the readings.
    let database = postgres::create_own(&admin, Own::Database, "idem_stmt")
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = postgres::url().parse().unwrap();
    config.dbname(&database);
    let pool = postgres::pool(&config, 1);
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
    counting.read().await.unwrap();

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

    // Those same statements wrote the readable columns (issue 24): every row of the table, each
    // made by one claim and one complete, carries them, with no statement added.
    let client = counting.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'completed' AND operation IS NULL
                        AND result = '42'::jsonb AND created_at IS NOT NULL
                        AND completed_at >= created_at AND fingerprint_hex = repeat('07', 32))
             FROM idem_records",
            &[],
        )
        .await
        .unwrap();
    let (rows, readable): (i64, i64) = (row.get(0), row.get(1));
    assert!(rows >= CALLS as i64, "{rows}");
    assert_eq!(readable, rows, "every row has its readable columns");
    drop(client);

    drop(counting);
    postgres::drop_database(&admin, &database).await.unwrap();
}

/// The two tests of this binary take turns: each counts in a database of its own, so neither
/// could see the other's transactions, but the header's promise (nothing else of this process
/// runs on the server while a test counts) then holds as well.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An idempotent call whose body runs three durable steps, first run (`replay: false`) or the
/// replay of a completed call (`replay: true`, whose body must not run).
async fn steps_call(store: &PostgresStore, key: StorageKey, replay: bool) {
    let out: Result<u32, Error> = Call::new(key)
        .store(store)
        .fingerprint(Some(Fingerprint([7; 32])))
        .lease(Duration::from_secs(30))
        .run(ErrorPolicy::never(), async move {
            assert!(!replay, "a replay of a completed call runs no body");
            let a = step("a", async { Ok::<_, Error>(1u32) }).await?;
            let b = step("b", async { Ok::<_, Error>(2u32) }).await?;
            let c = step("c", async { Ok::<_, Error>(3u32) }).await?;
            Ok(a + b + c)
        })
        .await;
    assert_eq!(out.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_one_statement_each_on_a_first_run_none_on_a_replay() {
    let _serial = SERIAL.lock().await;
    let admin = match postgres::admin().await {
        Ok(client) => client,
        Err(e) => {
            idem_support::unavailable("PostgreSQL", format!("{e} ({})", postgres::url()));
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

    // A database of its own, apart from the other test's (another label: each drops only the
    // stale databases of its own label), and a pool of one connection to it.
    let database = postgres::create_own(&admin, Own::Database, "idem_stmt_steps")
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = postgres::url().parse().unwrap();
    config.dbname(&database);
    let pool = postgres::pool(&config, 1);
    let store = PostgresStore::from_pool(pool.clone(), "idem_records").unwrap();
    store.create_table().await.unwrap();
    let counting = Counting {
        pool,
        database: database.clone(),
    };

    // Prepare claim, save_step and complete on the one connection first.
    for i in 0..3 {
        steps_call(&store, key("warm-steps", i), false).await;
        steps_call(&store, key("warm-steps", i), true).await;
    }
    counting.read().await.unwrap();

    let store = &store;
    let mut round = 0;
    let first_runs = counting
        .measure(|| {
            round += 1;
            let label = format!("steps{round}");
            async move {
                for i in 0..CALLS {
                    steps_call(store, key(&label, i), false).await;
                }
            }
        })
        .await;
    let replays = counting
        .measure(|| async move {
            for _ in 0..CALLS {
                steps_call(store, key("warm-steps", 0), true).await;
            }
        })
        .await;
    println!("{CALLS} first runs of 3 steps: {first_runs:?}\n{CALLS} replays: {replays:?}");

    let calls = CALLS as i64;
    assert_eq!(
        first_runs.xact_commit,
        5 * calls,
        "claim + 3 save_step + complete per first run: {first_runs:?}"
    );
    assert_eq!(
        first_runs.inserted, calls,
        "a claim inserts a row: {first_runs:?}"
    );
    assert_eq!(
        first_runs.updated,
        4 * calls,
        "each save_step and the complete update it: {first_runs:?}"
    );
    assert_eq!(first_runs.deleted, 0, "nothing deleted: {first_runs:?}");
    assert_eq!(
        first_runs.last_token, calls,
        "one token per claim: {first_runs:?}"
    );
    assert_eq!(
        replays.xact_commit, calls,
        "a replay is its claim alone: {replays:?}"
    );
    assert_eq!(
        (replays.inserted, replays.updated, replays.deleted),
        (0, 0, 0),
        "a replay writes nothing: {replays:?}"
    );
    assert_eq!(
        replays.last_token, 0,
        "a replay draws no token: {replays:?}"
    );

    drop(counting);
    postgres::drop_database(&admin, &database).await.unwrap();
}
