//! Store faults in the middle of concurrent traffic: a Redis server whose client connections are
//! killed and which is crashed (SIGKILL) and shut down (SIGTERM) and started again, and
//! PostgreSQL backends terminated by `pg_terminate_backend`, while 32 tasks call one
//! `#[idempotent]` function over a moving window of 100 keys.
//!
//! What must hold, for every call and key:
//!
//! - every call returns `Ok`, `Error::Store` (of the store's backend) or `Error::InFlight` (a
//!   claim left in flight by a call whose reply was lost); nothing else, and nothing panics;
//! - no key's body runs twice: a ledger outside the store counts the runs of each key, and
//!   every `Ok` of a key carries that one run's value;
//! - the store recovers by itself: after each fault a call on a fresh key succeeds within a
//!   bounded time, on the same store value, which is never recreated;
//! - afterwards every key used settles (one more call per key until it gets `Ok`, waiting out
//!   the 2 s lease of claims left in flight) and still ran exactly once.
//!
//! Redis runs as a private `redis-server` on a free loopback port, with an append-only file
//! fsynced on every write (`--appendonly yes --appendfsync always`), so a restart keeps every
//! record Redis acknowledged and "ran twice" stays an exact assertion. The shared server at
//! 6379 is never touched. PostgreSQL is the shared server at `IDEM_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), with a table in a schema of this run's own and
//! an `application_name` of its own, so only the store's own backends are terminated.
//!
//! Both tests are skipped with a printed reason when `redis-server` or PostgreSQL is
//! unavailable, unless `IDEM_REQUIRE_SERVICES=1`. They print their figures; run with
//! `--nocapture` to see them:
//!
//! ```text
//! IDEM_REQUIRE_SERVICES=1 cargo test --all-features --test faults -- --nocapture
//! ```
#![cfg(any(feature = "redis", feature = "postgres"))]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_testkit::{Hooks, Intercept};
use idempotency::store::RecordState;
use idempotency::Operation;
use idempotency::{idempotent, Error, StorageKey, Store};

/// Concurrent calling tasks.
const TASKS: usize = 32;
/// Keys live at any moment: a call picks one of `WINDOW` consecutive keys, and the window moves
/// on by one key every `WINDOW_STEP`, so faults hit first runs (claims and completions), not
/// only replays.
const WINDOW: u64 = 100;
const WINDOW_STEP: Duration = Duration::from_millis(10);
/// At most this many calls per task, whatever the clock says.
const MAX_CALLS_PER_TASK: u64 = 4_000;
/// The lease of [`debit`] (keep in step with its attribute): long next to its body (at most
/// 10 ms), short enough that claims left in flight by a fault are taken over within the test.
const LEASE: Duration = Duration::from_secs(2);
/// How long the store may take to serve a call again after a fault (or after the server is
/// back), and how long the settle phase may take beyond the lease.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Probe keys start here, far above the workers' window.
const PROBE_BASE: u64 = 1 << 40;

/// The tests of this file run one at a time, so that each one's figures (and the process-wide
/// `idempotency::counters()`) are its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every run of a body and every value a call got back, per key; kept outside the store.
#[derive(Default)]
struct Ledger {
    keys: Mutex<HashMap<u64, KeyLog>>,
}

#[derive(Default)]
struct KeyLog {
    /// Bodies that started for this key.
    runs: u32,
    /// The values the body produced.
    produced: Vec<String>,
    /// The distinct values calls received (`Ok`) for this key.
    received: BTreeSet<String>,
}

impl Ledger {
    fn ran(&self, key: u64, value: &str) {
        let mut keys = self.keys.lock().unwrap();
        let log = keys.entry(key).or_default();
        log.runs += 1;
        log.produced.push(value.to_owned());
    }

    fn received(&self, key: u64, value: &str) {
        let mut keys = self.keys.lock().unwrap();
        keys.entry(key)
            .or_default()
            .received
            .insert(value.to_owned());
    }
}

