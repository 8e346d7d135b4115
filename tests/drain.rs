//! A clean exit does not run a started body twice: `idempotency::drain(timeout)` before `main`
//! returns.
//!
//! **Worker processes** (this test binary run again, its role in `IDEM_DRAIN_WORKER`): a job
//! worker calls an `#[idempotent]` function that owns its data (so its body runs detached) with
//! a 100 ms timeout, gives up, drains, and returns from its `main` (its runtime shuts down). A
//! second worker then retries the key for three leases. Bodies are counted on their first line,
//! in an `O_APPEND` file shared by the processes:
//!
//! - the drain outlasts the body: 1 start, the retry replays the first worker's result;
//! - the drain cuts the body off: 1 start, the cut-off body's unknown outcome is in the store
//!   before the worker exits, and the retry is refused (`OutcomeUnknown`);
//! - no drain (the control, what an exit without a drain is): the runtime drops the body, its
//!   claim stays in flight, and once the lease lapses the retry takes it over: 2 starts.
//!
//! on Redis, PostgreSQL and SQLite (Redis and PostgreSQL from `IDEM_REDIS_URL` /
//! `IDEM_POSTGRES_URL`; skipped with a printed reason when unreachable unless
//! `IDEM_REQUIRE_SERVICES=1`).
//!
//! **In process**: the HTTP layer's handlers are drained the same way (the layer's `drain` is
//! this one), and work spawned for a caller keeps the caller's `tracing` span. `drain` acts on
//! the whole process, so the tests of this binary run one at a time (`ONE_AT_A_TIME`).
#![cfg(all(
    feature = "redis",
    feature = "postgres",
    feature = "sqlite",
    feature = "http"
))]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotency::{idempotent, Error, PostgresStore, RedisStore, SqliteStore, Store};

/// The tests of this binary run one at a time: a drain cuts off every detached body of the
/// process, a concurrent test's included.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The environment variable that makes the `worker` test a worker, and names its role.
const ROLE: &str = "IDEM_DRAIN_WORKER";
/// Marks the lines of a worker's stdout that carry its reports.
const MARK: &str = "@idem ";
/// The lease of [`charge`] (keep in step with its attribute).
const LEASE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Redis,
    Postgres,
    Sqlite,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "redis" => Backend::Redis,
            "postgres" => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

/// Opens the store `name` of `backend`: a Redis prefix, a PostgreSQL table, a SQLite file.
async fn open(backend: Backend, name: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(match backend {
        Backend::Redis => {
            Arc::new(RedisStore::connect_with_prefix(&idem_support::redis_url(), name).await?)
        }
        Backend::Postgres => {
            Arc::new(PostgresStore::connect_with_table(&idem_support::postgres::url(), name).await?)
        }
        Backend::Sqlite => Arc::new(SqliteStore::open(name).await?),
    })
}

/// A fresh store name of `backend` and a check that the store opens, or `None` (skipped).
async fn fresh(backend: Backend, dir: &Path) -> Option<String> {
    let name = match backend {
        Backend::Redis => format!("idem-drain-{:016x}:", rand::random::<u64>()),
        Backend::Postgres => idem_support::postgres::fresh_table("drain").await?,
        Backend::Sqlite => dir.join("drain.db").display().to_string(),
    };
    match open(backend, &name).await {
        Ok(_) => Some(name),
        Err(e) => {
            idem_support::unavailable(backend.name(), e);
            None
        }
    }
}

