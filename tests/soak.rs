//! A soak test on loopback: a payments API like `examples/http_server.rs` (rebuilt here, in
//! process, on 127.0.0.1:0) behind `idempotency::http::IdempotencyLayer`, under concurrent clients that
//! time out at random and retry with the same `Idempotency-Key`, while the store is restarted.
//!
//! - Store: a private `redis-server` on a free loopback port with an append-only file fsynced on
//!   every write (so a restart keeps what Redis acknowledged), restarted once by SIGKILL and once
//!   by SIGTERM. Without `redis-server` (or the `redis` feature), an SQLite file behind a
//!   wrapper that "restarts" it: calls fail with `Error::Store` for a moment while the
//!   `SqliteStore` is dropped and opened again on the same file. `IDEM_SOAK_STORE=redis|sqlite`
//!   chooses.
//! - Handler: a payment is made (charged) on its first line, before any `.await`, with a random
//!   id, as a real processor's charge would be: a handler that started is a payment, whether or
//!   not it gets to answer. It then takes 50–300 ms and answers 201. A ledger outside the store
//!   records, per key, the payment id of every handler that *started*, and counts those that
//!   *completed* (reached their end). A client that gives up closes its connection; the layer
//!   runs the handler on a task of its own, so it still runs to its end and its response is
//!   stored, and the retry gets 409 while it runs, then the replay. Counting at the start is
//!   what makes a handler that was interrupted and run again visible as a duplicate.
//! - Clients: `IDEM_SOAK_CLIENTS` tasks (default 32), each with its own sequence of payments and
//!   its own `Authorization` (the layer's scope). Each request is retried with the same key and
//!   body after a random client timeout of 10–400 ms (or a 409/503, after a short pause) until it
//!   gets a 2xx. Traffic runs for `IDEM_SOAK_SECS` (default 20; at most 55, so that the whole
//!   test, 2-4 s longer, stays under a minute) or until `IDEM_SOAK_MAX_PAYMENTS` per client
//!   (default 200); then every key that got a 2xx is asked once more and must replay the same
//!   payment. `IDEM_SOAK_LEASE_MS` (default 3000) is the layer's lease, short so that a claim
//!   left in flight is taken over within the run; `IDEM_SOAK_RESTARTS` (0-2, default 2) how many
//!   restarts.
//!
//! Asserted: every key has exactly one started handler (one payment), and every 2xx of that key
//! (and the final replay) carries that handler's payment id; once the layer is drained
//! (`IdempotencyLayer::drain`), every started handler has completed (none was cut off by its
//! client going away); no 422 and no 5xx but 503 (so no `500 #outcome-unknown` either); the
//! store serves again after each restart, without being recreated. Printed: requests sent,
//! responses by status, timeouts, handler starts and completions (in total and per key), what
//! the final pass found, and `idempotency::counters()`.
//!
//! ```text
//! IDEM_REQUIRE_SERVICES=1 cargo test --all-features --test soak -- --nocapture
//! ```
#![cfg(all(feature = "http", any(feature = "redis", feature = "sqlite")))]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idempotency::http::IdempotencyLayer;
use idempotency::Store;
use serde::{Deserialize, Serialize};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

// ---- the app: examples/http_server.rs, plus a ledger --------------------------------------

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    status: String,
}

/// Handlers per idempotency key (scope and key), kept outside the store.
#[derive(Default, Clone)]
struct Runs {
    /// The payment id of every handler that started: each is a payment.
    started: Vec<String>,
    /// When each of them started.
    started_at: Vec<Instant>,
    /// How many of them reached their end.
    completed: usize,
}

struct AppState {
    payments: Mutex<HashMap<String, Payment>>,
    ledger: Mutex<HashMap<String, Runs>>,
}

fn ledger_key(headers: &HeaderMap) -> String {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    format!(
        "{} {}",
        text(header::AUTHORIZATION),
        text(header::HeaderName::from_static("idempotency-key"))
    )
}

