//! The store conformance suite: every point of design section 3, generic over `Store`.
//!
//! A backend's test file does
//!
//! ```ignore
//! mod conformance;
//! conformance::suite!(fresh_store, native_expiry = false);
//! ```
//!
//! where `async fn fresh_store() -> Option<Arc<dyn Store>>` gives a store isolated from every
//! other test's records (its own file, table, or key prefix), or `None` after
//! [`unavailable`] when the backend's server cannot be reached.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::record::{Outcome, Record};
use idempotency::{
    Call, Claim, Error, ErrorPolicy, Fingerprint, OnConflict, OnUnknown, RecordState, StorageKey,
    Store,
};

mod lease_end;
pub use lease_end::*;

/// Instantiates every conformance case as a `#[tokio::test]` for one backend.
#[macro_export]
macro_rules! suite {
    ($fresh:path, native_expiry = $native:expr) => {
        $crate::suite!(@cases $fresh, $native;
            exactly_once_under_200_concurrent_callers, replay_is_identical, key_reuse_is_refused,
            ttl_expiry_runs_again, expired_lease_is_taken_over, stale_tokens_are_fenced,
            tokens_strictly_increase, release_on_error, unknown_on_panic, unknown_on_cancel,
            long_body_renews_its_lease, corrupt_records_are_errors_not_reruns,
            wrong_type_is_type_mismatch, purge_removes_only_expired, get_reports_states,
            missing_fingerprint_matches_any, wait_gets_the_first_result,
            complete_after_lease_end_lands, takeover_fences_the_old_token,
            renew_after_lease_end_holds_again, get_reports_an_expired_claim_in_flight,
            purge_keeps_a_claim_whose_lease_just_ended,
            expired_claim_with_another_fingerprint_is_taken_over);
    };
    (@cases $fresh:path, $native:expr; $($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            if let Some(store) = $fresh().await {
                $crate::conformance::$case(store, $native).await;
            }
        }
    )*};
}
pub use suite;

/// Reports an unreachable service: a failure under `IDEM_REQUIRE_SERVICES=1` (CI), else a
/// printed skip, so a newcomer without Redis or PostgreSQL still gets a green `cargo test`.
pub fn unavailable(what: &str, why: impl std::fmt::Display) -> Option<Arc<dyn Store>> {
    if std::env::var("IDEM_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{what} is required (IDEM_REQUIRE_SERVICES=1) but unreachable: {why}");
    }
    eprintln!(
        "SKIPPED: {what} unreachable ({why}); set IDEM_REQUIRE_SERVICES=1 to make this a failure"
    );
    None
}

/// Appends `line` to the file at `path` with a single `write` on an `O_APPEND` file, so lines
/// that concurrent processes append (ledgers of body starts) never interleave.
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open the ledger");
    let written = file.write(line.as_bytes()).expect("append to the ledger");
    assert_eq!(written, line.len(), "one write per ledger line");
}

/// `IDEM_REDIS_URL`, or the loopback default.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// PostgreSQL for the tests: each test process works in its own schema
/// `idem_test_<server epoch>_<pid>`, with a table per test, and drops the schemas of runs older
/// than ten minutes.
#[cfg(feature = "postgres")]
pub mod postgres {
    use idempotency::postgres::tokio_postgres::{self, NoTls};
    use tokio::sync::OnceCell;

    /// `IDEM_POSTGRES_URL`, or the loopback default.
    pub fn url() -> String {
        std::env::var("IDEM_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// A plain client to the test database.
    pub async fn admin() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&url(), NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// This run's schema, or why the server is unreachable.
    static RUN_SCHEMA: OnceCell<Result<String, String>> = OnceCell::const_new();

    /// Creates this run's schema after dropping those of runs older than ten minutes (by the
    /// server's clock, which also named them). Errors other than an unreachable server panic.
    async fn prepare_run() -> Result<String, String> {
        let client = admin().await.map_err(|e| format!("{e} ({})", url()))?;
        let stale = client
            .query(
                "SELECT nspname FROM pg_namespace WHERE nspname ~ '^idem_test_[0-9]+_[0-9]+$'
                 AND split_part(nspname, '_', 3)::bigint < extract(epoch FROM now())::bigint - 600",
                &[],
            )
            .await
            .expect("list stale test schemas");
        for row in stale {
            let name: &str = row.get(0);
            // A concurrent run may be dropping it too.
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .await;
        }
        let epoch: i64 = client
            .query_one("SELECT extract(epoch FROM now())::bigint", &[])
            .await
            .expect("read the server clock")
            .get(0);
        let schema = format!("idem_test_{epoch}_{}", std::process::id());
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await
            .expect("create the run's schema");
        Ok(schema)
    }

    /// This run's schema, or `None` after [`super::unavailable`].
    pub async fn run_schema() -> Option<&'static str> {
        match RUN_SCHEMA.get_or_init(prepare_run).await {
            Ok(schema) => Some(schema),
            Err(e) => {
                super::unavailable("PostgreSQL", e);
                None
            }
        }
    }

    /// A new table name (`schema.prefix_<random>`) in this run's schema.
    pub async fn fresh_table(prefix: &str) -> Option<String> {
        let schema = run_schema().await?;
        Some(format!("{schema}.{prefix}_{:016x}", rand::random::<u64>()))
    }
}

/// Deletes every Redis key under `prefix` (a test's records and fences), synchronously, so it
/// can run from `Drop`. Best effort.
#[cfg(feature = "redis")]
pub fn delete_redis_prefix(prefix: &str) {
    use idempotency::redis::redis;
    let Ok(mut con) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut con)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut con);
    }
}

