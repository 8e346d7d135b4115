//! Section 5, counting: what the servers executed for the waiters.
//!
//! - Redis (single server and cluster): the `MONITOR` feed of every node
//!   (`idem_support::monitor`), from a marker sent once both processes are connected and warmed
//!   up to one sent after the rounds: the commands clients sent (not those the scripts ran inside
//!   their one round trip) that name the run's key prefix, so that other clients of the server
//!   (tests, the cluster's failover test) do not count. The feed costs the server time, so the
//!   latencies come from another run, not monitored.
//! - PostgreSQL: `pg_stat_database.xact_commit + xact_rollback` of a database of the run's own
//!   (every statement of the stores runs alone, as one transaction). A connection hands its
//!   statistics to the server lazily (at most once a second, else after 10 s idle) but always
//!   when it closes, so it is read before and after both processes, once no connection to the
//!   database is left, from a connection to another database.
//!
//! Both include the holder and, for PostgreSQL, the stores' connecting and warming up: a run
//! with no waiters, counted the same way, is subtracted (`wakeup_report.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

#[cfg(feature = "redis")]
use idem_support::monitor::Monitor;
#[cfg(feature = "postgres")]
use idempotency::postgres::tokio_postgres::Client;
#[cfg(feature = "redis")]
use idempotency::redis::redis::{self, aio::MultiplexedConnection};

use crate::measure::Res;

/// Counts by name at one reading, or between two.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts(pub(crate) BTreeMap<String, i64>);

impl Counts {
    /// These counts less `before`'s.
    pub(crate) fn since(&self, before: &Counts) -> Counts {
        let mut delta = self.0.clone();
        for (name, n) in &before.0 {
            *delta.entry(name.clone()).or_default() -= n;
        }
        Counts(delta)
    }
}

/// A server's counters.
pub(crate) enum Counter {
    /// The `MONITOR` feeds of these nodes' URLs, for commands naming `prefix`.
    #[cfg(feature = "redis")]
    Redis { nodes: Vec<String>, prefix: String },
    /// `pg_stat_database` of `database`, read through `admin`, connected to another one.
    #[cfg(feature = "postgres")]
    Postgres { admin: Client, database: String },
}

/// A count begun.
pub(crate) enum Begun {
    #[cfg(feature = "redis")]
    Redis(Vec<Monitor>),
    #[cfg(feature = "postgres")]
    Postgres(Counts),
}

impl Counter {
    /// Whether counting slows the server down (the `MONITOR` feed): the timed run is then
    /// another one.
    pub(crate) fn disturbs(&self) -> bool {
        match self {
            #[cfg(feature = "redis")]
            Counter::Redis { .. } => true,
            #[cfg(feature = "postgres")]
            Counter::Postgres { .. } => false,
        }
    }

    /// Whether the count must begin before both processes connect and end after their
    /// connections closed (rather than around the rounds).
    pub(crate) fn around_processes(&self) -> bool {
        match self {
            #[cfg(feature = "redis")]
            Counter::Redis { .. } => false,
            #[cfg(feature = "postgres")]
            Counter::Postgres { .. } => true,
        }
    }

    pub(crate) async fn begin(&mut self) -> Res<Begun> {
        match self {
            #[cfg(feature = "redis")]
            Counter::Redis { nodes, .. } => {
                let mut monitors = Vec::with_capacity(nodes.len());
                for url in nodes.iter() {
                    let admin = idem_support::redis::connect(url).await?;
                    let mut monitor = Monitor::start(url, admin).await?;
                    monitor.mark().await?;
                    monitors.push(monitor);
                }
                Ok(Begun::Redis(monitors))
            }
            #[cfg(feature = "postgres")]
            Counter::Postgres { admin, database } => {
                Ok(Begun::Postgres(read_statements(admin, database).await?))
            }
        }
    }