/// Charges a payment (on the first line: the charge is what must not happen twice), then
/// 50–300 ms at the "processor" before answering with it.
async fn create_payment(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<NewPayment>,
) -> impl IntoResponse {
    let key = ledger_key(&headers);
    let payment = Payment {
        id: format!("pay_{:016x}", rand::random::<u64>()),
        amount: req.amount,
        currency: req.currency,
        status: "succeeded".to_owned(),
    };
    {
        let mut ledger = state.ledger.lock().unwrap();
        let runs = ledger.entry(key.clone()).or_default();
        runs.started.push(payment.id.clone());
        runs.started_at.push(Instant::now());
    }
    state
        .payments
        .lock()
        .unwrap()
        .insert(payment.id.clone(), payment.clone());
    // A client that times out closes its connection; this handler runs on regardless.
    let delay = 50 + rand::random::<u64>() % 251;
    tokio::time::sleep(Duration::from_millis(delay)).await;
    state
        .ledger
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .completed += 1;
    let location = format!("/payments/{}", payment.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    )
}

async fn get_payment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, StatusCode> {
    state
        .payments
        .lock()
        .unwrap()
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

/// Serves the app on 127.0.0.1:0 until `stop` fires; also returns its idempotency layer (for
/// `drain`).
async fn serve(
    store: Arc<dyn Store>,
    lease: Duration,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (
    SocketAddr,
    Arc<AppState>,
    IdempotencyLayer,
    tokio::task::JoinHandle<()>,
) {
    let state = Arc::new(AppState {
        payments: Mutex::default(),
        ledger: Mutex::default(),
    });
    let idempotency = IdempotencyLayer::per_client(store, |req| {
        let credentials = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        Some(credentials.to_owned())
    })
    .replay_headers([header::LOCATION])
    .ttl(Duration::from_secs(3600))
    .lease(lease);
    let app = Router::new()
        .route("/payments", post(create_payment))
        .route("/payments/{id}", get(get_payment))
        .with_state(state.clone())
        .layer(idempotency.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop.await;
            })
            .await
            .unwrap()
    });
    (addr, state, idempotency, server)
}

// ---- stores that can be restarted ---------------------------------------------------------

#[cfg(feature = "sqlite")]
mod restartable_sqlite {
    use std::path::PathBuf;
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use async_trait::async_trait;
    use idempotency::store::{Claim, FencingToken, StoredRecord};
    use idempotency::SqliteStore;
    use idempotency::{Error, Fingerprint, StorageKey, Store};

    /// An `SqliteStore` that can be "restarted": dropped, unavailable for a moment (every call
    /// fails with `Error::Store`), and opened again on the same file.
    pub struct Restartable {
        path: PathBuf,
        current: RwLock<Option<Arc<SqliteStore>>>,
    }

    impl Restartable {
        pub async fn open(path: PathBuf) -> idempotency::Result<Arc<Self>> {
            let store = Arc::new(SqliteStore::open(&path).await?);
            Ok(Arc::new(Restartable {
                path,
                current: RwLock::new(Some(store)),
            }))
        }

        fn current(&self) -> idempotency::Result<Arc<SqliteStore>> {
            self.current
                .read()
                .unwrap()
                .clone()
                .ok_or_else(|| Error::store("sqlite", "the store is restarting"))
        }

        /// Drops the store (its connection closes once the calls holding it finish), waits
        /// `down`, and opens the file again.
        pub async fn restart(&self, down: Duration) {
            let old = self.current.write().unwrap().take();
            drop(old);
            tokio::time::sleep(down).await;
            let store = SqliteStore::open(&self.path)
                .await
                .expect("reopen the SQLite store");
            *self.current.write().unwrap() = Some(Arc::new(store));
        }
    }

    #[async_trait]
    impl Store for Restartable {
        fn backend(&self) -> &'static str {
            "sqlite"
        }
        async fn claim(
            &self,
            key: &StorageKey,
            fingerprint: Option<&Fingerprint>,
            lease: Duration,
        ) -> idempotency::Result<Claim> {
            self.current()?.claim(key, fingerprint, lease).await
        }
        async fn complete(
            &self,
            key: &StorageKey,
            token: FencingToken,
            record: &[u8],
            ttl: Duration,
        ) -> idempotency::Result<()> {
            self.current()?.complete(key, token, record, ttl).await
        }
        async fn release(&self, key: &StorageKey, token: FencingToken) -> idempotency::Result<()> {
            self.current()?.release(key, token).await
        }
        async fn renew(
            &self,
            key: &StorageKey,
            token: FencingToken,
            lease: Duration,
        ) -> idempotency::Result<()> {
            self.current()?.renew(key, token, lease).await
        }
        async fn get(&self, key: &StorageKey) -> idempotency::Result<Option<StoredRecord>> {
            self.current()?.get(key).await
        }
        async fn purge_expired(&self) -> idempotency::Result<u64> {
            self.current()?.purge_expired().await
        }
        async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
            match self.current() {
                Ok(store) => store.wait_for_change(key, max).await,
                Err(_) => tokio::time::sleep(max).await,
            }
        }
    }
}