/// The side effect under test: one run per key, ever. The value names the run.
#[idempotent(name = "faults.debit", key = key, scope = &*scope, store = store.clone(), skip(store, ledger, scope), lease = "2s")]
async fn debit(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    scope: Arc<str>,
    key: u64,
) -> Result<String, Error> {
    let value = format!("{key}:{:016x}", rand::random::<u64>());
    ledger.ran(key, &value);
    // Hold the claim a moment: faults land while bodies run, and callers find keys in flight.
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 10 + 1)).await;
    Ok(value)
}

/// Counts of call outcomes by kind, and the unexpected ones in full.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    ok: AtomicU64,
    store_errors: AtomicU64,
    in_flight: AtomicU64,
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, backend: &str, key: u64, out: &Result<String, Error>, ledger: &Ledger) {
        self.calls.fetch_add(1, SeqCst);
        match out {
            Ok(value) => {
                self.ok.fetch_add(1, SeqCst);
                ledger.received(key, value);
            }
            Err(Error::Store { backend: b, .. }) if *b == backend => {
                self.store_errors.fetch_add(1, SeqCst);
            }
            Err(Error::InFlight { .. }) => {
                self.in_flight.fetch_add(1, SeqCst);
            }
            Err(e) => self
                .unexpected
                .lock()
                .unwrap()
                .push(format!("key {key}: {e:?}")),
        }
    }
}

/// One run of the workload against one store.
struct Run {
    backend: &'static str,
    store: Arc<dyn Store>,
    scope: Arc<str>,
    ledger: Arc<Ledger>,
    tally: Arc<Tally>,
    started: Instant,
    stop: Arc<AtomicBool>,
    probes: AtomicU64,
    faults: Mutex<Vec<String>>,
    recoveries: Mutex<Vec<Duration>>,
    metrics_before: idempotency::Counters,
}

