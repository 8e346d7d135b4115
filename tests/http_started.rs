//! A handler that started is never run again by accident: `idempotency::http::IdempotencyLayer` in
//! front of real axum servers on 127.0.0.1 (port 0), with clients that go away in the middle of
//! a request, responses that cannot be kept (5xx, failing midway, over the limit, an endless
//! `text/event-stream`), and a handler that panics (a graceful shutdown, `drain`, is in `tests/drain.rs`: it
//! acts on the whole process, so it has a test binary of its own).
//!
//! The processor counts a charge on the first line of its handler, before any `.await`, so a
//! handler that is interrupted and then run again shows up as a second charge (counting at the
//! end would hide exactly the duplicates these tests are about). An outer middleware counts the
//! request futures the server dropped before they finished (the client went away): the tests
//! that disconnect wait for it, so they know the server really let go of the request, which is
//! what used to release the claim.
//!
//! The disconnect case runs against every store (`MemoryStore`, `SqliteStore` in a temporary
//! directory, `RedisStore` under a prefix of its own, `PostgresStore` in a fresh table); the
//! others use a `MemoryStore`. Redis and PostgreSQL are read from `IDEM_REDIS_URL` and
//! `IDEM_POSTGRES_URL`; without them those tests print why and pass, unless
//! `IDEM_REQUIRE_SERVICES=1`.
#![cfg(feature = "http")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idempotency::http::IdempotencyLayer;
use idempotency::{MemoryStore, OnUnknown, Store};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// The longest any single wait of these tests may take before it fails: generous, so that a
/// loaded machine does not fail them, and bounded, so that a regression fails rather than hangs.
const PATIENCE: Duration = Duration::from_secs(10);

const PAYMENT: &str = r#"{"amount": 500, "currency": "usd"}"#;

// ---------------------------------------------------------------------------------------------
// The processor.

/// What the handlers did, kept outside the idempotency store.
#[derive(Clone)]
struct Processor {
    /// Per `Idempotency-Key`: the payment id of every charge, pushed on the first line of the
    /// handler.
    charges: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// Handlers of `/payments` that reached their end.
    finished: Arc<AtomicUsize>,
    /// `/payments` called with `x-wait-for-gate` takes a permit here after its 300 ms.
    gate: Arc<Semaphore>,
    /// Request futures the server dropped before they finished: a client went away.
    abandoned: Arc<AtomicUsize>,
    /// Events the `/events` stream produced, and whether the stream was dropped.
    events: Arc<AtomicUsize>,
    events_ended: Arc<AtomicBool>,
    /// Notified (every waiter) whenever anything above changes.
    changed: Arc<Notify>,
}

impl Processor {
    fn new() -> Self {
        Processor {
            charges: Arc::default(),
            finished: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            abandoned: Arc::default(),
            events: Arc::default(),
            events_ended: Arc::default(),
            changed: Arc::default(),
        }
    }

    /// Records a charge for the request's key: which charge of that key it is, and its new
    /// payment id. Synchronous: handlers call it first, before any `.await`.
    fn charge(&self, headers: &HeaderMap) -> (usize, String) {
        let key = headers
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let id = format!("pay_{:016x}", rand::random::<u64>());
        let nth = {
            let mut charges = self.charges.lock().unwrap();
            let ids = charges.entry(key).or_default();
            ids.push(id.clone());
            ids.len()
        };
        self.changed.notify_waiters();
        (nth, id)
    }

    /// The charges made under `key`.
    fn charges(&self, key: &str) -> usize {
        self.charges.lock().unwrap().get(key).map_or(0, Vec::len)
    }

    /// The payment id of the first charge under `key`.
    fn first_id(&self, key: &str) -> String {
        self.charges.lock().unwrap()[key][0].clone()
    }

    /// The charges under every key.
    fn total(&self) -> usize {
        self.charges.lock().unwrap().values().map(Vec::len).sum()
    }

    fn abandoned(&self) -> usize {
        self.abandoned.load(SeqCst)
    }

    /// Waits (at most [`PATIENCE`]) until `done` holds, re-checking whenever the processor
    /// changes.
    async fn wait_for(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if done() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                assert!(done(), "gave up after {PATIENCE:?} waiting for {what}");
                return;
            }
        }
    }
}

