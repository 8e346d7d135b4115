//! Section 3, PostgreSQL: statements per call from `pg_stat_database.xact_commit` in a database
//! of the run's own (`idem_support::postgres`), and calls per second against raw clients
//! running the store's own prepared statements.

use std::time::Duration;

use idem_runtime::engine::DEFAULT_LEASE;
use idem_support::postgres::{create_own, drop_database, flushed_row, pool, Own};
use idempotency::postgres::deadpool_postgres::Pool;
use idempotency::postgres::tokio_postgres::{self, Client, Config, Statement};
use idempotency::{PostgresStore, StorageKey};

use crate::measure::*;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// tokio-postgres says "db error" and keeps the server's message in its source: both.
fn pg(e: tokio_postgres::Error) -> String {
    idem_support::postgres::describe(&e)
}

async fn connect(config: &Config) -> Res<Client> {
    idem_support::postgres::connect(config).await.map_err(pg)
}

pub(crate) async fn run(r: &mut Report) {
    let url = idem_support::postgres::url();
    let mut config: Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            r.row("PostgreSQL: invalid IDEM_POSTGRES_URL, skipped", err(e));
            return;
        }
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(3));
    }
    let admin = match within(Duration::from_secs(5), connect(&config)).await {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("bench_report: PostgreSQL unreachable ({e}); skipping its part");
            r.row(
                "PostgreSQL (IDEM_POSTGRES_URL): unreachable, part skipped",
                e,
            );
            return;
        }
    };
    // A database of the run's own, so no other client's transactions count; without the
    // privilege to create one, the URL's database (other clients then add noise, which
    // the minimum over rounds filters out when they pause).
    let table = format!("idem_bench_{:08x}", rand::random::<u32>());
    let database = match create_own(&admin, Own::Database, "idem_bench").await {
        Ok(db) => Some(db),
        Err(e) => {
            r.row(
                "PostgreSQL: no database of its own, using the URL's",
                e.clone(),
            );
            None
        }
    };
    let mut bench = config.clone();
    if let Some(db) = &database {
        bench.dbname(db);
    }
    let outcome = within(Duration::from_secs(30), measure(r, &admin, &bench, &table)).await;
    if let Err(e) = outcome {
        eprintln!("bench_report: PostgreSQL part stopped: {e}");
        r.row("PostgreSQL: stopped", e);
    }
    let cleaned = within(Duration::from_secs(10), async {
        match &database {
            Some(db) => drop_database(&admin, db).await,
            None => connect(&bench)
                .await?
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS \"{table}\"; DROP SEQUENCE IF EXISTS \"{table}_token_seq\""
                ))
                .await
                .map_err(pg),
        }
    })
    .await;
    if let Err(e) = cleaned {
        eprintln!("bench_report: could not clean up the database or table: {e}");
    }
}

/// Committed transactions in the database, read through the pool's one connection after
/// flushing its statistics: two transactions of its own.
async fn xact_commit(pool: &Pool, database: &str) -> Res<i64> {
    let query = "SELECT xact_commit FROM pg_stat_database WHERE datname = $1";
    Ok(flushed_row(pool, query, &[&database]).await?.get(0))
}

/// Statements per call: [`CALLS`] calls between two readings, the round of [`ROUNDS`] with
/// the fewest transactions, less the two each reading adds.
async fn statements_per_call<F, Fut>(pool: &Pool, database: &str, calls: F) -> Res<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let read = || xact_commit(pool, database);
    let delta = |before: &i64, after: &i64| after - before - 2;
    let best = idem_support::postgres::fewest(ROUNDS, read, calls, delta, |d| *d).await?;
    Ok(best as f64 / CALLS as f64)
}

