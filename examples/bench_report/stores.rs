//! Section 3: the Redis and PostgreSQL stores (features `redis`, `postgres`).
//!
//! Every count comes from the server, around calls made through `#[idempotent]`:
//!
//! - Redis round trips: the server's `MONITOR` feed, counting the commands sent on the store's
//!   own connection between two markers (as `tests/redis_roundtrips.rs` does), so other clients
//!   do not disturb the count. Cross-checked with `INFO commandstats` deltas (the round of 3
//!   with the fewest commands, less the section's own `INFO`): the calls of the commands the
//!   store sent. The sum over all of commandstats is not the round-trip count, since it also
//!   counts the commands a Lua script runs inside its one round trip; it is reported as the
//!   commands the server executed per call.
//! - PostgreSQL statements: `pg_stat_database.xact_commit` deltas in a database of the run's
//!   own, through a pool of one connection, flushed with `pg_stat_force_next_flush()` (as
//!   `tests/postgres_statements.rs` does); the round of 3 with the fewest.
//!
//! Calls per second compare idem against a raw client sending the same commands in the same
//! run: for Redis the `EVALSHA`s the store sent (script hash, keys and arguments taken from the
//! `MONITOR` feed), for PostgreSQL the claim and complete statements the store prepared (their
//! text read from `pg_prepared_statements`). Both run on the report's one-thread runtime, in
//! 9 pairs of back-to-back 100 ms windows, each after an untimed 40 ms lead-in; the rates are
//! the medians of each side, the ratio the median of the pairs' ratios.

use super::Report;

/// Section 3 needs the `redis` and `postgres` features and the servers.
pub async fn section_stores(r: &mut Report) {
    r.section("3. Redis and PostgreSQL stores: counted by the servers, rates vs raw clients");
    #[cfg(feature = "redis")]
    redis_part::run(r).await;
    #[cfg(feature = "postgres")]
    postgres_part::run(r).await;
    #[cfg(not(all(feature = "redis", feature = "postgres")))]
    {
        let missing: Vec<&str> = [
            (!cfg!(feature = "redis")).then_some("Redis"),
            (!cfg!(feature = "postgres")).then_some("PostgreSQL"),
        ]
        .into_iter()
        .flatten()
        .collect();
        eprintln!(
            "bench_report: section 3 ({}) needs `--features redis,postgres`",
            missing.join(", ")
        );
        r.row(
            &format!("{}: not built", missing.join(" and ")),
            "run with --features redis,postgres".into(),
        );
    }
}

#[cfg(any(feature = "redis", feature = "postgres"))]
use common::*;

#[cfg(any(feature = "redis", feature = "postgres"))]
mod common {
    use std::cell::Cell;
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    pub(super) use super::super::workload::{compute, request, BenchError, ChargeRequest, Receipt};
    pub(super) use super::super::{fresh_ids, verdict, Report};

    /// How long the section's results are kept: they clean themselves up after the run.
    pub(super) const TTL: Duration = Duration::from_secs(600);
    /// Calls per counted measurement.
    pub(super) const CALLS: u64 = 100;
    /// Rounds per count (the smallest counts).
    pub(super) const ROUNDS: usize = 3;
    /// Pairs of windows (idem, raw) per rate comparison.
    pub(super) const PAIRS: usize = 9;
    /// One timed window of a rate measurement.
    pub(super) const WINDOW: Duration = Duration::from_millis(100);
    /// Concurrent tasks of the concurrent rate measurements.
    pub(super) const TASKS: usize = 16;
    /// The untimed start of each window.
    pub(super) const LEAD_IN: Duration = Duration::from_millis(40);
    /// Upper bound on the calls of one task in one window, whatever the clock says.
    const MAX_CALLS: u64 = 5_000_000;

    pub(super) type Res<T> = std::result::Result<T, String>;