/// The payment processor: charges, takes ~300 ms at the bank (then, with `x-wait-for-gate`,
/// waits for the test's permit), and answers 201 with the payment's id.
async fn pay(State(p): State<Processor>, headers: HeaderMap) -> Response {
    let (nth, id) = p.charge(&headers);
    tokio::time::sleep(Duration::from_millis(300)).await;
    if headers.contains_key("x-wait-for-gate") {
        p.gate.acquire().await.unwrap().forget();
    }
    p.finished.fetch_add(1, SeqCst);
    p.changed.notify_waiters();
    payment(nth, &id)
}

fn payment(nth: usize, id: &str) -> Response {
    (
        StatusCode::CREATED,
        [(CONTENT_TYPE, "application/json")],
        json!({ "id": id, "charge": nth }).to_string(),
    )
        .into_response()
}

/// Charges, then fails with the status in the path on the key's first charge; a later charge
/// of the key succeeds with 201.
async fn fail_once(
    State(p): State<Processor>,
    headers: HeaderMap,
    Path(code): Path<u16>,
) -> Response {
    let (nth, id) = p.charge(&headers);
    if nth == 1 {
        let status = StatusCode::from_u16(code).unwrap();
        (status, format!("processor failed with {code}")).into_response()
    } else {
        payment(nth, &id)
    }
}

/// Charges, then sends a chunk of its body and fails.
async fn fails_midway(State(p): State<Processor>, headers: HeaderMap) -> Response {
    p.charge(&headers);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"id\": \"pay_")),
        Err(std::io::Error::other(
            "the processor's connection was reset",
        )),
    ];
    (
        [(CONTENT_TYPE, "application/json")],
        Body::from_stream(futures::stream::iter(chunks)),
    )
        .into_response()
}

/// `n` bytes, not UTF-8.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ 0x80).collect()
}

/// Charges, then answers `n` bytes in one piece (the length is known).
async fn bytes(State(p): State<Processor>, headers: HeaderMap, Path(n): Path<usize>) -> Response {
    p.charge(&headers);
    ([(CONTENT_TYPE, "application/octet-stream")], pattern(n)).into_response()
}