impl Run {
    fn new(backend: &'static str, store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Run {
            backend,
            store,
            scope: format!("faults-{:016x}", rand::random::<u64>()).into(),
            ledger: Arc::default(),
            tally: Arc::default(),
            started: Instant::now(),
            stop: Arc::default(),
            probes: AtomicU64::new(0),
            faults: Mutex::default(),
            recoveries: Mutex::default(),
            metrics_before: idempotency::counters(),
        })
    }

    async fn call(&self, key: u64) -> Result<String, Error> {
        let out = debit(
            self.store.clone(),
            self.ledger.clone(),
            self.scope.clone(),
            key,
        )
        .await;
        self.tally.record(self.backend, key, &out, &self.ledger);
        out
    }

    /// The calling tasks, until [`stop`](Self::stop) or their call budget runs out.
    fn spawn_workers(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..TASKS)
            .map(|_| {
                let run = self.clone();
                tokio::spawn(async move {
                    for _ in 0..MAX_CALLS_PER_TASK {
                        if run.stop.load(SeqCst) {
                            break;
                        }
                        let base =
                            (run.started.elapsed().as_nanos() / WINDOW_STEP.as_nanos()) as u64;
                        let key = base + rand::random::<u64>() % WINDOW;
                        let pause = match run.call(key).await {
                            Ok(_) => rand::random::<u64>() % 3 + 1,
                            // While the store is down calls fail at once: do not spin.
                            Err(_) => 5,
                        };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                })
            })
            .collect()
    }

    fn fault(&self, what: String) {
        println!(
            "[{}] {:>6.2}s fault: {what}",
            self.backend,
            self.started.elapsed().as_secs_f64()
        );
        self.faults.lock().unwrap().push(what);
    }

    /// Calls fresh keys until one succeeds, on the same store; returns how long that took.
    async fn recovered(&self, since: Instant) -> Duration {
        loop {
            let key = PROBE_BASE + self.probes.fetch_add(1, SeqCst);
            match self.call(key).await {
                Ok(_) => break,
                Err(Error::Store { .. }) if since.elapsed() < RECOVERY_LIMIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!(
                    "[{}] the store did not recover within {RECOVERY_LIMIT:?} of a fault: {e:?}",
                    self.backend
                ),
            }
        }
        let took = since.elapsed();
        println!(
            "[{}] {:>6.2}s recovered: a fresh key succeeded {} ms after the fault",
            self.backend,
            self.started.elapsed().as_secs_f64(),
            took.as_millis()
        );
        self.recoveries.lock().unwrap().push(took);
        took
    }

    /// Stops the workers and joins them: a panic in any fails the test.
    async fn stop(&self, workers: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, SeqCst);
        for w in workers {
            if let Err(e) = w.await {
                panic!("[{}] a calling task failed: {e}", self.backend);
            }
        }
    }

    /// What the store holds for each key the workload touched, before the settle phase.
    async fn states(&self) -> BTreeMap<&'static str, u64> {
        let keys: Vec<u64> = self.ledger.keys.lock().unwrap().keys().copied().collect();
        let mut states = BTreeMap::new();
        for key in keys {
            let storage =
                StorageKey::derive_for(&Operation::named("faults.debit"), &*self.scope, &key)
                    .unwrap();
            let ran = self.ledger.keys.lock().unwrap()[&key].runs > 0;
            let state = match self.store.get(&storage).await {
                Ok(None) if ran => "absent after its body ran (result unstored, lease expired)",
                Ok(None) => "absent, body never ran (claim lost with its reply, lease expired)",
                Ok(Some(r)) => match (r.state, ran) {
                    (RecordState::Completed { .. }, _) => "completed",
                    (RecordState::InFlight { .. }, false) => {
                        "in flight, body never ran (claim lost with its reply)"
                    }
                    (RecordState::InFlight { .. }, true) => {
                        "in flight after its body ran (result unstored)"
                    }
                },
                Err(e) => panic!("[{}] get after the run: {e:?}", self.backend),
            };
            *states.entry(state).or_default() += 1;
        }
        states
    }

    /// Calls every key the workload touched until it gets `Ok`, waiting out leases of claims
    /// left in flight. Returns how many keys had to wait for a lease.
    async fn settle(&self) -> u64 {
        let keys: Vec<u64> = self.ledger.keys.lock().unwrap().keys().copied().collect();
        let deadline = Instant::now() + LEASE + RECOVERY_LIMIT;
        let waited = AtomicU64::new(0);
        let settle_key = |key: u64| {
            let waited = &waited;
            async move {
                let mut counted = false;
                loop {
                    match self.call(key).await {
                        Ok(_) => return,
                        Err(Error::InFlight { .. } | Error::Store { .. })
                            if Instant::now() < deadline =>
                        {
                            if !counted {
                                counted = true;
                                waited.fetch_add(1, SeqCst);
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("[{}] key {key} did not settle: {e:?}", self.backend),
                    }
                }
            }
        };
        futures::future::join_all(keys.into_iter().map(settle_key)).await;
        waited.into_inner()
    }

    /// Prints the figures and checks every promise.
    fn verify(&self, before_settle: &BTreeMap<&'static str, u64>, waited: u64) {
        let keys = self.ledger.keys.lock().unwrap();
        let runs: u64 = keys.values().map(|k| u64::from(k.runs)).sum();
        let mut duplicates = Vec::new();
        for (key, log) in keys.iter() {
            if log.runs != 1 || log.received.len() != 1 {
                duplicates.push(format!(
                    "key {key}: {} runs {:?}, calls received {:?}",
                    log.runs, log.produced, log.received
                ));
            }
        }
        duplicates.sort();
        let faults = self.faults.lock().unwrap();
        let recoveries = self.recoveries.lock().unwrap();
        let unexpected = self.tally.unexpected.lock().unwrap();
        let mut report = String::new();
        let _ = writeln!(report, "==== faults: {} ====", self.backend);
        let _ = writeln!(
            report,
            "duration            {:.1} s",
            self.started.elapsed().as_secs_f64()
        );
        let _ = writeln!(
            report,
            "faults injected     {} ({})",
            faults.len(),
            faults.join("; ")
        );
        let _ = writeln!(
            report,
            "calls made          {}",
            self.tally.calls.load(SeqCst)
        );
        let _ = writeln!(report, "  Ok                {}", self.tally.ok.load(SeqCst));
        let _ = writeln!(
            report,
            "  Error::Store      {}",
            self.tally.store_errors.load(SeqCst)
        );
        let _ = writeln!(
            report,
            "  Error::InFlight   {}",
            self.tally.in_flight.load(SeqCst)
        );
        let _ = writeln!(report, "  other             {}", unexpected.len());
        let _ = writeln!(report, "keys used           {}", keys.len());
        let _ = writeln!(report, "bodies run          {runs}");
        let _ = writeln!(report, "states before settle {before_settle:?}");
        let _ = writeln!(
            report,
            "keys that waited out a lease in the settle phase {waited}"
        );
        let _ = writeln!(
            report,
            "recovery after each fault (ms) {:?}",
            recoveries.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
        let _ = writeln!(report, "duplicates found    {}", duplicates.len());
        let (m, b) = (idempotency::counters(), &self.metrics_before);
        let _ = writeln!(
            report,
            "idempotency::counters() over the run: misses={} hits={} conflicts={} takeovers={} store_errors={} leases_lost={} releases={}",
            m.misses - b.misses,
            m.hits - b.hits,
            m.conflicts - b.conflicts,
            m.takeovers - b.takeovers,
            m.store_errors - b.store_errors,
            m.leases_lost - b.leases_lost,
            m.releases - b.releases
        );
        // Store errors no caller saw: failed attempts to store a result (retried by idem).
        let _ = writeln!(
            report,
            "store errors no caller saw (failed `complete` attempts) {}",
            (m.store_errors - b.store_errors).saturating_sub(self.tally.store_errors.load(SeqCst))
        );
        println!("{report}");
        assert!(
            unexpected.is_empty(),
            "[{}] calls may return only Ok, Error::Store ({}) or Error::InFlight; got {} others: {:?}",
            self.backend,
            self.backend,
            unexpected.len(),
            &unexpected[..unexpected.len().min(20)]
        );
        assert!(
            duplicates.is_empty(),
            "[{}] {} keys did not run exactly once (or calls got different values): {:#?}",
            self.backend,
            duplicates.len(),
            &duplicates[..duplicates.len().min(20)]
        );
        assert!(self.tally.ok.load(SeqCst) > 0);
    }
}

// ---- a store whose `complete` fails: deterministic, no server needed -------------------------

/// How one `complete` of [`Flaky`] fails.
#[derive(Clone, Copy)]
enum Fail {
    /// Fails without reaching the store (refused, cut off before sending).
    Before,
    /// Reaches the store and is applied, but its reply is lost.
    After,
}

/// A memory store whose next `complete`s fail as scripted, then work.
type Flaky = Intercept<idempotency::MemoryStore, Script>;

/// The hooks of [`Flaky`]: the script, and how many `complete`s were tried.
struct Script {
    fails: Mutex<std::collections::VecDeque<Fail>>,
    completes: AtomicU64,
}

fn flaky(script: impl IntoIterator<Item = Fail>) -> Flaky {
    let script = Script {
        fails: Mutex::new(script.into_iter().collect()),
        completes: AtomicU64::new(0),
    };
    Intercept::with_hooks(idempotency::MemoryStore::new(), script)
}

#[async_trait::async_trait]
impl Hooks for Script {
    fn backend(&self, _: &dyn Store) -> &'static str {
        "flaky"
    }
    async fn complete(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: idempotency::store::FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.completes.fetch_add(1, SeqCst);
        let fail = self.fails.lock().unwrap().pop_front();
        match fail {
            None => inner.complete(key, token, record, ttl).await,
            Some(Fail::Before) => Err(Error::store("flaky", "connection refused")),
            Some(Fail::After) => {
                inner.complete(key, token, record, ttl).await?;
                Err(Error::store("flaky", "connection reset before the reply"))
            }
        }
    }
    async fn wait_for_change(&self, _: &dyn Store, _: &StorageKey, max: Duration) {
        // As a store that is told of no changes: waiters poll.
        tokio::time::sleep(max).await
    }
}

/// Calls `store` twice under one key with a body that counts its runs; returns both results,
/// the runs, and what the store holds after the first call.
async fn twice(store: &Arc<Flaky>, lease: Duration) -> (String, String, u32, Option<RecordState>) {
    let key = StorageKey::derive("faults-flaky", &rand::random::<u64>()).unwrap();
    let runs = AtomicU64::new(0);
    let call = || {
        idempotency::Call::new(key.clone())
            .store(store.clone())
            .lease(lease)
            .run(idempotency::ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Ok::<_, Error>(format!("{:016x}", rand::random::<u64>()))
            })
    };
    let first = call().await.expect("the body's result");
    let state = store.get(&key).await.unwrap().map(|r| r.state);
    let second = match call().await {
        Ok(v) => v,
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("")
            .to_owned(),
    };
    (first, second, runs.load(SeqCst) as u32, state)
}