    /// The workload of section 1 through a store given as an argument.
    #[idempotency::idempotent(name = "bench.charge", key = req.order_id, store = store, skip(store), ttl = TTL)]
    pub(super) async fn charge<S: idempotency::Store + Clone + 'static>(
        store: &S,
        req: ChargeRequest,
    ) -> Result<Receipt, BenchError> {
        Ok(compute(&req))
    }

    /// One `#[idempotent]` call, its error as text.
    pub(super) async fn call<S: idempotency::Store + Clone + 'static>(
        store: &S,
        order_id: u64,
    ) -> Res<()> {
        let receipt = charge(store, request(order_id))
            .await
            .map_err(|e| format!("idem call failed: {e}"))?;
        std::hint::black_box(receipt);
        Ok(())
    }

    /// Indices handed to the measured calls: unique across all measurements of the run, so a
    /// call meant to miss never meets an earlier call's record.
    static NEXT_INDEX: AtomicU64 = AtomicU64::new(0);

    /// Calls per second of `tasks` loops, each calling `f(task, index)` (a fresh index each
    /// time): calls that end in the `window` after an untimed lead-in of [`LEAD_IN`], which
    /// lets the machine settle on this side's connections and processes (without it, whichever
    /// side had just run was up to twice as fast on a loaded 2-core machine). Stops at the first
    /// error.
    pub(super) async fn rate<F, Fut>(tasks: usize, window: Duration, f: F) -> Res<f64>
    where
        F: Fn(usize, u64) -> Fut,
        Fut: Future<Output = Res<()>>,
    {
        let counted = Cell::new(0u64);
        let timed_from = Instant::now() + LEAD_IN;
        let deadline = timed_from + window;
        let (counted, f) = (&counted, &f);
        let loops = (0..tasks).map(|task| async move {
            let mut calls = 0u64;
            while Instant::now() < deadline && calls < MAX_CALLS {
                f(task, NEXT_INDEX.fetch_add(1, Ordering::Relaxed)).await?;
                calls += 1;
                if Instant::now() > timed_from {
                    counted.set(counted.get() + 1);
                }
            }
            Res::Ok(())
        });
        for result in futures::future::join_all(loops).await {
            result?;
        }
        Ok(counted.get() as f64 / timed_from.elapsed().as_secs_f64())
    }

    /// Calls per second of idem and of the raw client in [`PAIRS`] pairs of back-to-back
    /// windows (after a lead-in of each, which opens pooled connections and prepares
    /// statements): the median rate of each side, and the median of the pairs' ratios, so a
    /// burst of load elsewhere on the machine spoils a pair, not the result.
    pub(super) async fn versus<FI, FutI, FR, FutR>(tasks: usize, idem: FI, raw: FR) -> Res<Versus>
    where
        FI: Fn(usize, u64) -> FutI,
        FutI: Future<Output = Res<()>>,
        FR: Fn(usize, u64) -> FutR,
        FutR: Future<Output = Res<()>>,
    {
        rate(tasks, Duration::ZERO, &idem).await?;
        rate(tasks, Duration::ZERO, &raw).await?;
        let (mut idems, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..PAIRS {
            // Alternate which side goes first, so a drift of the machine favours neither.
            let (i, r) = if pair % 2 == 0 {
                let i = rate(tasks, WINDOW, &idem).await?;
                (i, rate(tasks, WINDOW, &raw).await?)
            } else {
                let r = rate(tasks, WINDOW, &raw).await?;
                (rate(tasks, WINDOW, &idem).await?, r)
            };
            idems.push(i);
            raws.push(r);
            ratios.push(i / r);
        }
        Ok(Versus {
            idem: median(idems),
            raw: median(raws),
            ratio: median(ratios),
        })
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    #[derive(Clone, Copy)]
    pub(super) struct Versus {
        pub(super) idem: f64,
        pub(super) raw: f64,
        /// The median of the pairs' idem / raw.
        pub(super) ratio: f64,
    }

    impl Versus {
        /// A row `label: idem/s  raw/s  ratio`, and the fields `<name>_per_sec`,
        /// `<name>_raw_per_sec`, `<name>_vs_raw_ratio`.
        pub(super) fn report(self, r: &mut Report, label: &str, name: &str) {
            r.row(
                label,
                format!(
                    "{:>9.0}/s   raw {:>9.0}/s   ratio {:.2}",
                    self.idem, self.raw, self.ratio
                ),
            );
            r.field(&format!("{name}_per_sec"), self.idem);
            r.field(&format!("{name}_raw_per_sec"), self.raw);
            r.field(&format!("{name}_vs_raw_ratio"), self.ratio);
        }
    }

    /// Whether a measured per-call count is exactly `n`.
    pub(super) fn exactly(count: f64, n: f64) -> bool {
        (count - n).abs() < 1e-9
    }

    /// Runs `f` under a time limit, turning a timeout into an error.
    pub(super) async fn within<T>(limit: Duration, f: impl Future<Output = Res<T>>) -> Res<T> {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| Err(format!("did not finish within {limit:?}")))
    }
}