/// Charges, then answers `n` bytes in chunks of 1000 (the length is not known in advance).
async fn stream(State(p): State<Processor>, headers: HeaderMap, Path(n): Path<usize>) -> Response {
    p.charge(&headers);
    let chunks: Vec<Result<Bytes, Infallible>> = pattern(n)
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

/// Sets the processor's `events_ended` when the event stream is dropped.
struct StreamEnd(Processor);

impl Drop for StreamEnd {
    fn drop(&mut self) {
        self.0.events_ended.store(true, SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Charges, then streams server-sent events without end: the first at once, then one every
/// 50 ms.
async fn events(State(p): State<Processor>, headers: HeaderMap) -> Response {
    p.charge(&headers);
    let end = StreamEnd(p.clone());
    let events = futures::stream::unfold((0u64, end), |(n, end)| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        end.0.events.fetch_add(1, SeqCst);
        end.0.changed.notify_waiters();
        let event = Bytes::from(format!("id: {n}\ndata: {{\"tick\": {n}}}\n\n"));
        Some((Ok::<_, Infallible>(event), (n + 1, end)))
    });
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// Charges, then panics.
async fn panics(State(p): State<Processor>, headers: HeaderMap) -> Response {
    p.charge(&headers);
    panic!("the processor crashed after charging");
}

/// Counts the request futures the server drops before they finish.
struct Unfinished {
    p: Processor,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.armed {
            self.p.abandoned.fetch_add(1, SeqCst);
            self.p.changed.notify_waiters();
        }
    }
}

async fn probe(State(p): State<Processor>, req: Request, next: Next) -> Response {
    let mut unfinished = Unfinished { p, armed: true };
    let response = next.run(req).await;
    unfinished.armed = false;
    response
}

fn router(p: &Processor, layer: IdempotencyLayer) -> Router<()> {
    Router::new()
        .route("/payments", post(pay))
        .route("/fail-once/{code}", post(fail_once))
        .route("/fails-midway", post(fails_midway))
        .route("/bytes/{n}", post(bytes))
        .route("/stream/{n}", post(stream))
        .route("/events", post(events))
        .route("/panics", post(panics))
        .with_state(p.clone())
        .layer(layer)
        // Outermost: sees the server drop a request's future.
        .layer(middleware::from_fn_with_state(p.clone(), probe))
}

/// The layer's scope: these tests have one client, so every request shares one scope.
const SCOPE: &str = "one-test-client";

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::shared(MemoryStore::new(), SCOPE)
}

// ---------------------------------------------------------------------------------------------
// Server and clients.

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    p: Processor,
}

/// Serves the processor behind `layer` with axum on 127.0.0.1:0 until the test's runtime ends.
async fn serve(layer: IdempotencyLayer) -> Server {
    let p = Processor::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = router(&p, layer);
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    Server {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        p,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// The body, or why it could not be read to its end.
    body: Result<Bytes, String>,
}

impl std::fmt::Debug for Reply {
    /// The status, the headers, and at most the first 300 bytes of the body.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = match &self.body {
            Ok(b) => format!(
                "{} bytes: {:?}",
                b.len(),
                String::from_utf8_lossy(&b[..b.len().min(300)])
            ),
            Err(e) => format!("failed: {e}"),
        };
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Reply {
    fn body(&self) -> &Bytes {
        match &self.body {
            Ok(body) => body,
            Err(e) => panic!("the body failed ({e}): {} {:?}", self.status, self.headers),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(self.body())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn replayed(&self) -> bool {
        match self.headers.get("idempotent-replayed") {
            None => false,
            Some(v) => {
                assert_eq!(v, "true");
                true
            }
        }
    }

    /// Checks this is a problem document with `status` whose `type` ends in `#slug`.
    fn problem(&self, status: u16, slug: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers[CONTENT_TYPE], "application/problem+json");
        let doc = self.json();
        assert_eq!(doc["status"], status, "{doc}");
        let kind = doc["type"].as_str().unwrap_or_default();
        assert!(kind.ends_with(&format!("#{slug}")), "{doc}");
        doc
    }

    /// Checks this is `500 #outcome-unknown`.
    fn outcome_unknown(&self) {
        self.problem(500, "outcome-unknown");
        assert!(!self.replayed());
    }

    /// A fresh 201 (the handler ran for this request).
    fn created(&self) -> Value {
        assert_eq!(self.status, StatusCode::CREATED, "{self:?}");
        assert!(!self.replayed(), "{self:?}");
        self.json()
    }

    /// A replayed 201.
    fn replay(&self) -> Value {
        assert_eq!(self.status, StatusCode::CREATED, "{self:?}");
        assert!(self.replayed(), "{self:?}");
        self.json()
    }
}

impl Server {
    /// `POST path` with `key` and `body`, with hyper-util's client; the whole exchange must
    /// take less than [`PATIENCE`].
    async fn post(&self, path: &str, key: &str, body: &str) -> Reply {
        let request = http::Request::post(format!("http://{}{path}", self.addr))
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let exchange = async {
            let response = self.client.request(request).await.unwrap_or_else(|e| {
                panic!("POST {path} ({key}): no response: {e:?}");
            });
            let (head, body) = response.into_parts();
            Reply {
                status: head.status,
                headers: head.headers,
                body: body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .map_err(|e| format!("{e:?}")),
            }
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .unwrap_or_else(|_| panic!("POST {path} ({key}): no answer within {PATIENCE:?}"))
    }

    /// Sends `POST path` again and again (every 25 ms, for at most [`PATIENCE`]) while the
    /// answer is 409 (in progress); returns how many 409s came, and the first other answer.
    async fn retry_while_in_progress(&self, path: &str, key: &str, body: &str) -> (usize, Reply) {
        let deadline = Instant::now() + PATIENCE;
        let mut conflicts = 0;
        loop {
            let reply = self.post(path, key, body).await;
            if reply.status != StatusCode::CONFLICT {
                return (conflicts, reply);
            }
            reply.problem(409, "request-in-progress");
            assert_eq!(reply.headers[RETRY_AFTER], "1");
            conflicts += 1;
            assert!(
                Instant::now() < deadline,
                "{key}: still 409 after {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Opens a connection of its own and writes `POST path` with `key`, `body` and `headers`
    /// on it, as HTTP/1.1; the caller reads the answer, or drops the connection to go away.
    async fn send_raw(
        &self,
        path: &str,
        key: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> TcpStream {
        let mut socket = TcpStream::connect(self.addr).await.unwrap();
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nidempotency-key: {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(body.as_bytes()).await.unwrap();
        socket
    }

    /// Drops `socket` (the client goes away without reading an answer) and waits until the
    /// server dropped the request's future: what used to release the claim.
    async fn leave(&self, socket: TcpStream) {
        let before = self.p.abandoned();
        drop(socket);
        self.p
            .wait_for(
                "the server to drop the request of the client that left",
                || self.p.abandoned() > before,
            )
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// A client that goes away: the handler runs to its end, the retry replays its response.

/// For each of 10, 100 and 250 ms: a raw client posts a payment, closes its connection that
/// long after sending it (once the handler started), and retries with the same key and body.
/// The retry gets 409 while the first handler runs (it waits for the test's gate after its
/// 300 ms, so that the 409 is certain), then the first handler's payment replayed.
async fn clients_that_leave_get_the_first_payment(store: impl Store + 'static) {
    let s = serve(IdempotencyLayer::shared(std::sync::Arc::new(store), SCOPE)).await;
    for leave_after in [10, 100, 250] {
        let key = format!("leaves-after-{leave_after}ms-{:08x}", rand::random::<u32>());
        let sent = Instant::now();
        let socket = s
            .send_raw("/payments", &key, PAYMENT, &[("x-wait-for-gate", "1")])
            .await;
        s.p.wait_for("the first handler to start", || s.p.charges(&key) == 1)
            .await;
        tokio::time::sleep_until(sent + Duration::from_millis(leave_after)).await;
        s.leave(socket).await;
        assert_eq!(s.p.charges(&key), 1, "{key}");

        // The handler still runs: the retry is told so.
        let running = s.post("/payments", &key, PAYMENT).await;
        running.problem(409, "request-in-progress");
        assert_eq!(running.headers[RETRY_AFTER], "1");
        assert_eq!(s.p.charges(&key), 1, "{key}: the 409 charged nothing");

        // It finishes; its response was stored for the retry.
        s.p.gate.add_permits(1);
        let (_, answer) = s.retry_while_in_progress("/payments", &key, PAYMENT).await;
        let doc = answer.replay();
        assert_eq!(
            doc["id"],
            s.p.first_id(&key),
            "{key}: the retry got the payment the first handler made"
        );
        assert_eq!(doc["charge"], 1);
        assert_eq!(s.p.charges(&key), 1, "{key}: charged once");
    }
    assert_eq!(s.p.total(), 3);
    assert_eq!(s.p.finished.load(SeqCst), 3, "every handler ran to its end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_clients_that_leave_get_the_first_payment() {
    clients_that_leave_get_the_first_payment(MemoryStore::new()).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_clients_that_leave_get_the_first_payment() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = idempotency::SqliteStore::open(dir.path().join("idem.sqlite"))
        .await
        .expect("open the SQLite store");
    clients_that_leave_get_the_first_payment(store).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clients_that_leave_get_the_first_payment() {
    // Its keys are deleted when the store is dropped, also when the test fails.
    let Some(store) = idem_support::redis::fresh("idem-test-http-started").await else {
        return;
    };
    clients_that_leave_get_the_first_payment(store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clients_that_leave_get_the_first_payment() {
    let Some(store) = idem_support::postgres::store("http_started").await else {
        return;
    };
    clients_that_leave_get_the_first_payment(store).await;
}

// ---------------------------------------------------------------------------------------------
// Unknown outcomes: passed through to the first client, then refused (at most once).

#[tokio::test]
async fn a_5xx_is_passed_through_and_the_retry_is_refused_not_run_again() {
    let s = serve(layer()).await;
    let first = s.post("/fail-once/502", "bad-gateway", PAYMENT).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        first.body(),
        "processor failed with 502",
        "passed as it was"
    );
    assert!(!first.replayed());
    for _ in 0..3 {
        s.post("/fail-once/502", "bad-gateway", PAYMENT)
            .await
            .outcome_unknown();
    }
    assert_eq!(
        s.p.charges("bad-gateway"),
        1,
        "the handler that answered 502 may have charged: it is not run again"
    );
}

#[tokio::test]
async fn with_on_unknown_rerun_a_5xx_lets_the_retry_run_again() {
    let s = serve(layer().on_unknown(OnUnknown::Rerun)).await;
    let first = s.post("/fail-once/502", "rerun", PAYMENT).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    let retry = s.post("/fail-once/502", "rerun", PAYMENT).await;
    let doc = retry.created();
    assert_eq!(doc["charge"], 2);
    assert_eq!(
        s.p.charges("rerun"),
        2,
        "at least once: the retry ran the handler again"
    );
    // The second run's response is kept.
    let again = s.post("/fail-once/502", "rerun", PAYMENT).await;
    assert_eq!(again.replay()["id"], doc["id"]);
    assert_eq!(s.p.charges("rerun"), 2);
}

#[tokio::test]
async fn after_the_recovery_window_the_key_runs_again() {
    let window = Duration::from_millis(500);
    let s = serve(layer().recovery(window)).await;
    let first = s.post("/fail-once/502", "recovers", PAYMENT).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    // The unknown outcome was recorded before the 502 went out.
    let recorded_before = Instant::now();

    // Refused until the window passes, then run: asked every 50 ms.
    let deadline = recorded_before + PATIENCE;
    let mut refused = 0;
    let ran = loop {
        let reply = s.post("/fail-once/502", "recovers", PAYMENT).await;
        if reply.status != StatusCode::INTERNAL_SERVER_ERROR {
            break reply;
        }
        reply.outcome_unknown();
        assert_eq!(s.p.charges("recovers"), 1);
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "still refused {PATIENCE:?} after the unknown outcome"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = recorded_before.elapsed();
    assert!(refused >= 1, "the retry at once was refused");
    // A lower bound only, less a generous margin for the time the 502 took to reach the client.
    assert!(
        after >= window - Duration::from_millis(200),
        "ran again {after:?} after the unknown outcome, within the {window:?} window"
    );
    let doc = ran.created();
    assert_eq!(doc["charge"], 2);
    assert_eq!(s.p.charges("recovers"), 2);
    let again = s.post("/fail-once/502", "recovers", PAYMENT).await;
    assert_eq!(again.replay()["id"], doc["id"]);
    assert_eq!(s.p.charges("recovers"), 2);
}

impl Server {
    /// `POST /fails-midway` with `key`: the status the client got, and whether the body it got
    /// was complete (`Ok`), or `Err` with what failed.
    async fn post_failing_midway(&self, key: &str) -> Result<(StatusCode, Bytes), String> {
        let request = http::Request::post(format!("http://{}/fails-midway", self.addr))
            .header(CONTENT_TYPE, "application/json") // as `post` sends it: the same request
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(PAYMENT.as_bytes())))
            .unwrap();
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("no response: {e:?}"))?;
            let status = response.status();
            let body = response.into_body().collect().await;
            let body = body.map_err(|e| format!("{status}, then the body failed: {e:?}"))?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .expect("an answer or an error")
    }
}

#[tokio::test]
async fn a_body_that_fails_midway_is_an_unknown_outcome() {
    let s = serve(layer()).await;
    // What the first client gets is checked in the next test.
    let _ = s.post_failing_midway("midway").await;
    for _ in 0..2 {
        s.post("/fails-midway", "midway", PAYMENT)
            .await
            .outcome_unknown();
    }
    assert_eq!(s.p.charges("midway"), 1);
}

#[tokio::test]
async fn a_body_that_fails_midway_does_not_reach_the_client_as_a_complete_response() {
    let s = serve(layer()).await;
    // Without the layer, hyper cuts the connection before the head; with it, the client may get
    // the head and the first chunk, then the cut. Never a response that looks complete.
    match s.post_failing_midway("midway").await {
        Err(e) => assert!(!e.contains("Connect"), "{e}"),
        Ok((status, body)) => panic!(
            "the client got a complete-looking {status} with the truncated body {body:?}: \
             a body that failed midway must not be delivered as if it were whole"
        ),
    }
    assert_eq!(s.p.charges("midway"), 1);
}

#[tokio::test]
async fn a_response_over_the_limit_is_passed_through_then_refused() {
    let s = serve(layer().max_body_bytes(1024)).await;
    // Known length (not read at all) and streamed (read up to the limit, then resumed).
    for path in ["/bytes/5000", "/stream/5000"] {
        let first = s.post(path, path, "").await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(
            first.body(),
            &pattern(5000)[..],
            "{path}: passed through whole"
        );
        let retry = s.post(path, path, "").await;
        retry.outcome_unknown();
        assert_eq!(s.p.charges(path), 1, "{path}");
    }
    // At the limit, it is kept.
    s.post("/stream/1024", "small", "").await;
    let retry = s.post("/stream/1024", "small", "").await;
    assert!(retry.replayed());
    assert_eq!(retry.body(), &pattern(1024)[..]);
    assert_eq!(s.p.charges("small"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_is_passed_through_as_it_comes_and_is_an_unknown_outcome() {
    let s = serve(layer()).await;
    let mut socket = s.send_raw("/events", "sse", PAYMENT, &[]).await;
    // Read until the first event is in.
    let mut received = Vec::new();
    let first_event = b"data: {\"tick\": 0}\n\n";
    let read = async {
        let mut buf = [0u8; 4096];
        while !received
            .windows(first_event.len())
            .any(|w| w == first_event)
        {
            let n = socket.read(&mut buf).await.expect("read the stream");
            assert!(n > 0, "the server closed the stream: {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the first event arrives (the stream is not buffered)");
    let (produced, ended) = (s.p.events.load(SeqCst), s.p.events_ended.load(SeqCst));
    assert!(
        !ended,
        "the first event arrived before the handler's stream ended"
    );
    // Buffering up to the default 1 MiB limit would take some 40 000 events (half an hour).
    assert!(
        produced < 100,
        "the first event arrived while the stream ran, not after {produced} events were buffered"
    );
    let text = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(!text.contains("idempotent-replayed"), "{text}");

    // The client leaves; the stream is dropped with its connection.
    drop(socket);
    s.p.wait_for("the event stream to be dropped", || {
        s.p.events_ended.load(SeqCst)
    })
    .await;
    for _ in 0..2 {
        s.post("/events", "sse", PAYMENT).await.outcome_unknown();
    }
    assert_eq!(s.p.charges("sse"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_gets_a_500_and_is_not_run_again() {
    let s = serve(layer()).await;
    // A 500 problem, not a dropped connection.
    s.post("/panics", "panics", PAYMENT).await.outcome_unknown();
    // The unknown outcome is recorded in the background: a 409 may come first.
    let (_, retry) = s
        .retry_while_in_progress("/panics", "panics", PAYMENT)
        .await;
    retry.outcome_unknown();
    s.post("/panics", "panics", PAYMENT).await.outcome_unknown();
    assert_eq!(s.p.charges("panics"), 1);
}

// ---------------------------------------------------------------------------------------------
// Refusals that say nothing was done still release the key.

#[tokio::test]
async fn a_429_releases_the_key_so_the_retry_runs_and_a_408_is_unknown() {
    let s = serve(layer()).await;
    let (path, key) = ("/fail-once/429", "released-429");
    let first = s.post(path, key, PAYMENT).await;
    assert_eq!(first.status, 429);
    assert_eq!(first.body(), "processor failed with 429");
    assert!(!first.replayed());
    // A 429 says the request was not processed, so the retry runs it.
    let retry = s.post(path, key, PAYMENT).await;
    let doc = retry.created();
    assert_eq!(s.p.charges(key), 2, "429: two handler starts");
    let again = s.post(path, key, PAYMENT).await;
    assert_eq!(again.replay()["id"], doc["id"]);
    assert_eq!(s.p.charges(key), 2, "429");

    // A 408 may come from a timeout that cancelled the handler midway (tower-http's
    // `TimeoutLayer` inside this layer): its outcome is unknown, the retry is refused.
    let (path, key) = ("/fail-once/408", "unknown-408");
    assert_eq!(s.post(path, key, PAYMENT).await.status, 408);
    s.post(path, key, PAYMENT).await.outcome_unknown();
    assert_eq!(s.p.charges(key), 1, "408: one handler start");
}