/// The job: charges once per order. It owns its data, so its body runs on a task of its own
/// and goes on when its caller stops waiting. The start is counted on its first line.
#[idempotent(name = "drain.charge", key = order, store = store.clone(), skip(store, starts, body_ms), lease = "1s")]
async fn charge(
    store: Arc<dyn Store>,
    starts: Arc<PathBuf>,
    order: String,
    body_ms: u64,
) -> Result<String, Error> {
    idem_support::append_line(&starts, &format!("start {}\n", std::process::id()));
    tokio::time::sleep(Duration::from_millis(body_ms)).await;
    Ok(format!("paid-by-{}", std::process::id()))
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one report line for the parent.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// Runs a worker role when started by a test below; a no-op in the parent run. Its runtime is
/// its own, and is shut down when this returns, as a service's when `main` returns.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let store = open(Backend::parse(&env("IDEM_BACKEND")), &env("IDEM_STORE"))
            .await
            .expect("worker opens the store");
        let starts = Arc::new(PathBuf::from(env("IDEM_STARTS")));
        let body_ms: u64 = env("IDEM_BODY_MS").parse().expect("IDEM_BODY_MS");
        let order = env("IDEM_ORDER");
        match role.as_str() {
            // Gives up after 100 ms, then drains (or not) and returns.
            "first" => {
                report("pid", std::process::id());
                let call = charge(store, starts, order, body_ms);
                let out = tokio::time::timeout(Duration::from_millis(100), call).await;
                report(
                    "first",
                    if out.is_err() {
                        "timed-out"
                    } else {
                        "answered"
                    },
                );
                if let Ok(ms) = env("IDEM_DRAIN_MS").parse::<u64>() {
                    let r = idempotency::drain(Duration::from_millis(ms)).await;
                    report(
                        "drain",
                        format_args!(
                            "finished={} cut_off={} unrecorded={}",
                            r.finished, r.cut_off, r.unrecorded
                        ),
                    );
                }
            }
            // Retries for three leases while the key is in flight.
            "retry" => {
                let until = tokio::time::Instant::now() + 3 * LEASE;
                let out = loop {
                    let out = charge(store.clone(), starts.clone(), order.clone(), body_ms).await;
                    match out {
                        Err(Error::InFlight { .. }) if tokio::time::Instant::now() < until => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        out => break out,
                    }
                };
                match out {
                    Ok(v) => report("value", v),
                    Err(e) => report(
                        "error",
                        format!("{e:?}").split([' ', '{', '(']).next().unwrap_or(""),
                    ),
                }
            }
            other => panic!("unknown worker role {other}"),
        }
    });
    // The runtime shuts down here, dropping whatever still runs on it.
}

/// Runs this test binary as a worker to its end (bounded); its reports.
fn run_worker(role: &str, vars: &[(&str, String)]) -> Vec<(String, String)> {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a worker");
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let (kind, payload) = l.strip_prefix(MARK)?.split_once(' ')?;
                Some((kind.to_owned(), payload.to_owned()))
            })
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the {role} worker did not end within 60 s");
            }
        }
    };
    let reports = reader.join().expect("the reader");
    assert!(status.success(), "the {role} worker failed: {reports:?}");
    reports
}

fn one<'a>(reports: &'a [(String, String)], kind: &str) -> &'a str {
    let found: Vec<_> = reports.iter().filter(|(k, _)| k == kind).collect();
    assert_eq!(found.len(), 1, "one `{kind}` report in {reports:?}");
    &found[0].1
}

/// How the first worker ends.
#[derive(Clone, Copy, Debug)]
enum Exit {
    /// Drains for longer than its body runs.
    DrainOutlastsBody,
    /// Drains for less time than its body runs: the body is cut off.
    DrainCutsOff,
    /// Returns without a drain: a crash, as far as the body is concerned.
    NoDrain,
}

/// One scenario: the first worker's body, its exit, then the retrying worker. Returns the
/// starts counted and the retry's report.
async fn scenario(backend: Backend, exit: Exit) -> Option<(usize, (String, String), String)> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = fresh(backend, dir.path()).await?;
    let starts = dir.path().join("starts.txt");
    let order = format!("order-{:016x}", rand::random::<u64>());
    let (body_ms, drain_ms) = match exit {
        Exit::DrainOutlastsBody => (500, "5000"),
        Exit::DrainCutsOff => (20_000, "300"),
        Exit::NoDrain => (20_000, "none"),
    };
    let vars = |body_ms: u64| {
        vec![
            ("IDEM_BACKEND", backend.name().to_owned()),
            ("IDEM_STORE", store.clone()),
            ("IDEM_STARTS", starts.display().to_string()),
            ("IDEM_ORDER", order.clone()),
            ("IDEM_BODY_MS", body_ms.to_string()),
            ("IDEM_DRAIN_MS", drain_ms.to_owned()),
        ]
    };
    let first = tokio::task::spawn_blocking({
        let vars = vars(body_ms);
        move || run_worker("first", &vars)
    })
    .await
    .expect("first worker");
    assert_eq!(one(&first, "first"), "timed-out", "{backend:?} {exit:?}");
    match exit {
        Exit::DrainOutlastsBody => assert_eq!(
            one(&first, "drain"),
            "finished=1 cut_off=0 unrecorded=0",
            "{backend:?}: the drain waited for the body"
        ),
        Exit::DrainCutsOff => assert_eq!(
            one(&first, "drain"),
            "finished=0 cut_off=1 unrecorded=0",
            "{backend:?}: the drain cut the body off and recorded its unknown outcome"
        ),
        Exit::NoDrain => {}
    }
    let retry = tokio::task::spawn_blocking({
        let vars = vars(50);
        move || run_worker("retry", &vars)
    })
    .await
    .expect("retry worker");
    let answer = retry
        .iter()
        .find(|(k, _)| k == "value" || k == "error")
        .cloned()
        .unwrap_or_else(|| panic!("the retry answered: {retry:?}"));
    let started = std::fs::read_to_string(&starts)
        .unwrap_or_default()
        .lines()
        .count();
    println!("{backend:?} {exit:?}: {started} start(s), retry answered {answer:?}");
    if backend == Backend::Redis {
        idem_support::redis::delete_prefix(&store);
    }
    Some((started, answer, one(&first, "pid").to_owned()))
}