async fn measure(r: &mut Report, admin: &Client, bench: &Config, table: &str) -> Res<()> {
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(pg)?
        .get(0);
    let database = bench.get_dbname().unwrap_or("postgres").to_owned();

    // Counting: a pool of one connection, so the statistics queries go through the store's
    // connection in a known number.
    let one = pool(bench, 1);
    let store = PostgresStore::from_pool(one.clone(), table).map_err(err)?;
    store.create_table().await.map_err(err)?;
    // The first call on the new table: a miss (prepares claim and complete), then a hit.
    let hit_id = fresh_ids();
    call(&store, hit_id).await?;
    call(&store, hit_id).await?;

    // What the raw client sends: the statements the store prepared on this connection, in
    // the order it prepared them (claim, then complete), and the hit key's row.
    let (claim_sql, complete_sql, hit_key, hit_fp, record) = {
        let client = one.get().await.map_err(err)?;
        let prepared = client
            .query(
                "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time, name",
                &[],
            )
            .await
            .map_err(pg)?;
        let texts: Vec<String> = prepared.iter().map(|row| row.get(0)).collect();
        let (Some(claim), Some(complete)) = (texts.first(), texts.get(1)) else {
            return Err(format!(
                "the store prepared {} statements, expected claim and complete",
                texts.len()
            ));
        };
        // The statements open with `--` comments (the store's .sql files): skip them.
        let first_statement_line = |sql: &str| {
            let mut lines = sql.lines().map(str::trim_start);
            lines
                .find(|l| !l.is_empty() && !l.starts_with("--"))
                .unwrap_or("")
                .to_owned()
        };
        // `complete` is an `UPDATE`, or (notifying waiters) a `WITH` around one.
        let complete_starts = first_statement_line(complete);
        if !claim.contains("ON CONFLICT")
            || !(complete_starts.starts_with("UPDATE")
                || complete_starts.starts_with("WITH") && complete.contains("UPDATE"))
        {
            return Err(format!(
                "unexpected prepared statements: {claim:?}, {complete:?}"
            ));
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT key, fingerprint, record FROM \"{table}\" WHERE state = 'completed'"
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        let (key, fp, record): (String, Option<Vec<u8>>, Vec<u8>) =
            (row.get(0), row.get(1), row.get(2));
        (claim.clone(), complete.clone(), key, fp, record)
    };

    // 1. Statements per call.
    if version < 150000 {
        r.row(
            "PostgreSQL statements per call: not counted",
            format!("needs PostgreSQL 15 (pg_stat_force_next_flush), server {version}"),
        );
    } else {
        // Warm up: every statement, the counting one included, prepared on the connection.
        for i in 1..4 {
            call(&store, hit_id + i).await?;
            call(&store, hit_id + i).await?;
        }
        xact_commit(&one, &database).await?;
        let store = &store;
        let misses = statements_per_call(&one, &database, |round| {
            let base = fresh_ids() + round as u64 * CALLS;
            async move {
                for i in 0..CALLS {
                    call(store, base + i).await?;
                }
                Ok(())
            }
        })
        .await?;
        let hits = statements_per_call(&one, &database, |_| async move {
            for _ in 0..CALLS {
                call(store, hit_id).await?;
            }
            Ok(())
        })
        .await?;
        r.row(
            &format!("PostgreSQL statements per hit (xact_commit, {CALLS} hits)"),
            format!("{hits:>9.2}"),
        );
        r.row(
            &format!("PostgreSQL statements per miss (xact_commit, {CALLS} misses)"),
            format!("{misses:>9.2}"),
        );
        r.row(
            "target: PostgreSQL 1 statement per hit and 2 per miss",
            verdict(exactly(hits, 1.0) && exactly(misses, 2.0)),
        );
        r.field("postgres_hit_statements", hits);
        r.field("postgres_miss_statements", misses);
    }
    drop(store);
    drop(one);

    // 2. Calls per second: the store on a pool of TASKS connections against TASKS raw
    // tokio-postgres clients, each with the store's claim and complete prepared.
    let store = PostgresStore::from_pool(pool(bench, TASKS), table).map_err(err)?;
    let mut raw: Vec<(Client, Statement, Statement)> = Vec::new();
    for _ in 0..TASKS {
        let client = connect(bench).await?;
        let claim = client.prepare(&claim_sql).await.map_err(pg)?;
        let complete = client.prepare(&complete_sql).await.map_err(pg)?;
        raw.push((client, claim, complete));
    }
    let lease = i64::try_from(DEFAULT_LEASE.as_micros()).unwrap_or(i64::MAX);
    let ttl = i64::try_from(TTL.as_micros()).unwrap_or(i64::MAX);
    let (store, raw, hit_key, hit_fp, record) = (&store, &raw, &hit_key, &hit_fp, &record);
    let idem_hit = |_: usize, _: u64| call(store, hit_id);
    let raw_hit = move |task: usize, _: u64| async move {
        let (client, claim, _) = &raw[task];
        let row = client
            .query_opt(claim, &[hit_key, hit_fp, &lease])
            .await
            .map_err(pg)?
            .ok_or("the claim returned no row")?;
        let outcome: &str = row.get(0);
        if outcome != "completed" {
            return Err(format!("raw claim of the hit key: {outcome}"));
        }
        std::hint::black_box(row.get::<_, Option<&[u8]>>(2));
        Ok(())
    };
    let raw_miss = move |base: u64| {
        move |task: usize, i: u64| async move {
            let (client, claim, complete) = &raw[task];
            let key = StorageKey::derive("bench-raw", &(base + i)).map_err(err)?;
            let key = key.as_str();
            let row = client
                .query_opt(claim, &[&key, hit_fp, &lease])
                .await
                .map_err(pg)?
                .ok_or("the claim returned no row")?;
            let (outcome, token): (&str, i64) = (row.get(0), row.get(1));
            if outcome != "acquired" {
                return Err(format!("raw claim of a fresh key: {outcome}"));
            }
            let n = client
                .execute(complete, &[&key, &token, record, &ttl])
                .await
                .map_err(pg)?;
            if n != 1 {
                return Err(format!("raw complete changed {n} rows"));
            }
            Ok(())
        }
    };
    let idem_miss = |base: u64| move |_: usize, i: u64| call(store, base + i);

    let rates = Rates {
        hit_1: versus(1, idem_hit, raw_hit).await?,
        hit_n: versus(TASKS, idem_hit, raw_hit).await?,
        miss_1: versus(1, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?,
        miss_n: versus(TASKS, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?,
    };
    r.row(
        "PostgreSQL raw client: the store's claim, complete SQL",
        "text read from pg_prepared_statements".into(),
    );
    rates.report(
        r,
        "PostgreSQL",
        "postgres",
        ["raw, same claim statement", "raw claim + complete"],
    );
    Ok(())
}