/// A `complete` whose reply was lost had stored the result: the retry finds it completed under
/// the call's own token, and the next call replays it.
#[tokio::test]
async fn a_complete_whose_reply_was_lost_is_not_run_again() {
    let store = Arc::new(flaky([Fail::After]));
    let (first, second, runs, state) = twice(&store, Duration::from_secs(30)).await;
    assert!(
        matches!(state, Some(RecordState::Completed { .. })),
        "{state:?}"
    );
    assert_eq!((runs, second), (1, first));
}

/// A `complete` that failed before reaching the store is retried while the lease lasts.
#[tokio::test]
async fn a_complete_that_failed_is_retried_while_the_lease_lasts() {
    let store = Arc::new(flaky([
        Fail::Before,
        Fail::Before,
        Fail::After,
        Fail::Before,
    ]));
    let (first, second, runs, state) = twice(&store, Duration::from_secs(30)).await;
    assert!(
        matches!(state, Some(RecordState::Completed { .. })),
        "{state:?}"
    );
    assert_eq!((runs, second), (1, first));
    assert_eq!(store.hooks().completes.load(SeqCst), 5);
}

/// A store down for longer than the lease: the caller gets the body's result unstored (the
/// body ran) once the lease is nearly over, and the claim stays in flight until it expires.
#[tokio::test]
async fn a_store_down_past_the_lease_returns_the_result_unstored() {
    let store = Arc::new(flaky([Fail::Before; 1_000]));
    let lease = Duration::from_secs(1);
    let at = Instant::now();
    let (_, second, runs, state) = twice(&store, lease).await;
    assert!(
        at.elapsed() < lease,
        "retries stop before the lease runs out"
    );
    assert!(
        matches!(state, Some(RecordState::InFlight { .. })),
        "{state:?}"
    );
    assert_eq!((runs, second.as_str()), (1, "InFlight"));
}