#[cfg(feature = "redis")]
mod redis_part {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use futures::StreamExt;
    use idempotency::redis::redis::aio::{ConnectionManager, MultiplexedConnection};
    use idempotency::redis::redis::{self, IntoConnectionInfo, ProtocolVersion, Value};
    use idempotency::{RedisStore, StorageKey};

    use super::*;

    const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

    pub(super) async fn run(r: &mut Report) {
        let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let admin = within(Duration::from_secs(5), async {
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let admin = match admin {
            Ok(admin) => admin,
            Err(e) => {
                eprintln!("bench_report: Redis unreachable ({e}); skipping its part");
                r.row("Redis (IDEM_REDIS_URL): unreachable, part skipped", e);
                return;
            }
        };
        let prefix = format!("idem-bench-{:016x}", rand::random::<u64>());
        let outcome = within(Duration::from_secs(30), measure(r, &url, &prefix, &admin)).await;
        if let Err(e) = outcome {
            eprintln!("bench_report: Redis part stopped: {e}");
            r.row("Redis: stopped", e);
        }
        if let Err(e) = within(Duration::from_secs(10), clean_up(&admin, &prefix)).await {
            eprintln!("bench_report: could not remove the keys under {prefix}: {e}");
        }
    }

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    async fn measure(
        r: &mut Report,
        url: &str,
        prefix: &str,
        admin: &MultiplexedConnection,
    ) -> Res<()> {
        let store = RedisStore::connect_with_prefix(url, prefix)
            .await
            .map_err(err)?;
        // The raw client: a ConnectionManager speaking the protocol the store speaks.
        let mut info = url.into_connection_info().map_err(err)?;
        if !url.contains("protocol=") {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        let raw = redis::Client::open(info)
            .map_err(err)?
            .get_connection_manager()
            .await
            .map_err(err)?;

        // Warm up: the hit key exists, and the server knows the scripts (a NOSCRIPT answer
        // costs one SCRIPT LOAD, once).
        let hit_id = fresh_ids();
        call(&store, hit_id).await?;
        call(&store, hit_id).await?;
        call(&store, hit_id + 1).await?;

        // 1. Every command the server executed, from INFO commandstats.
        let miss_cmds = commandstats_per_call(admin, |round| {
            let base = fresh_ids() + round as u64 * CALLS;
            let store = &store;
            async move {
                for i in 0..CALLS {
                    call(store, base + i).await?;
                }
                Ok(())
            }
        })
        .await?;
        let hit_cmds = commandstats_per_call(admin, |_| {
            let store = &store;
            async move {
                for _ in 0..CALLS {
                    call(store, hit_id).await?;
                }
                Ok(())
            }
        })
        .await?;

        // 2. Round trips: the store's own commands in the MONITOR feed.
        let seen = monitor(url, admin, prefix, &store, hit_id).await?;
        let miss_rt = seen.miss_sent.len() as f64 / CALLS as f64;
        let hit_rt = seen.hit_sent.len() as f64 / CALLS as f64;

        let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
        let breakdown = |m: &BTreeMap<String, f64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The same round trips from commandstats: the calls of the commands the store's
        // connection sent (scripts cannot call EVALSHA, so none of these ran inside a script).
        let hit_rt_stats = top_level(&hit_cmds, &seen.hit_sent);
        let miss_rt_stats = top_level(&miss_cmds, &seen.miss_sent);
        r.row(
            &format!("Redis round trips per hit ({CALLS} hits, MONITOR)"),
            format!(
                "{hit_rt:>9.2}     {}; commandstats {hit_rt_stats:.2}",
                command_names(&seen.hit_sent, CALLS)
            ),
        );
        r.row(
            &format!("Redis round trips per miss ({CALLS} misses, MONITOR)"),
            format!(
                "{miss_rt:>9.2}     {}; commandstats {miss_rt_stats:.2}",
                command_names(&seen.miss_sent, CALLS)
            ),
        );
        r.row(
            "Redis commands run per hit, scripts incl. (commandstats)",
            format!("{:>9.2}     {}", total(&hit_cmds), breakdown(&hit_cmds)),
        );
        r.row(
            "Redis commands run per miss, scripts incl. (commandstats)",
            format!("{:>9.2}     {}", total(&miss_cmds), breakdown(&miss_cmds)),
        );
        r.row(
            "target: Redis 1 round trip per hit and 2 per miss",
            verdict(
                exactly(hit_rt, 1.0)
                    && exactly(miss_rt, 2.0)
                    && exactly(hit_rt_stats, 1.0)
                    && exactly(miss_rt_stats, 2.0),
            ),
        );
        r.field("redis_hit_roundtrips", hit_rt);
        r.field("redis_miss_roundtrips", miss_rt);
        r.field("redis_hit_roundtrips_commandstats", hit_rt_stats);
        r.field("redis_miss_roundtrips_commandstats", miss_rt_stats);
        r.field("redis_hit_server_commands", total(&hit_cmds));
        r.field("redis_miss_server_commands", total(&miss_cmds));
        r.field("redis_hit_lua_commands", seen.hit_lua as f64 / CALLS as f64);
        r.field(
            "redis_miss_lua_commands",
            seen.miss_lua as f64 / CALLS as f64,
        );

        // 3. Calls per second against the raw client sending the same EVALSHAs.
        let Some(hit_claim) = seen.hit_sent.first() else {
            return Err("no hit claim in the MONITOR feed".into());
        };
        let (Some(miss_claim), Some(miss_complete)) =
            (seen.miss_sent.first(), seen.miss_sent.get(1))
        else {
            return Err("no miss claim and complete in the MONITOR feed".into());
        };
        for (what, args) in [
            ("hit claim", hit_claim),
            ("miss claim", miss_claim),
            ("complete", miss_complete),
        ] {
            // EVALSHA sha 2 record fence ARGV...: the keys are the store's, the rest replayed.
            if args.len() < 6
                || !args[0].eq_ignore_ascii_case(b"EVALSHA")
                || args[2] != b"2"
                || !args[3].starts_with(prefix.as_bytes())
            {
                return Err(format!(
                    "the store's {what} is not `EVALSHA sha 2 record fence ...`: {:?}",
                    args.iter()
                        .map(|a| String::from_utf8_lossy(a))
                        .collect::<Vec<_>>()
                ));
            }
        }
        let raw = &raw;
        let store = &store;
        let idem_hit = |_: usize, _: u64| call(store, hit_id);
        let raw_hit = |_: usize, _: u64| send_raw_hit(raw.clone(), hit_claim);
        let idem_miss = |base: u64| move |_: usize, i: u64| call(store, base + i);
        let raw_miss = |base: u64| {
            move |_: usize, i: u64| {
                let key = StorageKey::derive("bench-raw", &(base + i)).expect("a valid key");
                send_raw_miss(
                    raw.clone(),
                    store.record_key(&key),
                    miss_claim,
                    miss_complete,
                )
            }
        };
        let hit_1 = versus(1, idem_hit, raw_hit).await?;
        let hit_n = versus(TASKS, idem_hit, raw_hit).await?;
        let miss_1 = versus(1, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?;
        let miss_n = versus(TASKS, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?;
        hit_1.report(
            r,
            "Redis hits/s, 1 task vs raw EVALSHA of the same claim",
            "redis_hit",
        );
        hit_n.report(
            r,
            &format!("Redis hits/s, {TASKS} tasks vs raw EVALSHA of the same claim"),
            &format!("redis_hit_{TASKS}_tasks"),
        );
        miss_1.report(
            r,
            "Redis misses/s, 1 task vs raw claim + complete EVALSHAs",
            "redis_miss",
        );
        miss_n.report(
            r,
            &format!("Redis misses/s, {TASKS} tasks vs raw claim + complete"),
            &format!("redis_miss_{TASKS}_tasks"),
        );
        let ratio = hit_1.ratio.min(hit_n.ratio);
        r.field("redis_vs_raw_ratio", ratio);
        r.row(
            "target: Redis hits ≥ 0.8× raw client rate",
            format!(
                "{}   (worse of 1 and {TASKS} tasks: {ratio:.2})",
                verdict(ratio >= 0.8)
            ),
        );
        Ok(())
    }

    /// Per call, the commandstats calls of the commands in `sent` (by name; `script|load` for
    /// `SCRIPT LOAD`).
    fn top_level(stats: &BTreeMap<String, f64>, sent: &[Vec<Vec<u8>>]) -> f64 {
        let mut names = std::collections::BTreeSet::new();
        for args in sent {
            let word = |i: usize| String::from_utf8_lossy(&args[i]).to_lowercase();
            let name = word(0);
            if !stats.contains_key(&name) && args.len() > 1 {
                names.insert(format!("{name}|{}", word(1)));
            } else {
                names.insert(name);
            }
        }
        names.iter().filter_map(|n| stats.get(n)).sum()
    }

    /// `EVALSHA 4.00` for 4 EVALSHAs per call.
    fn command_names(sent: &[Vec<Vec<u8>>], calls: u64) -> String {
        let mut names = BTreeMap::<String, usize>::new();
        for args in sent {
            let name = String::from_utf8_lossy(args.first().map_or(&[][..], |a| a));
            *names.entry(name.to_uppercase()).or_default() += 1;
        }
        names
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", *v as f64 / calls as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Builds a command from captured arguments, `replace`ing some of them.
    fn command(args: &[Vec<u8>], replace: &[(usize, &[u8])]) -> redis::Cmd {
        let name = String::from_utf8_lossy(&args[0]);
        let mut cmd = redis::cmd(&name);
        for (i, arg) in args.iter().enumerate().skip(1) {
            match replace.iter().find(|(at, _)| *at == i) {
                Some((_, with)) => cmd.arg(*with),
                None => cmd.arg(arg.as_slice()),
            };
        }
        cmd
    }

    /// The store's hit, sent by the raw client: the same EVALSHA of the claim script, same keys
    /// and arguments; its reply must be the completed record.
    async fn send_raw_hit(mut con: ConnectionManager, claim: &[Vec<u8>]) -> Res<()> {
        let reply: Value = command(claim, &[])
            .query_async(&mut con)
            .await
            .map_err(err)?;
        match reply {
            Value::Array(items) if matches!(items.first(), Some(Value::BulkString(t)) if t == b"completed") =>
            {
                std::hint::black_box(items);
                Ok(())
            }
            other => Err(format!("raw claim of the hit key answered {other:?}")),
        }
    }

    /// The store's miss, sent by the raw client on a fresh key: the claim EVALSHA, then the
    /// complete EVALSHA with the token the claim returned and the record the store wrote.
    async fn send_raw_miss(
        mut con: ConnectionManager,
        record: String,
        claim: &[Vec<u8>],
        complete: &[Vec<u8>],
    ) -> Res<()> {
        let fence = format!("{record}:fence");
        let keys: [(usize, &[u8]); 2] = [(3, record.as_bytes()), (4, fence.as_bytes())];
        let reply: Value = command(claim, &keys)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        let token = match &reply {
            Value::Array(items) => match (items.first(), items.get(1)) {
                (Some(Value::BulkString(tag)), Some(Value::BulkString(token)))
                    if tag == b"acquired" =>
                {
                    token.clone()
                }
                _ => return Err(format!("raw claim of a fresh key answered {reply:?}")),
            },
            _ => return Err(format!("raw claim of a fresh key answered {reply:?}")),
        };
        // ARGV[1] of the complete script is the token.
        let done: Value = command(complete, &[keys[0], keys[1], (5, token.as_slice())])
            .query_async(&mut con)
            .await
            .map_err(err)?;
        match done {
            Value::Int(1) => Ok(()),
            other => Err(format!("raw complete answered {other:?}")),
        }
    }

    async fn info_commandstats(admin: &MultiplexedConnection) -> Res<BTreeMap<String, u64>> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin.clone())
            .await
            .map_err(err)?;
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let Some((name, stats)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if let Some(n) = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
            {
                calls.insert(name.to_owned(), n);
            }
        }
        Ok(calls)
    }

    /// Commands the server executed per call (by name), over [`CALLS`] calls between two
    /// `INFO commandstats`: the round of [`ROUNDS`] with the fewest, less the first `INFO`.
    async fn commandstats_per_call<F, Fut>(
        admin: &MultiplexedConnection,
        mut calls: F,
    ) -> Res<BTreeMap<String, f64>>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Res<()>>,
    {
        let mut best: Option<BTreeMap<String, u64>> = None;
        for round in 0..ROUNDS {
            let before = info_commandstats(admin).await?;
            calls(round).await?;
            let after = info_commandstats(admin).await?;
            let mut delta = BTreeMap::new();
            for (name, n) in &after {
                let mut d = n - before.get(name).copied().unwrap_or(0);
                if name == "info" {
                    d = d.saturating_sub(1); // our own first INFO
                }
                if d > 0 {
                    delta.insert(name.clone(), d);
                }
            }
            let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
            if best.as_ref().is_none_or(|b| sum(&delta) < sum(b)) {
                best = Some(delta);
            }
        }
        Ok(best
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v as f64 / CALLS as f64))
            .collect())
    }

    /// What the MONITOR feed showed: the arguments of each command the store's connection sent
    /// during the misses and during the hits, and how many commands scripts ran.
    struct Seen {
        miss_sent: Vec<Vec<Vec<u8>>>,
        hit_sent: Vec<Vec<Vec<u8>>>,
        miss_lua: usize,
        hit_lua: usize,
    }

    /// Runs [`CALLS`] misses, then [`CALLS`] hits, between markers sent on another connection,
    /// and reads the MONITOR feed up to the last marker.
    async fn monitor(
        url: &str,
        admin: &MultiplexedConnection,
        prefix: &str,
        store: &RedisStore,
        hit_id: u64,
    ) -> Res<Seen> {
        let client = redis::Client::open(url).map_err(err)?;
        let mut feed = client
            .get_async_monitor()
            .await
            .map_err(err)?
            .into_on_message::<String>();
        let marker = format!("idem-bench-mark-{:016x}", rand::random::<u64>());
        let mark = |n: usize| {
            let mut admin = admin.clone();
            let text = format!("{marker}-{n}");
            async move {
                redis::cmd("ECHO")
                    .arg(text)
                    .query_async::<String>(&mut admin)
                    .await
                    .map_err(err)
            }
        };
        let base = fresh_ids();
        mark(0).await?;
        for i in 0..CALLS {
            call(store, base + i).await?;
        }
        mark(1).await?;
        for _ in 0..CALLS {
            call(store, hit_id).await?;
        }
        mark(2).await?;

        let mut windows: Vec<Vec<(String, Vec<Vec<u8>>)>> = Vec::new();
        let read = async {
            while let Some(line) = feed.next().await {
                if let Some(n) = (0..3).find(|n| line.contains(&format!("{marker}-{n}\""))) {
                    if n == 2 {
                        return true;
                    }
                    windows.push(Vec::new());
                    continue;
                }
                if let (Some(window), Some(seen)) = (windows.last_mut(), parse_monitor(&line)) {
                    window.push(seen);
                }
            }
            false
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(true) if windows.len() == 2 => {}
            _ => return Err("the MONITOR feed did not reach the last marker".into()),
        }
        // The store's connection is the client whose commands name the store's prefix.
        let ours = windows
            .iter()
            .flatten()
            .find(|(client, args)| {
                client != "lua" && args.iter().any(|a| a.starts_with(prefix.as_bytes()))
            })
            .map(|(client, _)| client.clone())
            .ok_or("the store's commands do not show in the MONITOR feed")?;
        let sent = |w: &[(String, Vec<Vec<u8>>)]| -> Vec<Vec<Vec<u8>>> {
            w.iter()
                .filter(|(client, _)| *client == ours)
                .map(|(_, args)| args.clone())
                .collect()
        };
        let lua = |w: &[(String, Vec<Vec<u8>>)]| w.iter().filter(|(c, _)| c == "lua").count();
        Ok(Seen {
            miss_sent: sent(&windows[0]),
            hit_sent: sent(&windows[1]),
            miss_lua: lua(&windows[0]),
            hit_lua: lua(&windows[1]),
        })
    }

    /// One MONITOR line, `<time> [<db> <client>] "arg" "arg" ...`, into the client and the
    /// arguments, unquoted as Redis quotes them (`\"`, `\\`, `\n`, `\r`, `\t`, `\a`, `\b`,
    /// `\xHH`).
    fn parse_monitor(line: &str) -> Option<(String, Vec<Vec<u8>>)> {
        let open = line.find('[')?;
        let close = open + line[open..].find(']')?;
        let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
        let b = &line.as_bytes()[close + 1..];
        let mut args = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'"' {
                i += 1;
                continue;
            }
            i += 1;
            let mut arg = Vec::new();
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    let hex = |at: usize| {
                        std::str::from_utf8(b.get(at..at + 2)?)
                            .ok()
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    };
                    match b[i + 1] {
                        b'n' => arg.push(b'\n'),
                        b'r' => arg.push(b'\r'),
                        b't' => arg.push(b'\t'),
                        b'a' => arg.push(7),
                        b'b' => arg.push(8),
                        b'x' => match hex(i + 2) {
                            Some(byte) => {
                                arg.push(byte);
                                i += 2;
                            }
                            None => arg.push(b'x'),
                        },
                        other => arg.push(other),
                    }
                    i += 2;
                } else {
                    arg.push(b[i]);
                    i += 1;
                }
            }
            i += 1;
            args.push(arg);
        }
        Some((client, args))
    }

    /// Removes the section's keys (records and fences under its prefix).
    async fn clean_up(admin: &MultiplexedConnection, prefix: &str) -> Res<()> {
        let mut con = admin.clone();
        let mut cursor = 0u64;
        for _ in 0..100_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(err)?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut con)
                    .await
                    .map_err(err)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
        Err("SCAN did not finish".into())
    }
}