/// A `redis-server` of a test's own, for faults that must not touch the shared server.
#[cfg(all(feature = "redis", unix))]
pub mod private_redis {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use idempotency::redis::redis;

    /// A `redis-server` on a free loopback port, with an append-only file fsynced on every
    /// write, so acknowledged records survive a crash. Killed on drop.
    pub struct PrivateRedis {
        port: u16,
        dir: tempfile::TempDir,
        child: Option<Child>,
    }

    impl PrivateRedis {
        /// Starts one.
        pub fn start() -> std::io::Result<Self> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut server = PrivateRedis {
                port,
                dir: tempfile::tempdir()?,
                child: None,
            };
            server.spawn()?;
            Ok(server)
        }

        /// (Re)starts the process on the same port and directory.
        pub fn spawn(&mut self) -> std::io::Result<()> {
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .args(["--maxmemory-policy", "noeviction"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            self.child = Some(child);
            Ok(())
        }

        /// SIGKILL (`graceful == false`: a crash) or SIGTERM (Redis shuts down cleanly,
        /// flushing its append-only file; SIGKILL after 5 s), then reaps the process.
        pub fn stop(&mut self, graceful: bool) {
            let Some(mut child) = self.child.take() else {
                return;
            };
            if graceful {
                // SAFETY: a plain kill(2) of our own child, which has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }

        /// Its URL.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// A plain admin connection, once the server answers `PING` (within 5 s; loading the
        /// append-only file answers `LOADING` until done).
        pub async fn admin(&self) -> Option<redis::aio::MultiplexedConnection> {
            let client = redis::Client::open(self.url()).ok()?;
            for _ in 0..100 {
                if let Ok(Ok(mut con)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.get_multiplexed_async_connection(),
                )
                .await
                {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut con)
                        .await
                        .is_ok()
                    {
                        return Some(con);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            self.stop(false);
        }
    }
}

/// A key no other test or run uses.
pub fn unique(label: &str) -> StorageKey {
    StorageKey::derive("conformance", &format!("{label}:{}", rand::random::<u64>())).unwrap()
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

const LONG: Duration = Duration::from_secs(60);

/// A call on `store` under `key` with fingerprint `fp(1)`.
fn call(store: &Arc<dyn Store>, key: &StorageKey) -> Call {
    Call::new(key.clone())
        .store(store)
        .fingerprint(Some(fp(1)))
        .lease(Duration::from_secs(10))
}

fn record(token: u64, payload: &str, type_name: &str) -> Vec<u8> {
    Record {
        outcome: Outcome::Ok,
        fingerprint: Some(fp(1)),
        token,
        completed_at_ms: 0,
        ttl_ms: 60_000,
        type_name,
        operation: "",
        schema: 0,
        payload: payload.as_bytes(),
    }
    .encode()
}

async fn acquire(store: &dyn Store, key: &StorageKey, lease: Duration) -> u64 {
    match store.claim(key, Some(&fp(1)), lease).await.unwrap() {
        Claim::Acquired { token, .. } => token.0,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

pub async fn exactly_once_under_200_concurrent_callers(store: Arc<dyn Store>, _: bool) {
    let runs: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let keys: Vec<StorageKey> = (0..10).map(|i| unique(&format!("once{i}"))).collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (store, runs, key) = (store.clone(), runs.clone(), keys[i % 10].clone());
            tokio::spawn(async move {
                let out: Result<u64, Error> = call(&store, &key)
                    .on_conflict(OnConflict::Wait(Duration::from_secs(30)))
                    .run(ErrorPolicy::never(), async {
                        *runs.lock().unwrap().entry(i % 10).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        Ok(rand::random())
                    })
                    .await;
                (i % 10, out.unwrap())
            })
        })
        .collect();
    let mut values = HashMap::new();
    for t in tasks {
        let (k, v) = t.await.unwrap();
        assert_eq!(
            *values.entry(k).or_insert(v),
            v,
            "all callers of key {k} get one value"
        );
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 10);
    assert!(
        runs.values().all(|&n| n == 1),
        "each body ran exactly once: {runs:?}"
    );
}

pub async fn replay_is_identical(store: Arc<dyn Store>, _: bool) {
    let key = unique("replay");
    let first: Result<(u64, String, Vec<f64>), Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async {
            Ok((rand::random(), "ü\"\\\n".to_string(), vec![0.1, 1e300]))
        })
        .await;
    let first = first.unwrap();
    for _ in 0..3 {
        let again: Result<(u64, String, Vec<f64>), Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                unreachable!("replayed, not run")
            })
            .await;
        assert_eq!(again.unwrap(), first);
    }
}

pub async fn key_reuse_is_refused(store: Arc<dyn Store>, _: bool) {
    let key = unique("reuse");
    let _: u32 = call(&store, &key)
        .run(ErrorPolicy::never(), async { Ok::<u32, Error>(1) })
        .await
        .unwrap();
    let other: Result<u32, Error> = call(&store, &key)
        .fingerprint(Some(fp(2)))
        .run(ErrorPolicy::never(), async {
            unreachable!("key reuse must not run")
        })
        .await;
    assert!(matches!(other, Err(Error::KeyReuse)), "{other:?}");
    // In flight with another fingerprint is reuse too.
    let key = unique("reuse-in-flight");
    acquire(&*store, &key, LONG).await;
    assert_eq!(
        store.claim(&key, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse
    );
}

pub async fn ttl_expiry_runs_again(store: Arc<dyn Store>, _: bool) {
    let key = unique("ttl");
    let runs = AtomicUsize::new(0);
    let go = || {
        call(&store, &key)
            .ttl(Duration::from_millis(300))
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Ok::<u32, Error>(1)
            })
    };
    go().await.unwrap();
    go().await.unwrap();
    assert_eq!(
        runs.load(SeqCst),
        1,
        "within the ttl the result is replayed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    go().await.unwrap();
    assert_eq!(runs.load(SeqCst), 2, "past the ttl the body runs again");
}

pub async fn expired_lease_is_taken_over(store: Arc<dyn Store>, _: bool) {
    let key = unique("takeover");
    let first = acquire(&*store, &key, Duration::from_millis(300)).await;
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired { token, .. } => assert!(token.0 > first, "takeover gets a newer token"),
        other => panic!("expected a takeover, got {other:?}"),
    }
}

pub async fn stale_tokens_are_fenced(store: Arc<dyn Store>, _: bool) {
    let key = unique("fence");
    let stale = idempotency::FencingToken(acquire(&*store, &key, Duration::from_millis(300)).await);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fresh = idempotency::FencingToken(acquire(&*store, &key, LONG).await);
    assert!(matches!(
        store.renew(&key, stale, LONG).await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        store
            .complete(&key, stale, &record(stale.0, "1", "u32"), LONG)
            .await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        store.release(&key, stale).await,
        Err(Error::LeaseLost)
    ));
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: fresh }
    );
    store
        .complete(&key, fresh, &record(fresh.0, "2", "u32"), LONG)
        .await
        .unwrap();
    assert!(matches!(
        store
            .complete(&key, stale, &record(stale.0, "1", "u32"), LONG)
            .await,
        Err(Error::LeaseLost)
    ));
    let got = store.get(&key).await.unwrap().unwrap();
    let RecordState::Completed {
        token,
        record: bytes,
    } = got.state
    else {
        panic!("{got:?}")
    };
    assert_eq!(token, fresh);
    assert_eq!(
        Record::decode(&bytes).unwrap().payload,
        b"2",
        "the newer result stands"
    );
    // Completed records cannot be renewed or released either.
    assert!(matches!(
        store.renew(&key, fresh, LONG).await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        store.release(&key, fresh).await,
        Err(Error::LeaseLost)
    ));
}