// ---- Redis ----------------------------------------------------------------------------------

#[cfg(feature = "redis")]
mod redis_faults {
    use super::*;
    use idempotency::redis::redis;
    use idempotency::RedisStore;

    use idem_support::PrivateRedis;

    /// Kills every client connection but the admin's own: the store's.
    async fn kill_clients(server: &PrivateRedis) -> i64 {
        let mut admin = server
            .admin()
            .await
            .expect("the private redis-server answers");
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query_async(&mut admin)
            .await
            .expect("CLIENT KILL")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_connections_killed_and_server_restarted_mid_run() {
        let _serial = SERIAL.lock().await;
        let Some(mut server) = PrivateRedis::started().await else {
            return;
        };
        let redis = RedisStore::connect(&server.url())
            .await
            .expect("connect to the private redis-server");
        let run = Run::new("redis", Arc::new(redis));
        let workers = run.spawn_workers();
        let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));

        pause(1_000).await;
        for round in 0..2 {
            let at = Instant::now();
            let killed = kill_clients(&server).await;
            assert!(
                killed >= 1,
                "round {round}: the store's connection was found"
            );
            run.fault(format!("CLIENT KILL ({killed} connection)"));
            run.recovered(at).await;
            pause(700).await;
        }

        // A crash: acknowledged writes are in the fsynced append-only file.
        run.fault("redis-server SIGKILL, down 500 ms, restarted".into());
        let at = Instant::now();
        server.stop(false);
        pause(500).await;
        server.spawn().expect("restart redis-server");
        assert!(server.admin().await.is_some(), "redis-server came back");
        run.recovered(at).await;
        pause(1_000).await;