#[cfg(feature = "postgres")]
mod postgres_part {
    use std::time::Duration;

    use idem_runtime::engine::DEFAULT_LEASE;
    use idempotency::postgres::deadpool_postgres::{
        Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
    };
    use idempotency::postgres::tokio_postgres::{self, Client, Config, NoTls, Statement};
    use idempotency::{PostgresStore, StorageKey};

    use super::*;

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    /// tokio-postgres shows "db error" and keeps the server's message in its source.
    fn pg(e: tokio_postgres::Error) -> String {
        match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }
    }

    async fn connect(config: &Config) -> Res<Client> {
        let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub(super) async fn run(r: &mut Report) {
        let url = std::env::var("IDEM_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
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
        let database = match own_database(&admin).await {
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
        let cleanup = match &database {
            Some(db) => format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
            None => format!(
                "DROP TABLE IF EXISTS \"{table}\"; DROP SEQUENCE IF EXISTS \"{table}_token_seq\""
            ),
        };
        let cleaned = within(Duration::from_secs(10), async {
            match &database {
                Some(_) => admin.batch_execute(&cleanup).await.map_err(pg),
                None => connect(&bench)
                    .await?
                    .batch_execute(&cleanup)
                    .await
                    .map_err(pg),
            }
        })
        .await;
        if let Err(e) = cleaned {
            eprintln!("bench_report: could not clean up ({cleanup}): {e}");
        }
    }

    /// Creates `idem_bench_<epoch>_<pid>`, first dropping those earlier runs left behind (older
    /// than ten minutes by the server's clock).
    async fn own_database(admin: &Client) -> Res<String> {
        let stale = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname ~ '^idem_bench_[0-9]+_[0-9]+$'
                 AND split_part(datname, '_', 3)::bigint < extract(epoch FROM now())::bigint - 600",
                &[],
            )
            .await
            .map_err(pg)?;
        for row in stale {
            let name: &str = row.get(0);
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
        let epoch: i64 = admin
            .query_one("SELECT extract(epoch FROM now())::bigint", &[])
            .await
            .map_err(pg)?
            .get(0);
        let name = format!("idem_bench_{epoch}_{}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(pg)?;
        Ok(name)
    }

    fn pool(config: &Config, size: usize) -> Res<Pool> {
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
            .map_err(err)
    }

    /// Committed transactions in the database, read through the pool's one connection after
    /// flushing its statistics: two transactions of its own.
    async fn xact_commit(pool: &Pool, database: &str) -> Res<i64> {
        let client = pool.get().await.map_err(err)?;
        client
            .simple_query("SELECT pg_stat_force_next_flush()")
            .await
            .map_err(pg)?;
        let statement = client
            .prepare_cached("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .await
            .map_err(pg)?;
        Ok(client
            .query_one(&statement, &[&database])
            .await
            .map_err(pg)?
            .get(0))
    }

    /// Statements per call: [`CALLS`] calls between two readings, the round of [`ROUNDS`] with
    /// the fewest transactions, less the two each reading adds.
    async fn statements_per_call<F, Fut>(pool: &Pool, database: &str, mut calls: F) -> Res<f64>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Res<()>>,
    {
        let mut best = i64::MAX;
        for round in 0..ROUNDS {
            let before = xact_commit(pool, database).await?;
            calls(round).await?;
            let after = xact_commit(pool, database).await?;
            best = best.min(after - before - 2);
        }
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
        let one = pool(bench, 1)?;
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
            if !claim.contains("ON CONFLICT") || !complete.trim_start().starts_with("UPDATE") {
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
        let store = PostgresStore::from_pool(pool(bench, TASKS)?, table).map_err(err)?;
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

        let hit_1 = versus(1, idem_hit, raw_hit).await?;
        let hit_n = versus(TASKS, idem_hit, raw_hit).await?;
        let miss_1 = versus(1, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?;
        let miss_n = versus(TASKS, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?;
        r.row(
            "PostgreSQL raw client: the store's claim, complete SQL",
            "text read from pg_prepared_statements".into(),
        );
        hit_1.report(
            r,
            "PostgreSQL hits/s, 1 task vs raw, same claim statement",
            "postgres_hit",
        );
        hit_n.report(
            r,
            &format!("PostgreSQL hits/s, {TASKS} tasks vs raw, same claim statement"),
            &format!("postgres_hit_{TASKS}_tasks"),
        );
        miss_1.report(
            r,
            "PostgreSQL misses/s, 1 task vs raw claim + complete",
            "postgres_miss",
        );
        miss_n.report(
            r,
            &format!("PostgreSQL misses/s, {TASKS} tasks vs raw claim + complete"),
            &format!("postgres_miss_{TASKS}_tasks"),
        );
        let ratio = hit_1.ratio.min(hit_n.ratio);
        r.field("postgres_vs_raw_ratio", ratio);
        r.row(
            "target: PostgreSQL hits ≥ 0.8× raw client rate",
            format!(
                "{}   (worse of 1 and {TASKS} tasks: {ratio:.2})",
                verdict(ratio >= 0.8)
            ),
        );
        Ok(())
    }
}