/// The store under test and how to restart it.
enum Backend {
    #[cfg(feature = "redis")]
    Redis(idem_support::PrivateRedis),
    #[cfg(feature = "sqlite")]
    /// The store, and the directory of its file (removed on drop).
    Sqlite(
        Arc<restartable_sqlite::Restartable>,
        #[allow(dead_code)] tempfile::TempDir,
    ),
}

impl Backend {
    /// Redis when `redis-server` can be started (and `IDEM_SOAK_STORE` is not `sqlite`), else
    /// SQLite; `None` (skipped, or a failure under `IDEM_REQUIRE_SERVICES=1`) without either.
    async fn open() -> Option<(Backend, Arc<dyn Store>)> {
        let choice = std::env::var("IDEM_SOAK_STORE").unwrap_or_default();
        // Why Redis is not used, if it was tried.
        #[cfg(feature = "redis")]
        let no_redis = if choice != "sqlite" {
            match Self::open_redis().await {
                Ok(found) => return Some(found),
                Err(why) => Some(why),
            }
        } else {
            None
        };
        #[cfg(not(feature = "redis"))]
        let no_redis: Option<String> = None;
        #[cfg(feature = "sqlite")]
        {
            if let Some(why) = no_redis {
                if choice == "redis" {
                    idem_support::unavailable("redis-server (for the soak test's store)", why);
                    return None;
                }
                println!("soak: {why}; using SQLite instead");
            }
            let dir = tempfile::tempdir().unwrap();
            let store = restartable_sqlite::Restartable::open(dir.path().join("idem.db"))
                .await
                .expect("open the SQLite store");
            Some((Backend::Sqlite(store.clone(), dir), store))
        }
        #[cfg(not(feature = "sqlite"))]
        {
            idem_support::unavailable(
                "redis-server (for the soak test's store)",
                no_redis.unwrap_or_else(|| {
                    "IDEM_SOAK_STORE=sqlite without the `sqlite` feature".to_owned()
                }),
            );
            None
        }
    }

    /// A private `redis-server` and a `RedisStore` on it, or why not.
    #[cfg(feature = "redis")]
    async fn open_redis() -> Result<(Backend, Arc<dyn Store>), String> {
        let server = idem_support::PrivateRedis::start()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        if server.admin().await.is_none() {
            return Err("the private redis-server did not answer within 5 s".to_owned());
        }
        let store = idempotency::RedisStore::connect(&server.url())
            .await
            .map_err(|e| format!("cannot connect to the private redis-server: {e}"))?;
        Ok((Backend::Redis(server), Arc::new(store)))
    }

    fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "redis (private redis-server, appendfsync always)",
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(..) => "sqlite (dropped and reopened on the same file)",
        }
    }

    /// Restarts the store: down for `down`, then back. `crash` chooses SIGKILL over SIGTERM
    /// for Redis.
    async fn restart(&mut self, down: Duration, crash: bool) -> String {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(server) => {
                server.stop(!crash);
                tokio::time::sleep(down).await;
                server.spawn().expect("restart redis-server");
                assert!(server.admin().await.is_some(), "redis-server came back");
                format!(
                    "redis-server {}, down {} ms, restarted",
                    if crash { "SIGKILL" } else { "SIGTERM" },
                    down.as_millis()
                )
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(store, _) => {
                let _ = crash;
                store.restart(down).await;
                format!(
                    "SqliteStore dropped, down {} ms, reopened",
                    down.as_millis()
                )
            }
        }
    }
}

// ---- the clients --------------------------------------------------------------------------

/// What the clients saw.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    timeouts: AtomicU64,
    transport_errors: AtomicU64,
    by_status: Mutex<BTreeMap<String, u64>>,
    /// Per ledger key: the payment ids of every 2xx the client got.
    ids: Mutex<HashMap<String, Vec<String>>>,
    /// Keys a client gave up on at the deadline without a 2xx.
    unfinished: Mutex<Vec<String>>,
    /// Statuses that must not happen, with their bodies.
    unexpected: Mutex<Vec<String>>,
}

impl Stats {
    fn status(&self, label: impl Into<String>) {
        *self
            .by_status
            .lock()
            .unwrap()
            .entry(label.into())
            .or_default() += 1;
    }
}

struct Payer {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    auth: String,
    stats: Arc<Stats>,
}

