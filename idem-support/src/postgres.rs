//! PostgreSQL for the tests and benches: each test process works in its own schema
//! `idem_test_<server epoch>_<pid>`, with a table per test, and drops the schemas of runs older
//! than ten minutes; statement counting works in a database of its own, read through a pool of
//! one connection whose statistics it flushes.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::store::postgres::deadpool_postgres::{
    Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use idem_runtime::store::postgres::tokio_postgres::{self, types::ToSql, Client, Config, NoTls};
use idem_runtime::{PostgresStore, Store};
use tokio::sync::OnceCell;

use crate::unavailable;

/// `IDEM_POSTGRES_URL`, or the loopback default.
pub fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A plain client to the test database.
pub async fn admin() -> Result<Client, tokio_postgres::Error> {
    connect(&url().parse()?).await
}

/// A plain client to the database `config` names.
pub async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// tokio-postgres says "db error" and keeps the server's message in its source: both.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// What [`create_own`] creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Own {
    /// A schema in the URL's database.
    Schema,
    /// A database on the server.
    Database,
}

/// Drops the schemas or databases named `<label>_<server epoch>_<pid>` that runs older than
/// ten minutes left behind (by the server's clock, which named them), then creates this
/// process's and returns its name.
pub async fn create_own(client: &Client, what: Own, label: &str) -> Result<String, String> {
    let (kind, list, drop_how) = match what {
        Own::Schema => (
            "SCHEMA",
            "SELECT nspname AS name FROM pg_namespace",
            "CASCADE",
        ),
        Own::Database => (
            "DATABASE",
            "SELECT datname AS name FROM pg_database",
            "WITH (FORCE)",
        ),
    };
    let stale = client
        .query(
            &format!(
                "SELECT name FROM ({list}) n WHERE name ~ '^{label}_[0-9]+_[0-9]+$'
                 AND split_part(name, '_', 3)::bigint < extract(epoch FROM now())::bigint - 600"
            ),
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    for row in stale {
        let name: &str = row.get(0);
        // A concurrent run may be dropping it too.
        let _ = client
            .batch_execute(&format!("DROP {kind} IF EXISTS \"{name}\" {drop_how}"))
            .await;
    }
    let epoch: i64 = client
        .query_one("SELECT extract(epoch FROM now())::bigint", &[])
        .await
        .map_err(|e| describe(&e))?
        .get(0);
    let name = format!("{label}_{epoch}_{}", std::process::id());
    let exists = if what == Own::Schema {
        "IF NOT EXISTS "
    } else {
        ""
    };
    client
        .batch_execute(&format!("CREATE {kind} {exists}\"{name}\""))
        .await
        .map_err(|e| describe(&e))?;
    Ok(name)
}

/// Drops the database `name` (closing its connections). Best effort.
pub async fn drop_database(client: &Client, name: &str) -> Result<(), String> {
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(|e| describe(&e))
}

/// This run's schema, or why the server is unreachable.
static RUN_SCHEMA: OnceCell<Result<String, String>> = OnceCell::const_new();

/// This run's schema `idem_test_<epoch>_<pid>`, or `None` after [`unavailable`]. Errors other
/// than an unreachable server panic.
pub async fn run_schema() -> Option<&'static str> {
    let prepared = RUN_SCHEMA
        .get_or_init(|| async {
            let client = admin().await.map_err(|e| format!("{e} ({})", url()))?;
            Ok(create_own(&client, Own::Schema, "idem_test")
                .await
                .expect("create the run's schema"))
        })
        .await;
    match prepared {
        Ok(schema) => Some(schema),
        Err(e) => {
            unavailable("PostgreSQL", e);
            None
        }
    }
}

/// A new table name (`schema.prefix_<random>`) in this run's schema.
pub async fn fresh_table(prefix: &str) -> Option<String> {
    let schema = run_schema().await?;
    Some(format!("{schema}.{prefix}_{:016x}", rand::random::<u64>()))
}

/// A store on a new table `label_<random>` in this run's schema, or `None` after
/// [`unavailable`].
pub async fn store(label: &str) -> Option<PostgresStore> {
    let table = fresh_table(label).await?;
    Some(
        PostgresStore::connect_with_table(&url(), &table)
            .await
            .expect("connect to PostgreSQL"),
    )
}

/// [`store`], shared.
pub async fn fresh(label: &str) -> Option<Arc<dyn Store>> {
    Some(Arc::new(store(label).await?))
}

/// A pool of at most `size` connections to the database `config` names.
pub fn pool(config: &Config, size: usize) -> Pool {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(Runtime::Tokio1)
        .build()
        .expect("a pool of a valid configuration")
}

/// Flushes the statistics of one of `pool`'s connections (PostgreSQL 15+), then runs `query`
/// there (prepared once): two transactions of that connection. With a pool of one connection
/// shared with the store, the store's statements are counted in `pg_stat_database` by the
/// reading, and the reading adds exactly two.
pub async fn flushed_row(
    pool: &Pool,
    query: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<tokio_postgres::Row, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    client
        .simple_query("SELECT pg_stat_force_next_flush()")
        .await
        .map_err(|e| describe(&e))?;
    let statement = client
        .prepare_cached(query)
        .await
        .map_err(|e| describe(&e))?;
    client
        .query_one(&statement, params)
        .await
        .map_err(|e| describe(&e))
}

/// Runs `calls` between two readings of `read`, `rounds` times, and returns the difference of
/// the round where `size` of it is smallest: other work (autovacuum, other clients) may add to
/// a count, never take from it.
pub async fn fewest<T, R, RF, C, CF>(
    rounds: usize,
    mut read: impl FnMut() -> RF,
    mut calls: impl FnMut(usize) -> CF,
    delta: impl Fn(&T, &T) -> R,
    size: impl Fn(&R) -> i64,
) -> Result<R, String>
where
    RF: std::future::Future<Output = Result<T, String>>,
    CF: std::future::Future<Output = Result<C, String>>,
{
    let mut best: Option<R> = None;
    for round in 0..rounds {
        let before = read().await?;
        calls(round).await?;
        let after = read().await?;
        let d = delta(&before, &after);
        if best.as_ref().is_none_or(|b| size(&d) < size(b)) {
            best = Some(d);
        }
    }
    best.ok_or_else(|| "no rounds".to_owned())
}