pub async fn tokens_strictly_increase(store: Arc<dyn Store>, _: bool) {
    let key = unique("tokens");
    let mut last = 0;
    for _ in 0..5 {
        let t = acquire(&*store, &key, LONG).await;
        assert!(t > last, "{t} after {last}");
        store
            .release(&key, idempotency::FencingToken(t))
            .await
            .unwrap();
        last = t;
    }
    let other = acquire(&*store, &unique("tokens-other"), LONG).await;
    assert!(
        other > last,
        "tokens increase across keys too: {other} after {last}"
    );
}

pub async fn release_on_error(store: Arc<dyn Store>, _: bool) {
    let key = unique("err");
    let runs = AtomicUsize::new(0);
    for _ in 0..2 {
        let out: Result<u32, Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Err(Error::InvalidKey {
                    reason: "the body's own error".into(),
                })
            })
            .await;
        assert!(matches!(out, Err(Error::InvalidKey { .. })));
    }
    assert_eq!(
        runs.load(SeqCst),
        2,
        "an Err releases the claim, the retry runs at once"
    );
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// Claims `key` again within `within`, proving the previous claim was released rather than
/// left to its 60 s lease.
async fn reclaimable_soon(store: &dyn Store, key: &StorageKey, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match store.claim(key, Some(&fp(1)), LONG).await.unwrap() {
            Claim::Acquired { .. } => return,
            Claim::InFlight if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("claim was not released: {other:?}"),
        }
    }
}

