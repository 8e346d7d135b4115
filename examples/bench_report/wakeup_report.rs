//! Section 5, the table: each store (Redis, Redis Cluster, PostgreSQL) in both modes, each mode
//! a run without waiters and one with [`WAITERS`], the difference counted per waiter.

use std::time::Duration;

use crate::measure::{verdict, within, Report, Res};
use crate::wakeup::{quantile, run, Backend, Mode, Outcome, Target, ROUNDS, WAITERS};
use crate::wakeup_count::{Counter, Counts};

/// The targets: wake-up p99 and store commands per waiter, with notification.
const P99_TARGET_MS: f64 = 5.0;
const COMMANDS_TARGET: f64 = 3.0;

/// One mode's figures.
struct Figures {
    mode: Mode,
    p50: f64,
    p99: f64,
    max: f64,
    /// p50 and p99 from the end of the holder's body.
    from_body: (f64, f64),
    waiters: usize,
    /// The lowest and highest of the rounds' medians.
    rounds: (f64, f64),
    wrong: usize,
    /// Per waiter, by command (`statements` for PostgreSQL).
    per_waiter: Counts,
}

impl Figures {
    fn commands(&self) -> f64 {
        self.per_waiter.0.values().sum::<i64>() as f64 / (WAITERS * ROUNDS) as f64
    }
}

/// Section 5: needs the `redis` or `postgres` feature and the servers; a store that cannot
/// be reached is skipped with a note.
pub(crate) async fn section(r: &mut Report) {
    r.section(&format!(
        "5. waking waiters: {WAITERS} waiters in another process, 200 ms body, {ROUNDS} rounds"
    ));
    #[cfg(feature = "redis")]
    {
        let url = idem_support::redis::url();
        let prefix = format!("idem-wakeup-{:016x}", rand::random::<u64>());
        match Counter::redis(&url, &prefix).await {
            Ok(counter) => {
                let target = Target {
                    backend: Backend::Redis,
                    url,
                    name: prefix.clone(),
                };
                measure(r, &target, counter).await;
                idem_support::redis::delete_prefix(&prefix);
            }
            Err(e) => skipped(r, "Redis (IDEM_REDIS_URL)", e),
        }
        cluster(r).await;
    }
    #[cfg(feature = "postgres")]
    postgres(r).await;
    #[cfg(not(all(feature = "redis", feature = "postgres")))]
    r.row(
        "a backend is not built",
        "run with --features redis,postgres".into(),
    );
}

fn skipped(r: &mut Report, what: &str, why: String) {
    eprintln!("bench_report: {what} unreachable ({why}); skipping its waiters");
    r.row(&format!("{what}: unreachable, skipped"), why);
}