        let at = Instant::now();
        let killed = kill_clients(&server).await;
        run.fault(format!("CLIENT KILL ({killed} connection)"));
        run.recovered(at).await;
        pause(700).await;

        // A clean shutdown and restart.
        run.fault("redis-server SIGTERM, down 300 ms, restarted".into());
        let at = Instant::now();
        server.stop(true);
        pause(300).await;
        server.spawn().expect("restart redis-server");
        assert!(server.admin().await.is_some(), "redis-server came back");
        run.recovered(at).await;
        pause(1_500).await;

        run.stop(workers).await;
        let states = run.states().await;
        let waited = run.settle().await;
        run.verify(&states, waited);
    }
}

// ---- PostgreSQL -----------------------------------------------------------------------------

#[cfg(feature = "postgres")]
mod postgres_faults {
    use super::*;
    use idem_support::postgres::{admin, create_own, url, Own};
    use idempotency::PostgresStore;

    /// Drops the schema of this run when dropped (best effort, on a fresh thread and runtime,
    /// since the test's runtime may be gone).
    struct Schema(String);

    impl Drop for Schema {
        fn drop(&mut self) {
            let name = self.0.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let client = admin().await.ok()?;
                    client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .await
                        .ok()
                })
            })
            .join();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_backends_terminated_mid_run() {
        let _serial = SERIAL.lock().await;
        let admin = match admin().await {
            Ok(c) => c,
            Err(e) => {
                idem_support::unavailable("PostgreSQL", format!("{e} ({})", url()));
                return;
            }
        };
        // A schema of this run's own, after dropping those of runs that died before dropping
        // theirs, older than ten minutes.
        let schema = Schema(
            create_own(&admin, Own::Schema, "idem_faults")
                .await
                .expect("create the run's schema"),
        );

        // The store's own application_name: only its backends are terminated.
        let app = format!("idem_faults_{:016x}", rand::random::<u64>());
        let sep = if url().contains('?') { '&' } else { '?' };
        let store = PostgresStore::connect_with_table(
            &format!("{}{sep}application_name={app}", url()),
            &format!("{}.records", schema.0),
        )
        .await
        .expect("connect to PostgreSQL");
        let run = Run::new("postgres", Arc::new(store));
        let workers = run.spawn_workers();
        let terminate = || async {
            admin
                .query_one(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND application_name = $1) k",
                    &[&app],
                )
                .await
                .expect("pg_terminate_backend")
                .get::<_, i64>(0)
        };

        tokio::time::sleep(Duration::from_millis(1_000)).await;
        for round in 0..6 {
            let at = Instant::now();
            let killed = terminate().await;
            assert!(
                killed >= 1,
                "round {round}: the store's backends were found"
            );
            // Twice in quick succession on odd rounds: connections opened meanwhile go too.
            let again = if round % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                terminate().await
            } else {
                0
            };
            run.fault(format!(
                "pg_terminate_backend ({killed}{} backends)",
                if again > 0 {
                    format!(" + {again}")
                } else {
                    String::new()
                }
            ));
            run.recovered(at).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;

        run.stop(workers).await;
        let states = run.states().await;
        let waited = run.settle().await;
        run.verify(&states, waited);
    }
}