/// A started body that panics or is dropped has an unknown outcome: by default (at most once)
/// the key then refuses calls with `OutcomeUnknown`; under `OnUnknown::Rerun` (at least once)
/// the claim is released at once.
async fn unknown_outcome_is_recorded_or_released(
    store: Arc<dyn Store>,
    label: &str,
    end: impl Fn(Arc<dyn Store>, StorageKey, OnUnknown) -> tokio::task::JoinHandle<()>,
) {
    let key = unique(label);
    end(store.clone(), key.clone(), OnUnknown::Refuse)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let runs = AtomicUsize::new(0);
    loop {
        let out: Result<u32, Error> = call(&store, &key)
            .lease(LONG)
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Ok(1)
            })
            .await;
        match out {
            Err(Error::OutcomeUnknown { .. }) => break,
            // The unknown outcome is recorded in the background, right after the panic or drop.
            Err(Error::InFlight) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("expected OutcomeUnknown for a started body, got {other:?}"),
        }
    }
    assert_eq!(runs.load(SeqCst), 0, "the body is not run again");

    let key = unique(label);
    end(store.clone(), key.clone(), OnUnknown::Rerun)
        .await
        .unwrap();
    reclaimable_soon(&*store, &key, Duration::from_secs(5)).await;
}

pub async fn unknown_on_panic(store: Arc<dyn Store>, _: bool) {
    unknown_outcome_is_recorded_or_released(store, "panic", |s, k, policy| {
        tokio::spawn(async move {
            let joined = tokio::spawn(async move {
                let _: Result<u32, Error> = call(&s, &k)
                    .lease(LONG)
                    .on_unknown(policy)
                    .run(ErrorPolicy::never(), async { panic!("body panics") })
                    .await;
            })
            .await;
            assert!(joined.unwrap_err().is_panic());
        })
    })
    .await
}

pub async fn unknown_on_cancel(store: Arc<dyn Store>, _: bool) {
    unknown_outcome_is_recorded_or_released(store, "cancel", |s, k, policy| {
        tokio::spawn(async move {
            let slow =
                call(&s, &k)
                    .lease(LONG)
                    .on_unknown(policy)
                    .run(ErrorPolicy::never(), async {
                        tokio::time::sleep(LONG).await;
                        Ok::<u32, Error>(1)
                    });
            assert!(tokio::time::timeout(Duration::from_millis(100), slow)
                .await
                .is_err());
        })
    })
    .await
}

pub async fn long_body_renews_its_lease(store: Arc<dyn Store>, _: bool) {
    let key = unique("renew");
    let (s, k) = (store.clone(), key.clone());
    let holder = tokio::spawn(async move {
        call(&s, &k)
            .lease(Duration::from_millis(300))
            .run(ErrorPolicy::never(), async {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                Ok::<u32, Error>(9)
            })
            .await
    });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
            Claim::InFlight,
            "the lease was renewed"
        );
    }
    assert_eq!(holder.await.unwrap().unwrap(), 9);
}

pub async fn corrupt_records_are_errors_not_reruns(store: Arc<dyn Store>, _: bool) {
    let valid = record(1, "5", std::any::type_name::<u32>());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xffnot a record".to_vec()),
        ("empty", Vec::new()),
        ("truncated", valid[..valid.len() - 3].to_vec()),
        (
            "bad json",
            record(1, "{not json", std::any::type_name::<u32>()),
        ),
    ];
    for (label, bytes) in cases {
        let key = unique(label);
        let t = acquire(&*store, &key, LONG).await;
        store
            .complete(&key, idempotency::FencingToken(t), &bytes, LONG)
            .await
            .unwrap();
        let out: Result<u32, Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                unreachable!("never re-run silently")
            })
            .await;
        assert!(
            matches!(out, Err(Error::Corrupt { .. })),
            "{label}: {out:?}"
        );
    }
}