    pub(crate) async fn end(&mut self, begun: Begun) -> Res<Counts> {
        match (self, begun) {
            #[cfg(feature = "redis")]
            (Counter::Redis { prefix, .. }, Begun::Redis(monitors)) => {
                let mut counts = Counts::default();
                for mut monitor in monitors {
                    monitor.mark().await?;
                    let windows = monitor.windows(Duration::from_secs(20)).await?;
                    for command in windows.iter().flatten() {
                        let ours = command
                            .args
                            .iter()
                            .any(|a| a.starts_with(prefix.as_bytes()));
                        if command.from_lua() || !ours {
                            continue;
                        }
                        let name = String::from_utf8_lossy(&command.args[0]).to_lowercase();
                        *counts.0.entry(name).or_default() += 1;
                    }
                }
                Ok(counts)
            }
            #[cfg(feature = "postgres")]
            (Counter::Postgres { admin, database }, Begun::Postgres(before)) => {
                Ok(read_statements(admin, database).await?.since(&before))
            }
            #[allow(unreachable_patterns)]
            _ => Err("a count ended on another counter".into()),
        }
    }

    /// The counter of a single Redis server, for the keys under `prefix`.
    #[cfg(feature = "redis")]
    pub(crate) async fn redis(url: &str, prefix: &str) -> Res<Counter> {
        idem_support::redis::connect(url).await?;
        Ok(Counter::Redis {
            nodes: vec![url.to_owned()],
            prefix: prefix.to_owned(),
        })
    }

    /// The counter of every node of the cluster that `url` (`redis+cluster://a,b,c`) names a
    /// node of, as `CLUSTER NODES` lists them, for the keys under `prefix`.
    #[cfg(feature = "redis")]
    pub(crate) async fn cluster(url: &str, prefix: &str) -> Res<Counter> {
        let mut con = Counter::cluster_seed(url).await?;
        let listing: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut con)
            .await
            .map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        for line in listing.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if flags.contains("fail") || flags.contains("noaddr") {
                return Err(format!("cluster node {address} is {flags}"));
            }
            let address = address.split(['@', ',']).next().unwrap_or(address);
            nodes.push(format!("redis://{address}"));
        }
        if nodes.is_empty() {
            return Err("CLUSTER NODES lists no node".into());
        }
        Ok(Counter::Redis {
            nodes,
            prefix: prefix.to_owned(),
        })
    }

    /// A plain connection to the first node `url` names that answers.
    #[cfg(feature = "redis")]
    pub(crate) async fn cluster_seed(url: &str) -> Res<MultiplexedConnection> {
        let seeds = url.split_once("://").map_or(url, |(_, rest)| rest);
        let mut why = format!("no node in {url}");
        for seed in seeds.split(',') {
            let seed = seed.rsplit_once('@').map_or(seed, |(_, host)| host);
            let seed = seed.split(['/', '?']).next().unwrap_or(seed);
            match idem_support::redis::connect(&format!("redis://{seed}")).await {
                Ok(con) => return Ok(con),
                Err(e) => why = format!("{seed}: {e}"),
            }
        }
        Err(why)
    }
}

/// Committed and rolled-back transactions of `database`, once none of its connections is left
/// (each hands over its statistics as it closes).
#[cfg(feature = "postgres")]
async fn read_statements(admin: &Client, database: &str) -> Res<Counts> {
    let pg = |e| idem_support::postgres::describe(&e);
    let query = "SELECT numbackends, xact_commit + xact_rollback FROM pg_stat_database
                 WHERE datname = $1";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = admin.query_one(query, &[&database]).await.map_err(pg)?;
        let backends: i32 = row.get(0);
        if backends == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{backends} connections to {database} stayed open"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The statistics are handed over before a closing connection leaves the count; a moment
    // more costs nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let row = admin.query_one(query, &[&database]).await.map_err(pg)?;
    let statements: i64 = row.get(1);
    Ok(Counts(BTreeMap::from([(
        "statements".to_owned(),
        statements,
    )])))
}

/// `url` with its database replaced by `database` (a `postgres://` URL or a `key=value`
/// string).
#[cfg(feature = "postgres")]
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("{url} dbname={database}");
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    format!("{scheme}://{authority}/{database}{query}")
}