/// The cluster: skipped if it does not answer at all, else tried up to three times, 30 s apart,
/// as nodes may be restarting (a failover test shares the cluster).
#[cfg(feature = "redis")]
async fn cluster(r: &mut Report) {
    let url = idem_support::redis::cluster_url();
    if let Err(e) = Counter::cluster_seed(&url).await {
        return skipped(r, "Redis Cluster (IDEM_REDIS_CLUSTER_URL)", e);
    }
    for attempt in 1..=3 {
        let target = Target {
            backend: Backend::Cluster,
            url: url.clone(),
            name: format!("idem-wakeup-{:016x}", rand::random::<u64>()),
        };
        let measured = match Counter::cluster(&url, &target.name).await {
            Ok(counter) => figures(&target, counter).await,
            Err(e) => Err(e),
        };
        // The attempt's records and fences, on every master, whatever its outcome.
        if let Err(e) = within(
            Duration::from_secs(20),
            delete_on_cluster(&url, &target.name),
        )
        .await
        {
            eprintln!(
                "bench_report: could not delete the keys under {} on the cluster: {e}",
                target.name
            );
        }
        match measured {
            Ok(figures) => return report(r, Backend::Cluster, &figures),
            Err(e) if attempt < 3 => {
                eprintln!(
                    "bench_report: Redis Cluster attempt {attempt} failed ({e}); again in 30 s"
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Err(e) => {
                eprintln!("bench_report: Redis Cluster failed three times: {e}");
                r.row("Redis Cluster: failed three times", e);
            }
        }
    }
}

/// Deletes every key under `prefix` on each master of the cluster `url` names: `SCAN` for
/// `<prefix>:*` on each, then `UNLINK` key by key (keys of several slots cannot share one
/// command). The replicas follow their masters.
#[cfg(feature = "redis")]
async fn delete_on_cluster(url: &str, prefix: &str) -> Res<()> {
    use idempotency::redis::redis;
    let mut seed = Counter::cluster_seed(url).await?;
    let listing: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut seed)
        .await
        .map_err(|e| e.to_string())?;
    let pattern = format!("{prefix}:*");
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
            continue;
        }
        let address = address.split(['@', ',']).next().unwrap_or(address);
        let mut node = idem_support::redis::connect(&format!("redis://{address}")).await?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut node)
                .await
                .map_err(|e| format!("SCAN on {address}: {e}"))?;
            for key in keys {
                redis::cmd("UNLINK")
                    .arg(&key)
                    .query_async::<()>(&mut node)
                    .await
                    .map_err(|e| format!("UNLINK {key} on {address}: {e}"))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// PostgreSQL, in a database of the run's own (no other client's statements count).
#[cfg(feature = "postgres")]
async fn postgres(r: &mut Report) {
    use idem_support::postgres::{create_own, describe, drop_database, Own};
    let url = idem_support::postgres::url();
    let admin = match within(Duration::from_secs(5), async {
        idem_support::postgres::admin()
            .await
            .map_err(|e| describe(&e))
    })
    .await
    {
        Ok(admin) => admin,
        Err(e) => return skipped(r, "PostgreSQL (IDEM_POSTGRES_URL)", e),
    };
    let database = match create_own(&admin, Own::Database, "idem_wakeup").await {
        Ok(db) => db,
        Err(e) => {
            r.row("PostgreSQL: no database of its own, skipped", e);
            return;
        }
    };
    let target = Target {
        backend: Backend::Postgres,
        url: crate::wakeup_count::with_database(&url, &database),
        name: "idem_wakeup".into(),
    };
    let counter = Counter::Postgres {
        admin,
        database: database.clone(),
    };
    measure(r, &target, counter).await;
    let cleanup = async {
        let admin = idem_support::postgres::admin()
            .await
            .map_err(|e| describe(&e))?;
        drop_database(&admin, &database).await
    };
    if let Err(e) = within(Duration::from_secs(10), cleanup).await {
        eprintln!("bench_report: could not drop the database {database}: {e}");
    }
}

/// Measures and reports one store, or the reason it stopped.
async fn measure(r: &mut Report, target: &Target, counter: Counter) {
    match figures(target, counter).await {
        Ok(figures) => report(r, target.backend, &figures),
        Err(e) => {
            eprintln!(
                "bench_report: {} waiters stopped: {e}",
                target.backend.label()
            );
            r.row(&format!("{}: stopped", target.backend.label()), e);
        }
    }
}

/// Both modes of `target`: a run without waiters and one with [`WAITERS`], counted; their
/// latencies, or those of a third run if counting slows the server down.
async fn figures(target: &Target, mut counter: Counter) -> Res<Vec<Figures>> {
    let mut all = Vec::new();
    let limit = Duration::from_secs(120);
    for mode in [Mode::Notify, Mode::Poll] {
        let alone = within(limit, run(target, mode, 0, Some(&mut counter))).await?;
        let counted = within(limit, run(target, mode, WAITERS, Some(&mut counter))).await?;
        let mut wrong = counted.wrong;
        let Outcome {
            mut latencies,
            mut from_body,
            mut round_medians,
            ..
        } = if counter.disturbs() {
            let timed = within(limit, run(target, mode, WAITERS, None)).await?;
            wrong += timed.wrong;
            timed
        } else {
            Outcome {
                counts: Counts::default(),
                ..counted
            }
        };
        if latencies.is_empty() {
            return Err("no waiter answered".into());
        }
        all.push(Figures {
            mode,
            p50: quantile(&mut latencies, 0.50),
            p99: quantile(&mut latencies, 0.99),
            max: quantile(&mut latencies, 1.0),
            from_body: (
                quantile(&mut from_body, 0.50),
                quantile(&mut from_body, 0.99),
            ),
            waiters: latencies.len(),
            rounds: (
                quantile(&mut round_medians, 0.0),
                quantile(&mut round_medians, 1.0),
            ),
            wrong,
            per_waiter: counted.counts.since(&alone.counts),
        });
    }
    Ok(all)
}

fn report(r: &mut Report, backend: Backend, all: &[Figures]) {
    let name = match backend {
        Backend::Redis => "redis",
        Backend::Cluster => "redis_cluster",
        Backend::Postgres => "postgres",
    };
    let what = match backend {
        Backend::Postgres => "statements",
        _ => "commands",
    };
    for f in all {
        let label = format!("{}, {}", backend.label(), f.mode.label());
        r.row(
            &format!("{label}: wake-up p50 / p99"),
            format!(
                "{:>7.2} / {:>7.2} ms   max {:.2}, rounds' p50 {:.2} to {:.2} ms, {} waiters",
                f.p50, f.p99, f.max, f.rounds.0, f.rounds.1, f.waiters
            ),
        );
        r.row(
            &format!("{label}: the same from the body's end"),
            format!(
                "{:>7.2} / {:>7.2} ms   (holder's complete round trip included)",
                f.from_body.0, f.from_body.1
            ),
        );
        let breakdown = match backend {
            Backend::Postgres => "pg_stat_database".to_owned(),
            _ => f
                .per_waiter
                .0
                .iter()
                .map(|(c, n)| (c, *n as f64 / (WAITERS * ROUNDS) as f64))
                .filter(|(_, n)| n.abs() >= 0.005)
                .map(|(c, n)| format!("{c} {n:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        r.row(
            &format!("{label}: {what} per waiter"),
            format!("{:>7.2}        ({breakdown})", f.commands()),
        );
        if f.wrong > 0 {
            r.row(
                &format!("{label}: waiters without the holder's value"),
                format!("{:>7}   NOT all replayed it", f.wrong),
            );
        }
        let field = format!("wakeup_{name}_{}", f.mode.arg());
        r.field(&format!("{field}_p50_ms"), f.p50);
        r.field(&format!("{field}_p99_ms"), f.p99);
        r.field(&format!("{field}_max_ms"), f.max);
        r.field(&format!("{field}_from_body_p50_ms"), f.from_body.0);
        r.field(&format!("{field}_from_body_p99_ms"), f.from_body.1);
        r.field(&format!("{field}_{what}_per_waiter"), f.commands());
        r.field(&format!("{field}_wrong"), f.wrong as f64);
        if f.mode == Mode::Notify {
            // The notified p99 (also `wakeup_<store>_notify_p99_ms`) under the name the
            // targets use.
            r.field(&format!("{name}_wake_p99_ms"), f.p99);
        }
    }
    if let Some(notify) = all.iter().find(|f| f.mode == Mode::Notify) {
        let reached = notify.p99 <= P99_TARGET_MS
            && notify.commands() <= COMMANDS_TARGET
            && all.iter().all(|f| f.wrong == 0);
        r.row(
            &format!(
                "target: {} p99 ≤ {P99_TARGET_MS} ms, ≤ {COMMANDS_TARGET} {what}/waiter",
                backend.label()
            ),
            format!(
                "{}   (p99 {:.2} ms, {:.2} {what})",
                verdict(reached),
                notify.p99,
                notify.commands()
            ),
        );
    }
}