pub async fn wrong_type_is_type_mismatch(store: Arc<dyn Store>, _: bool) {
    let key = unique("type");
    let _: String = call(&store, &key)
        .run(ErrorPolicy::never(), async {
            Ok::<_, Error>("text".to_string())
        })
        .await
        .unwrap();
    let out: Result<u64, Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    match out {
        Err(Error::TypeMismatch { expected, found }) => {
            assert!(expected.contains("u64"), "{expected}");
            assert!(found.contains("String"), "{found}");
        }
        other => panic!("{other:?}"),
    }
}

pub async fn purge_removes_only_expired(store: Arc<dyn Store>, native_expiry: bool) {
    let short = Duration::from_millis(300);
    let mut expired = Vec::new();
    let mut live = Vec::new();
    for i in 0..3 {
        let k = unique(&format!("purge-done{i}"));
        let t = acquire(&*store, &k, LONG).await;
        store
            .complete(
                &k,
                idempotency::FencingToken(t),
                &record(t, "1", "u32"),
                short,
            )
            .await
            .unwrap();
        expired.push(k);
    }
    // A claim whose lease just ended is not abandoned: purge keeps it for its holder.
    let k = unique("purge-lease");
    acquire(&*store, &k, short).await;
    live.push(k);
    for i in 0..2 {
        let k = unique(&format!("purge-live{i}"));
        let t = acquire(&*store, &k, LONG).await;
        store
            .complete(
                &k,
                idempotency::FencingToken(t),
                &record(t, "1", "u32"),
                LONG,
            )
            .await
            .unwrap();
        live.push(k);
    }
    let k = unique("purge-live-lease");
    acquire(&*store, &k, LONG).await;
    live.push(k);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let purged = store.purge_expired().await.unwrap();
    if native_expiry {
        // The server expires records itself; nothing is left for purge to do.
        assert_eq!(purged, 0);
    } else {
        assert_eq!(purged, expired.len() as u64);
        assert_eq!(
            store.purge_expired().await.unwrap(),
            0,
            "a second purge finds nothing"
        );
    }
    for k in &expired {
        assert_eq!(store.get(k).await.unwrap(), None);
    }
    for k in &live {
        assert!(
            store.get(k).await.unwrap().is_some(),
            "live records survive purge"
        );
    }
}

pub async fn get_reports_states(store: Arc<dyn Store>, _: bool) {
    let key = unique("get");
    assert_eq!(store.get(&key).await.unwrap(), None);
    let t = idempotency::FencingToken(acquire(&*store, &key, LONG).await);
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(got.fingerprint, Some(fp(1)));
    assert_eq!(got.state, RecordState::InFlight { token: t });
    let bytes = record(t.0, "[1,2]", "x");
    store.complete(&key, t, &bytes, LONG).await.unwrap();
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(
        got.state,
        RecordState::Completed {
            token: t,
            record: bytes.clone().into()
        }
    );
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(bytes.into())
    );
}

pub async fn missing_fingerprint_matches_any(store: Arc<dyn Store>, _: bool) {
    let key = unique("nofp");
    let t = match store.claim(&key, None, LONG).await.unwrap() {
        Claim::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    assert_eq!(store.get(&key).await.unwrap().unwrap().fingerprint, None);
    assert_eq!(
        store.claim(&key, Some(&fp(9)), LONG).await.unwrap(),
        Claim::InFlight
    );
    store.complete(&key, t, b"r", LONG).await.unwrap();
    assert_eq!(
        store.claim(&key, Some(&fp(3)), LONG).await.unwrap(),
        Claim::Completed(b"r".to_vec().into())
    );
}

pub async fn wait_gets_the_first_result(store: Arc<dyn Store>, _: bool) {
    let key = unique("wait");
    let (s, k) = (store.clone(), key.clone());
    let first = tokio::spawn(async move {
        call(&s, &k)
            .run(ErrorPolicy::never(), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<u64, Error>(rand::random())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rejected: Result<u64, Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    assert!(matches!(rejected, Err(Error::InFlight)));
    let short: Result<u64, Error> = call(&store, &key)
        .on_conflict(OnConflict::Wait(Duration::from_millis(20)))
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    assert!(matches!(short, Err(Error::WaitTimeout(_))), "{short:?}");
    let waited: Result<u64, Error> = call(&store, &key)
        .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    assert_eq!(waited.unwrap(), first.await.unwrap().unwrap());
}