async fn drain_outlasts_body(backend: Backend) {
    let Some((started, answer, first)) = scenario(backend, Exit::DrainOutlastsBody).await else {
        return;
    };
    assert_eq!(started, 1, "{backend:?}: one start");
    assert_eq!(
        answer,
        ("value".to_owned(), format!("paid-by-{first}")),
        "{backend:?}: the retry replays the first worker's result"
    );
}

async fn drain_cuts_off(backend: Backend) {
    let Some((started, answer, _)) = scenario(backend, Exit::DrainCutsOff).await else {
        return;
    };
    assert_eq!(started, 1, "{backend:?}: one start");
    assert_eq!(
        answer,
        ("error".to_owned(), "OutcomeUnknown".to_owned()),
        "{backend:?}: the retry is refused as an unknown outcome"
    );
}

async fn no_drain_is_a_crash(backend: Backend) {
    let Some((started, (kind, _), _)) = scenario(backend, Exit::NoDrain).await else {
        return;
    };
    assert_eq!(
        (started, kind.as_str()),
        (2, "value"),
        "{backend:?}: without a drain the runtime drops the body; its claim lapses with the lease and the retry runs it again (what drain is for)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_drain_outlasts_the_body_and_the_retry_replays() {
    drain_outlasts_body(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drain_outlasts_the_body_and_the_retry_replays() {
    drain_outlasts_body(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_drain_outlasts_the_body_and_the_retry_replays() {
    drain_outlasts_body(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_drain_cuts_off_the_body_and_the_retry_is_refused() {
    drain_cuts_off(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drain_cuts_off_the_body_and_the_retry_is_refused() {
    drain_cuts_off(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_drain_cuts_off_the_body_and_the_retry_is_refused() {
    drain_cuts_off(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_exit_without_drain_runs_the_body_again() {
    no_drain_is_a_crash(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_exit_without_drain_runs_the_body_again() {
    no_drain_is_a_crash(Backend::Postgres).await;
}

// ---- in process: the HTTP layer, and spans ----------------------------------------------------

mod http_layer {
    use super::*;
    use axum::http::StatusCode;
    use axum::Router;
    use idempotency::http::IdempotencyLayer;
    use idempotency::MemoryStore;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    /// A payments endpoint whose handler counts its start, then waits for a permit.
    struct Server {
        addr: std::net::SocketAddr,
        starts: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
        layer: IdempotencyLayer,
    }

    async fn serve() -> Server {
        let starts = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let layer = IdempotencyLayer::shared(MemoryStore::new(), "drain-test");
        let app = Router::new()
            .route(
                "/payments",
                axum::routing::post({
                    let (starts, gate) = (starts.clone(), gate.clone());
                    move || async move {
                        let n = starts.fetch_add(1, SeqCst) + 1;
                        gate.acquire().await.expect("gate").forget();
                        (StatusCode::CREATED, format!("pay_{n}"))
                    }
                }),
            )
            .layer(layer.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server {
            addr,
            starts,
            gate,
            layer,
        }
    }

    /// POSTs with `key`, giving up after `patience`: the status and body, or `None`.
    async fn post(
        addr: std::net::SocketAddr,
        key: &str,
        patience: Duration,
    ) -> Option<(u16, String)> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = http::Request::post(format!("http://{addr}/payments"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .expect("request");
        let res = tokio::time::timeout(patience, client.request(req))
            .await
            .ok()?
            .expect("response");
        let status = res.status().as_u16();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .expect("body")
            .to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_whose_client_left_is_waited_for_and_its_response_kept() {
        let _one = ONE_AT_A_TIME.lock().await;
        let s = serve().await;
        assert!(post(s.addr, "k-wait", Duration::from_millis(200))
            .await
            .is_none());
        assert_eq!(s.starts.load(SeqCst), 1);
        assert!(idempotency::running() >= 1, "the handler runs on");
        s.gate.add_permits(1);
        let report = s.layer.drain(Duration::from_secs(10)).await;
        assert_eq!((report.finished, report.cut_off), (1, 0), "{report:?}");
        let (status, body) = post(s.addr, "k-wait", Duration::from_secs(10))
            .await
            .expect("an answer");
        assert_eq!((status, body.as_str()), (201, "pay_1"), "the retry replays");
        assert_eq!(s.starts.load(SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_still_running_at_the_timeout_is_cut_off_and_the_retry_refused() {
        let _one = ONE_AT_A_TIME.lock().await;
        let s = serve().await;
        assert!(post(s.addr, "k-cut", Duration::from_millis(200))
            .await
            .is_none());
        assert_eq!(s.starts.load(SeqCst), 1);
        let report = idempotency::drain(Duration::from_millis(200)).await;
        assert_eq!(
            (report.finished, report.cut_off, report.unrecorded),
            (0, 1, 0),
            "{report:?}"
        );
        assert_eq!(idempotency::running(), 0);
        let (status, body) = post(s.addr, "k-cut", Duration::from_secs(10))
            .await
            .expect("an answer");
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("outcome-unknown"), "{body}");
        assert_eq!(
            s.starts.load(SeqCst),
            1,
            "the cut-off handler is not run again"
        );
        // Work spawned after a drain is not cut off by it.
        s.gate.add_permits(1);
        let (status, _) = post(s.addr, "k-after", Duration::from_secs(10))
            .await
            .expect("an answer");
        assert_eq!(status, 201);
    }
}

mod spans {
    use super::*;
    use std::io::Write;
    use tracing::Instrument;

    /// Everything the process logs, for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[idempotent(name = "drain.traced", key = order, store = store.clone(), skip(store))]
    async fn traced(store: Arc<dyn Store>, order: String) -> Result<u32, Error> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tracing::info!("inside the detached body of {order}");
        Ok(1)
    }

    /// A span field set by the caller is on a line logged inside a detached body (its own task)
    /// and inside an HTTP handler (its own task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detached_bodies_and_handlers_keep_the_callers_span() {
        let _one = ONE_AT_A_TIME.lock().await;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

        let store: Arc<dyn Store> = Arc::new(idempotency::MemoryStore::new());
        traced(store, "o-1".into())
            .instrument(tracing::info_span!("job", request_id = "req-7f3a"))
            .await
            .expect("ran");

        use axum::routing::post;
        let app = axum::Router::new()
            .route(
                "/payments",
                post(|| async {
                    tracing::info!("inside the handler");
                    "ok"
                }),
            )
            .layer(idempotency::http::IdempotencyLayer::shared(
                idempotency::MemoryStore::new(),
                "spans",
            ))
            .layer(axum::middleware::from_fn(
                |req: axum::extract::Request, next: axum::middleware::Next| {
                    next.run(req)
                        .instrument(tracing::info_span!("http", trace_id = "t-91c2"))
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = http::Request::post(format!("http://{addr}/payments"))
            .header("idempotency-key", "span-1")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let res = client.request(req).await.expect("response");
        assert_eq!(res.status(), 200);

        let log = String::from_utf8(captured.0.lock().unwrap().clone()).expect("utf-8");
        let line = |needle: &str| {
            log.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with `{needle}` in:\n{log}"))
                .to_owned()
        };
        assert!(
            line("inside the detached body of o-1").contains("request_id=\"req-7f3a\""),
            "{log}"
        );
        assert!(
            line("inside the handler").contains("trace_id=\"t-91c2\""),
            "{log}"
        );
    }
}