enum Attempt {
    Created { id: String, replayed: bool },
    Retry,
    GiveUp,
}

impl Payer {
    /// One attempt of the payment `key` with a client timeout of `timeout`.
    async fn attempt(&self, key: &str, body: &Bytes, timeout: Duration) -> Attempt {
        let request = http::Request::post(format!("http://{}/payments", self.addr))
            .header("idempotency-key", key)
            .header(header::AUTHORIZATION, &self.auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        self.stats.requests.fetch_add(1, SeqCst);
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                self.stats.timeouts.fetch_add(1, SeqCst);
                return Attempt::Retry;
            }
            Ok(Err(_)) => {
                self.stats.transport_errors.fetch_add(1, SeqCst);
                return Attempt::Retry;
            }
            Ok(Ok(reply)) => reply,
        };
        let replayed = parts
            .headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        match parts.status.as_u16() {
            201 => {
                self.stats
                    .status(if replayed { "201 replayed" } else { "201" });
                let payment: Payment = serde_json::from_slice(&body).expect("a payment");
                let location = parts.headers.get(header::LOCATION).map(|v| v.as_bytes());
                assert_eq!(
                    location,
                    Some(format!("/payments/{}", payment.id).as_bytes()),
                    "Location is replayed with the body"
                );
                Attempt::Created {
                    id: payment.id,
                    replayed,
                }
            }
            409 => {
                self.stats.status("409");
                Attempt::Retry
            }
            503 => {
                self.stats.status("503");
                Attempt::Retry
            }
            other => {
                self.stats.status(other.to_string());
                self.stats
                    .unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{key}: {other} {}", String::from_utf8_lossy(&body)));
                Attempt::GiveUp
            }
        }
    }

    /// Pays `key` until a 2xx or `deadline`: random timeouts of 10–400 ms, short pauses after a
    /// 409 or 503. Returns the payment id.
    async fn pay(&self, key: &str, body: &Bytes, deadline: Instant) -> Option<String> {
        let ledger = format!("{} {key}", self.auth);
        while Instant::now() < deadline {
            let timeout = Duration::from_millis(10 + rand::random::<u64>() % 391);
            match self.attempt(key, body, timeout).await {
                Attempt::Created { id, .. } => {
                    self.stats
                        .ids
                        .lock()
                        .unwrap()
                        .entry(ledger)
                        .or_default()
                        .push(id.clone());
                    return Some(id);
                }
                Attempt::Retry => {
                    let pause = 20 + rand::random::<u64>() % 80;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Attempt::GiveUp => return None,
            }
        }
        self.stats.unfinished.lock().unwrap().push(ledger);
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_example_under_retried_traffic_and_a_store_restart() {
    // The traffic's duration; the test takes 2-4 s more, so at most 55 keeps it under a minute.
    let secs = env_u64("IDEM_SOAK_SECS", 20).clamp(1, 55);
    let clients = env_u64("IDEM_SOAK_CLIENTS", 32).max(1);
    let max_payments = env_u64("IDEM_SOAK_MAX_PAYMENTS", 200);
    let lease = Duration::from_millis(env_u64("IDEM_SOAK_LEASE_MS", 3_000));
    let Some((mut backend, store)) = Backend::open().await else {
        return;
    };
    let (stop_server, stopped) = tokio::sync::oneshot::channel();
    let (addr, app, idempotency, server) = serve(store.clone(), lease, stopped).await;
    let started = Instant::now();
    let traffic_until = started + Duration::from_secs(secs);
    let stats = Arc::new(Stats::default());
    let run = format!("{:08x}", rand::random::<u32>());

    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let payer = Payer {
                client: Client::builder(TokioExecutor::new()).build_http(),
                addr,
                auth: format!("Bearer client-{c}"),
                stats: stats.clone(),
            };
            let run = run.clone();
            tokio::spawn(async move {
                let mut paid = Vec::new();
                for p in 0..max_payments {
                    if Instant::now() >= traffic_until {
                        break;
                    }
                    let key = format!("{run}-c{c}-p{p}");
                    let body = Bytes::from(format!(
                        r#"{{"amount":{},"currency":"usd"}}"#,
                        1 + rand::random::<u64>() % 10_000
                    ));
                    // A payment started before the deadline may finish a little after it.
                    let deadline = traffic_until + lease + Duration::from_secs(2);
                    if let Some(id) = payer.pay(&key, &body, deadline).await {
                        paid.push((key, body, id));
                    }
                }
                (payer, paid)
            })
        })
        .collect();

    // Two restarts: a crash at 40% of the run, a clean stop at 70%.
    let restarts = env_u64("IDEM_SOAK_RESTARTS", 2).min(2) as usize;
    let mut faults = Vec::new();
    let mut outages = Vec::new();
    for (at, crash, down) in [(0.4, true, 500), (0.7, false, 300)]
        .into_iter()
        .take(restarts)
    {
        let when = started + Duration::from_secs_f64(secs as f64 * at);
        tokio::time::sleep_until(when.into()).await;
        let t = started.elapsed().as_secs_f64();
        let down_at = Instant::now();
        let what = backend.restart(Duration::from_millis(down), crash).await;
        outages.push((down_at, Instant::now()));
        println!("soak {t:>6.2}s fault: {what}");
        faults.push(what);
        // The store serves again without being recreated: a fresh key gets its 201.
        let probe = Payer {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
            auth: "Bearer probe".to_owned(),
            stats: stats.clone(),
        };
        let body = Bytes::from_static(br#"{"amount":1,"currency":"usd"}"#);
        let back = Instant::now();
        let key = format!("{run}-probe-{}", faults.len());
        assert!(
            probe
                .pay(&key, &body, back + Duration::from_secs(10))
                .await
                .is_some(),
            "the store did not serve again within 10 s of the restart"
        );
        println!(
            "soak {:>6.2}s recovered: a fresh key got its 201 {} ms after the store was back",
            started.elapsed().as_secs_f64(),
            back.elapsed().as_millis()
        );
    }

    let mut paid = Vec::new();
    let mut payers = Vec::new();
    for task in tasks {
        let (payer, p) = task.await.expect("a client task panicked");
        payers.push(payer);
        paid.extend(p);
    }
    let traffic_secs = started.elapsed().as_secs_f64();

    // Every key that got a 2xx replays the same payment (waiting out a claim left in flight).
    let final_deadline = Instant::now() + lease + Duration::from_secs(5);
    let mismatches = Mutex::new(Vec::new());
    let verify = payers.iter().enumerate().map(|(c, payer)| {
        let mine: Vec<_> = paid
            .iter()
            .filter(|(key, ..)| key.contains(&format!("-c{c}-")))
            .collect();
        let mismatches = &mismatches;
        async move {
            for (key, body, id) in mine {
                loop {
                    match payer.attempt(key, body, Duration::from_secs(5)).await {
                        Attempt::Created { id: again, replayed } => {
                            if &again != id || !replayed {
                                mismatches.lock().unwrap().push(format!(
                                    "{key}: first {id}, final request {again} (replayed: {replayed})"
                                ));
                            }
                            payer
                                .stats
                                .ids
                                .lock()
                                .unwrap()
                                .entry(format!("{} {key}", payer.auth))
                                .or_default()
                                .push(again);
                            break;
                        }
                        Attempt::Retry if Instant::now() < final_deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        _ => {
                            mismatches
                                .lock()
                                .unwrap()
                                .push(format!("{key}: no replay in the final pass"));
                            break;
                        }
                    }
                }
            }
        }
    });
    futures::future::join_all(verify).await;
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    // Handlers whose clients gave up at the deadline may still run: let them finish.
    let running_at_end = idempotency::running();
    let drained = idempotency.drain(lease + Duration::from_secs(5)).await;

    // ---- figures and checks ----
    let ledger = app.ledger.lock().unwrap().clone();
    let ids = stats.ids.lock().unwrap();
    let mut started_hist: BTreeMap<usize, u64> = BTreeMap::new();
    let mut completed_hist: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut starts, mut completions) = (0u64, 0u64);
    for runs in ledger.values() {
        *started_hist.entry(runs.started.len()).or_default() += 1;
        *completed_hist.entry(runs.completed).or_default() += 1;
        starts += runs.started.len() as u64;
        completions += runs.completed as u64;
    }
    // Keys paid more than once, or whose 2xx carried an id other than their one payment's.
    let mut problems = Vec::new();
    let (mut near_restart, mut far_from_restart) = (0, 0);
    let no_runs = Runs::default();
    let mut keys: Vec<&String> = ledger.keys().chain(ids.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let runs = ledger.get(key).unwrap_or(&no_runs);
        let got = ids.get(key).map_or(&[][..], |v| &v[..]);
        let wrong_id = !got.is_empty()
            && (runs.started.len() != 1 || got.iter().any(|id| id != &runs.started[0]));
        if runs.started.len() > 1 || wrong_id {
            let at: Vec<String> = runs
                .started_at
                .iter()
                .map(|t| format!("{:.2}s", t.duration_since(started).as_secs_f64()))
                .collect();
            // Was the first payment made while the store was restarting (give or take 1 s)?
            let first = runs.started_at.first().copied();
            if first.is_some_and(|t| {
                outages.iter().any(|(down, up)| {
                    t + Duration::from_secs(1) >= *down && t <= *up + Duration::from_secs(1)
                })
            }) {
                near_restart += 1;
            } else {
                far_from_restart += 1;
            }
            problems.push(format!(
                "{key}: handlers started {:?} at {at:?}, {} completed; the client's 2xx carried {got:?}",
                runs.started, runs.completed
            ));
        }
    }
    let mismatches = mismatches.into_inner().unwrap();
    let unexpected = stats.unexpected.lock().unwrap();
    let unfinished = stats.unfinished.lock().unwrap();
    let mut report = String::new();
    let _ = writeln!(report, "==== soak: {} ====", backend.name());
    let _ = writeln!(
        report,
        "clients {clients}, traffic {traffic_secs:.1} s (IDEM_SOAK_SECS={secs}), lease {} ms, handler 50-300 ms, client timeouts 10-400 ms",
        lease.as_millis()
    );
    let _ = writeln!(report, "faults              {}", faults.join("; "));
    let _ = writeln!(
        report,
        "requests sent       {}",
        stats.requests.load(SeqCst)
    );
    let _ = writeln!(
        report,
        "  client timeouts   {}",
        stats.timeouts.load(SeqCst)
    );
    let _ = writeln!(
        report,
        "  transport errors  {}",
        stats.transport_errors.load(SeqCst)
    );
    for (status, n) in stats.by_status.lock().unwrap().iter() {
        let _ = writeln!(report, "  {status:<17} {n}");
    }
    let _ = writeln!(
        report,
        "payments            {} keys got a 2xx, {} gave up at the deadline",
        ids.len(),
        unfinished.len()
    );
    let _ = writeln!(
        report,
        "handlers            {starts} started (payments), {completions} completed; {running_at_end} still running when the server stopped, {} cut off by the drain",
        drained.cut_off
    );
    let _ = writeln!(report, "per key: started   {}", hist(&started_hist));
    let _ = writeln!(report, "per key: completed {}", hist(&completed_hist));
    let _ = writeln!(
        report,
        "final pass          {} keys replayed the same payment, {} problems",
        paid.len() - mismatches.len(),
        mismatches.len()
    );
    let _ = writeln!(
        report,
        "keys paid twice (2+ handlers started) or answered with another payment's id: {} ({near_restart} first paid within 1 s of a store restart, {far_from_restart} not)",
        problems.len()
    );
    let m = idempotency::counters();
    let _ = writeln!(
        report,
        "idempotency::counters()     misses={} hits={} conflicts={} takeovers={} releases={} store_errors={} leases_lost={} unknown_outcomes={} results_unstored={} finished_detached={}",
        m.misses, m.hits, m.conflicts, m.takeovers, m.releases, m.store_errors, m.leases_lost,
        m.unknown_outcomes, m.results_unstored, m.finished_detached
    );
    println!("{report}");

    assert!(
        unexpected.is_empty(),
        "statuses other than 201, 409 and 503: {:?}",
        &unexpected[..unexpected.len().min(20)]
    );
    assert!(
        problems.is_empty(),
        "{} keys were paid twice (more than one handler started) or got a payment id other than their one payment's: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    assert_eq!(
        (drained.cut_off, drained.unrecorded),
        (0, 0),
        "handlers still running {:?} after the server stopped",
        lease + Duration::from_secs(5)
    );
    assert_eq!(
        completions, starts,
        "every handler that started ran to its end (none was cut off by its client going away)"
    );
    assert!(
        mismatches.is_empty(),
        "{} keys did not replay their payment: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(20)]
    );
    assert!(!ids.is_empty(), "some payments went through");
}

/// `{1: 900, 2: 80}` as `1→900 keys, 2→80 keys`.
fn hist<K: std::fmt::Display>(h: &BTreeMap<K, u64>) -> String {
    h.iter()
        .map(|(k, n)| format!("{k}→{n} keys"))
        .collect::<Vec<_>>()
        .join(", ")
}
