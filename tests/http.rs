//! `idempotency::http::IdempotencyLayer` against real servers on 127.0.0.1 (port 0), driven by a real
//! HTTP client (hyper-util's). What becomes of a handler that started and did not give a
//! response that can be kept (a client that left, a 5xx, a stream, a panic) is tested in more
//! depth, against every store, in `tests/http_started.rs`.
#![cfg(feature = "http")]

use idem_support::DownStore;
use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::Router;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idempotency::http::{IdempotencyLayer, RequestBody};
use idempotency::{MemoryStore, OnUnknown, Store};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

// ---------------------------------------------------------------------------------------------
// The application under test.

#[derive(Clone)]
struct App {
    /// Handler executions, all routes together.
    runs: Arc<AtomicUsize>,
    /// Notified when a handler starts.
    started: Arc<Notify>,
    /// Handlers called with `x-wait-for-gate` wait for a permit here.
    gate: Arc<Semaphore>,
    /// Request futures the server dropped before they finished (a client went away), and a
    /// notification for each.
    abandoned: Arc<AtomicUsize>,
    dropped: Arc<Notify>,
}

impl App {
    fn new() -> Self {
        App {
            runs: Arc::default(),
            started: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            abandoned: Arc::default(),
            dropped: Arc::default(),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(SeqCst)
    }

    async fn enter(&self, headers: &HeaderMap) -> usize {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        self.started.notify_one();
        if let Some(ms) = headers.get("x-delay-ms") {
            let ms: u64 = ms.to_str().unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if headers.contains_key("x-wait-for-gate") {
            self.gate.acquire().await.unwrap().forget();
        }
        run
    }
}

/// A new payment: 201 with a random id, the run number, and the request body the handler saw.
async fn create_payment(
    State(app): State<App>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = app.enter(&headers).await;
    let doc = json!({
        "id": format!("pay_{:016x}", rand::random::<u64>()),
        "run": run,
        "method": method.as_str(),
        "request": String::from_utf8_lossy(&body),
    });
    (
        StatusCode::CREATED,
        [
            (CONTENT_TYPE, "application/json"),
            (LOCATION, "/payments/1"),
            (http::HeaderName::from_static("x-first-only"), "yes"),
        ],
        doc.to_string(),
    )
        .into_response()
}

async fn list_payments(State(app): State<App>, headers: HeaderMap) -> Response {
    let run = app.enter(&headers).await;
    format!("listing {run}").into_response()
}

/// Answers with the status in the path.
async fn with_status(
    State(app): State<App>,
    headers: HeaderMap,
    Path(code): Path<u16>,
) -> Response {
    let run = app.enter(&headers).await;
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status {code}, run {run}"),
    )
        .into_response()
}

/// Fails with 500 on its first run, then succeeds.
async fn flaky(State(app): State<App>, headers: HeaderMap) -> Response {
    let run = app.enter(&headers).await;
    if run == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "processor down").into_response()
    } else {
        (StatusCode::CREATED, format!("created on run {run}")).into_response()
    }
}

/// `n` bytes, not UTF-8, in one piece (the length is known).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ 0x80).collect()
}

async fn bytes(State(app): State<App>, headers: HeaderMap, Path(n): Path<usize>) -> Response {
    app.enter(&headers).await;
    ([(CONTENT_TYPE, "application/octet-stream")], pattern(n)).into_response()
}

/// `n` bytes in chunks of 1000, length unknown in advance.
async fn stream(State(app): State<App>, headers: HeaderMap, Path(n): Path<usize>) -> Response {
    app.enter(&headers).await;
    let chunks: Vec<Result<Bytes, Infallible>> = pattern(n)
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

/// Echoes the request body and the `x-custom` header.
async fn echo(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let run = app.enter(&headers).await;
    let custom = headers
        .get("x-custom")
        .cloned()
        .unwrap_or(http::HeaderValue::from_static("none"));
    (
        [
            (http::HeaderName::from_static("x-custom"), custom),
            (http::HeaderName::from_static("x-run"), run.into()),
        ],
        body,
    )
        .into_response()
}

/// Counts a request future the server drops before it finishes.
struct Unfinished {
    app: App,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.armed {
            self.app.abandoned.fetch_add(1, SeqCst);
            self.app.dropped.notify_one();
        }
    }
}

/// The outermost middleware: sees the server drop a request's future.
async fn probe(State(app): State<App>, req: axum::extract::Request, next: Next) -> Response {
    let mut unfinished = Unfinished { app, armed: true };
    let response = next.run(req).await;
    unfinished.armed = false;
    response
}

fn router(app: &App) -> Router<()> {
    Router::new()
        .route(
            "/payments",
            post(create_payment)
                .patch(create_payment)
                .get(list_payments),
        )
        .route("/status/{code}", post(with_status))
        .route("/flaky", post(flaky))
        .route("/bytes/{n}", post(bytes))
        .route("/stream/{n}", post(stream))
        .route("/echo", put(echo).post(echo))
        .with_state(app.clone())
}

/// The layer most tests use: a fresh memory store, `Location` replayed, scoped by the
/// `x-principal` header (the test client sends `x-principal: tester` unless told otherwise); a
/// request without one, or with one that is not visible ASCII, is refused.
fn layer() -> IdempotencyLayer {
    layer_with(MemoryStore::new())
}

fn layer_with(store: impl Store + 'static) -> IdempotencyLayer {
    IdempotencyLayer::per_client(std::sync::Arc::new(store), |req| {
        let principal = req.headers.get("x-principal")?.to_str().ok()?;
        Some(principal.to_owned())
    })
    .replay_headers(["location"])
}

// ---------------------------------------------------------------------------------------------
// Server and client.

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, BoxBody<Bytes, Infallible>>,
    app: App,
}

/// Serves `router(app)` behind `layer` with axum on 127.0.0.1:0 until the test's runtime ends.
async fn serve(layer: IdempotencyLayer) -> Server {
    let app = App::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = router(&app)
        .layer(layer)
        .layer(middleware::from_fn_with_state(app.clone(), probe));
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    Server {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        app,
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
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

    /// Checks this is an RFC 9457 problem document with `status`, and returns it.
    fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers[CONTENT_TYPE], "application/problem+json");
        let doc = self.json();
        assert_eq!(doc["status"], status);
        for member in ["type", "title", "detail"] {
            assert!(
                doc[member].as_str().is_some_and(|s| !s.is_empty()),
                "{member} in {doc}"
            );
        }
        assert!(doc["type"].as_str().unwrap().starts_with("https://"));
        doc
    }
}

impl Server {
    /// A request from the principal `tester`.
    fn request(&self, method: Method, path: &str) -> http::request::Builder {
        self.request_as(Some(b"tester"), method, path)
    }

    /// A request from `principal` (its `x-principal` header, any bytes), or from no one.
    fn request_as(
        &self,
        principal: Option<&[u8]>,
        method: Method,
        path: &str,
    ) -> http::request::Builder {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path));
        match principal {
            Some(who) => request.header("x-principal", http::HeaderValue::from_bytes(who).unwrap()),
            None => request,
        }
    }

    async fn send(&self, request: http::request::Builder, body: impl Into<Bytes>) -> Reply {
        let body = Full::new(body.into()).boxed();
        self.send_body(request, body).await
    }

    async fn send_body(
        &self,
        request: http::request::Builder,
        body: BoxBody<Bytes, Infallible>,
    ) -> Reply {
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let (head, body) = response.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// `POST path` with an optional key and a body.
    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        let mut request = self
            .request(Method::POST, path)
            .header(CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request, body.to_owned()).await
    }
}

const PAYMENT: &str = r#"{"amount": 500, "currency": "usd"}"#;

// ---------------------------------------------------------------------------------------------
// Replay.

#[tokio::test]
async fn a_completed_request_is_replayed_byte_for_byte_with_its_headers() {
    let s = serve(layer()).await;
    let first = s.post("/payments", Some("order-1"), PAYMENT).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(
        first.headers["x-first-only"], "yes",
        "the first response has all its headers"
    );
    assert_eq!(
        first.json()["request"],
        PAYMENT,
        "the handler got the buffered body intact"
    );

    let retry = s.post("/payments", Some("order-1"), PAYMENT).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body, "same bytes");
    assert_eq!(retry.headers[CONTENT_TYPE], first.headers[CONTENT_TYPE]);
    assert_eq!(
        retry.headers[LOCATION], first.headers[LOCATION],
        "listed headers are replayed"
    );
    assert!(
        retry.headers.get("x-first-only").is_none(),
        "unlisted headers are not"
    );

    // The draft's structured-field form `"order-1"` names the same key.
    let quoted = s.post("/payments", Some("\"order-1\""), PAYMENT).await;
    assert!(quoted.replayed());
    assert_eq!(quoted.body, first.body);
    assert_eq!(s.app.runs(), 1);
}

#[tokio::test]
async fn binary_bodies_are_replayed_byte_for_byte() {
    let s = serve(layer()).await;
    let first = s.post("/bytes/3000", Some("b"), "").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, pattern(3000));
    let retry = s.post("/bytes/3000", Some("b"), "").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, pattern(3000));
    assert_eq!(retry.headers[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(s.app.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// Keys: 400.

#[tokio::test]
async fn a_missing_key_is_400_and_the_handler_does_not_run() {
    let s = serve(layer()).await;
    let reply = s.post("/payments", None, PAYMENT).await;
    let doc = reply.problem(400);
    assert!(
        doc["detail"].as_str().unwrap().contains("Idempotency-Key"),
        "{doc}"
    );
    assert_eq!(s.app.runs(), 0);
}

#[tokio::test]
async fn a_missing_key_passes_through_when_not_required() {
    let s = serve(layer().require_key(false)).await;
    let a = s.post("/payments", None, PAYMENT).await;
    let b = s.post("/payments", None, PAYMENT).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!a.replayed() && !b.replayed());
    assert_ne!(a.json()["id"], b.json()["id"]);
    assert_eq!(s.app.runs(), 2);
    // With a key, it is still idempotent.
    let c = s.post("/payments", Some("k"), PAYMENT).await;
    let d = s.post("/payments", Some("k"), PAYMENT).await;
    assert!(!c.replayed() && d.replayed());
    assert_eq!(s.app.runs(), 3);
}

#[tokio::test]
async fn empty_overlong_and_repeated_keys_are_400() {
    let s = serve(layer()).await;
    s.post("/payments", Some(""), PAYMENT).await.problem(400);
    s.post("/payments", Some("\"\""), PAYMENT)
        .await
        .problem(400);
    let doc = s
        .post("/payments", Some(&"k".repeat(256)), PAYMENT)
        .await
        .problem(400);
    assert!(doc["detail"].as_str().unwrap().contains("255"), "{doc}");
    let twice = s
        .request(Method::POST, "/payments")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b");
    s.send(twice, PAYMENT).await.problem(400);
    assert_eq!(s.app.runs(), 0);

    let longest = s.post("/payments", Some(&"k".repeat(255)), PAYMENT).await;
    assert_eq!(longest.status, StatusCode::CREATED);
    assert_eq!(s.app.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// Conflicts: 409 and 422.

#[tokio::test]
async fn the_same_key_in_flight_is_409_with_retry_after() {
    let s = Arc::new(serve(layer()).await);
    let first = tokio::spawn({
        let s = s.clone();
        async move {
            let request = s
                .request(Method::POST, "/payments")
                .header(CONTENT_TYPE, "application/json") // as `post` sends it: same request
                .header("idempotency-key", "slow")
                .header("x-wait-for-gate", "1");
            s.send(request, PAYMENT).await
        }
    });
    s.app.started.notified().await;

    // Same request: 409. (The gate header is not part of the fingerprint.)
    let conflict = s.post("/payments", Some("slow"), PAYMENT).await;
    let doc = conflict.problem(409);
    assert_eq!(conflict.headers[RETRY_AFTER], "1");
    assert!(!conflict.body.windows(6).any(|w| w == b"amount"), "{doc}");
    // A different request with the key in flight is a misuse of the key: 422.
    s.post("/payments", Some("slow"), r#"{"amount": 1}"#)
        .await
        .problem(422);

    s.app.gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = s.post("/payments", Some("slow"), PAYMENT).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(s.app.runs(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422_and_reveals_nothing() {
    let s = serve(layer()).await;
    let first = s.post("/payments", Some("k"), PAYMENT).await;
    let id = first.json()["id"].as_str().unwrap().to_owned();

    let other_body = s
        .post(
            "/payments",
            Some("k"),
            r#"{"amount": 900, "currency": "usd"}"#,
        )
        .await;
    let other_query = s.post("/payments?expand=all", Some("k"), PAYMENT).await;
    let other_path = s.post("/echo", Some("k"), PAYMENT).await;
    let other_method = s
        .send(
            s.request(Method::PATCH, "/payments")
                .header("idempotency-key", "k"),
            PAYMENT,
        )
        .await;
    for reply in [other_body, other_query, other_path, other_method] {
        let doc = reply.problem(422);
        let text = String::from_utf8_lossy(&reply.body);
        for secret in [id.as_str(), "500", "usd", "amount"] {
            assert!(!text.contains(secret), "422 reveals {secret:?}: {doc}");
        }
    }
    assert_eq!(s.app.runs(), 1);
    assert!(
        s.post("/payments", Some("k"), PAYMENT).await.replayed(),
        "the original still replays"
    );
}

#[tokio::test]
async fn fifty_concurrent_duplicates_run_the_handler_once() {
    let s = Arc::new(serve(layer()).await);
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (s, start) = (s.clone(), start.clone());
            tokio::spawn(async move {
                let request = s
                    .request(Method::POST, "/payments")
                    .header(CONTENT_TYPE, "application/json") // as `post` sends it: same request
                    .header("idempotency-key", "dup")
                    .header("x-delay-ms", "100");
                start.wait().await;
                s.send(request, PAYMENT).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(s.app.runs(), 1, "exactly one execution");
    let fresh: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED && !r.replayed())
        .collect();
    assert_eq!(fresh.len(), 1, "one fresh response");
    for r in &replies {
        match r.status {
            StatusCode::CREATED => assert_eq!(r.body, fresh[0].body),
            StatusCode::CONFLICT => assert_eq!(r.headers[RETRY_AFTER], "1"),
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    let later = s.post("/payments", Some("dup"), PAYMENT).await;
    assert!(later.replayed());
    assert_eq!(later.body, fresh[0].body);
}

// ---------------------------------------------------------------------------------------------
// Scopes.

#[tokio::test]
async fn scopes_keep_principals_apart() {
    let s = serve(layer()).await;
    let as_ = |who: &'static str, body: &'static str| {
        let request = s
            .request_as(Some(who.as_bytes()), Method::POST, "/payments")
            .header("idempotency-key", "same-key");
        s.send(request, body)
    };
    let alice = as_("alice", PAYMENT).await;
    let bob = as_("bob", PAYMENT).await;
    assert!(
        !alice.replayed() && !bob.replayed(),
        "bob does not get alice's response"
    );
    assert_ne!(alice.json()["id"], bob.json()["id"]);
    // Carol's different body is not a 422: alice's record is invisible to her.
    let carol = as_("carol", r#"{"amount": 1}"#).await;
    assert_eq!(carol.status, StatusCode::CREATED);
    assert!(!carol.replayed());
    assert_eq!(s.app.runs(), 3);

    assert_eq!(as_("alice", PAYMENT).await.body, alice.body);
    assert_eq!(as_("bob", PAYMENT).await.body, bob.body);
    assert_eq!(s.app.runs(), 3);
}

#[tokio::test]
async fn two_principals_with_the_same_key_and_body_each_get_their_own_response() {
    let s = serve(layer()).await;
    let post_as = |who: &'static str| {
        let request = s
            .request_as(Some(who.as_bytes()), Method::POST, "/payments")
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", "order-1");
        s.send(request, PAYMENT)
    };
    let alice = post_as("alice").await;
    assert_eq!(s.app.runs(), 1);
    let bob = post_as("bob").await;
    assert_eq!(s.app.runs(), 2, "bob's request ran the handler: once each");
    assert_eq!(
        (alice.status, bob.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!bob.replayed(), "bob does not get alice's response");
    assert_ne!(alice.json()["id"], bob.json()["id"]);
    assert_eq!(bob.json()["run"], 2);
    // Each retry replays its own principal's response, and nothing runs again.
    for _ in 0..2 {
        let (alice_again, bob_again) = (post_as("alice").await, post_as("bob").await);
        assert!(alice_again.replayed() && bob_again.replayed());
        assert_eq!(alice_again.body, alice.body);
        assert_eq!(bob_again.body, bob.body);
    }
    assert_eq!(s.app.runs(), 2);
}

#[tokio::test]
async fn a_client_that_cannot_be_identified_is_refused_and_the_handler_does_not_run() {
    let s = serve(layer()).await;
    // A stored response another client could otherwise reach.
    let owner = s.post("/payments", Some("order-1"), PAYMENT).await;
    assert_eq!(owner.status, StatusCode::CREATED);
    // No principal, an empty one, and two that are not visible ASCII (which would have
    // merged into one fallback scope): each is refused, none gets the stored response.
    let unknown: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"caf\xc3\xa9"), Some(b"\xffbob")];
    for who in unknown {
        let request = s
            .request_as(who, Method::POST, "/payments")
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", "order-1");
        let reply = s.send(request, PAYMENT).await;
        let doc = reply.problem(401);
        assert!(
            doc["type"]
                .as_str()
                .unwrap()
                .ends_with("#client-unidentified"),
            "{doc}"
        );
        assert!(!reply.body.windows(4).any(|w| w == b"pay_"), "{doc}");
    }
    assert_eq!(s.app.runs(), 1, "only the identified client's request ran");
    // Requests the layer does not apply to need no principal.
    let listing = s
        .send(s.request_as(None, Method::GET, "/payments"), "")
        .await;
    assert_eq!(listing.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Fingerprints of JSON bodies: the canonical form.

/// `POST /payments` with `key`, `content_type` and `body`.
async fn post_typed(s: &Server, key: &str, content_type: &str, body: &'static str) -> Reply {
    let request = s
        .request(Method::POST, "/payments")
        .header(CONTENT_TYPE, content_type)
        .header("idempotency-key", key);
    s.send(request, body).await
}

#[tokio::test]
async fn json_that_differs_in_key_order_or_whitespace_is_the_same_request() {
    let s = serve(layer()).await;
    let first = post_typed(
        &s,
        "j",
        "application/json",
        r#"{"amount":500,"currency":"usd","meta":{"a":1,"b":[1,2]}}"#,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    for (content_type, body) in [
        ("application/json", r#"{"currency":"usd","meta":{"b":[1,2],"a":1},"amount":500}"#),
        ("application/json; charset=utf-8", "{\n  \"amount\": 500,\n  \"currency\": \"usd\",\n  \"meta\": { \"a\": 1, \"b\": [ 1, 2 ] }\n}\n"),
        ("application/merge-patch+json", r#"{"meta":{"a":1,"b":[1,2]},"currency":"\u0075sd","amount":500}"#),
    ] {
        let retry = post_typed(&s, "j", content_type, body).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{body}: {retry:?}");
        assert!(retry.replayed(), "{body}");
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(s.app.runs(), 1);

    // Different JSON: 422, whatever its layout.
    for body in [
        r#"{"currency":"usd","meta":{"b":[2,1],"a":1},"amount":500}"#,
        r#"{"amount":500.0,"currency":"usd","meta":{"a":1,"b":[1,2]}}"#,
        r#"{"amount":500,"currency":"usd","meta":{"a":1,"b":[1,2]},"extra":null}"#,
    ] {
        post_typed(&s, "j", "application/json", body)
            .await
            .problem(422);
    }
    assert_eq!(s.app.runs(), 1);
}

#[tokio::test]
async fn other_bodies_stay_byte_exact() {
    let s = serve(layer()).await;
    let first = post_typed(&s, "t", "text/plain", r#"{"a":1,"b":2}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The same JSON text, reordered, but not sent as JSON: another request.
    post_typed(&s, "t", "text/plain", r#"{"b":2,"a":1}"#)
        .await
        .problem(422);
    post_typed(&s, "t", "text/plain", r#"{"a": 1, "b": 2}"#)
        .await
        .problem(422);
    assert!(post_typed(&s, "t", "text/plain", r#"{"a":1,"b":2}"#)
        .await
        .replayed());
    // Invalid JSON under a JSON type counts by its bytes.
    let broken = post_typed(&s, "broken", "application/json", r#"{"a":1,"b":}"#).await;
    assert_eq!(broken.status, StatusCode::CREATED);
    post_typed(&s, "broken", "application/json", r#"{"b":, "a":1}"#)
        .await
        .problem(422);
    post_typed(&s, "broken", "application/json", r#"{"a":1,"b": }"#)
        .await
        .problem(422);
    assert!(
        post_typed(&s, "broken", "application/json", r#"{"a":1,"b":}"#)
            .await
            .replayed()
    );
    assert_eq!(s.app.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// Limits per scope.

/// `POST path` with `key` as `who`.
async fn post_as(s: &Server, who: &str, path: &str, key: &str) -> Reply {
    let request = s
        .request_as(Some(who.as_bytes()), Method::POST, path)
        .header(CONTENT_TYPE, "application/json")
        .header("idempotency-key", key);
    s.send(request, PAYMENT).await
}

#[tokio::test]
async fn a_scope_at_its_record_limit_is_refused_new_keys_and_keeps_its_replays() {
    let ttl = Duration::from_secs(2);
    let s = serve(layer().limit_per_scope(2, u64::MAX).ttl(ttl)).await;
    let k1 = post_as(&s, "alice", "/payments", "k1").await;
    let k2 = post_as(&s, "alice", "/payments", "k2").await;
    assert_eq!(
        (k1.status, k2.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(s.app.runs(), 2);

    let refused = post_as(&s, "alice", "/payments", "k3").await;
    let doc = refused.problem(429);
    assert!(
        doc["type"]
            .as_str()
            .unwrap()
            .ends_with("#too-many-kept-responses"),
        "{doc}"
    );
    let retry_after: u64 = refused.headers[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=ttl.as_secs()).contains(&retry_after), "{retry_after}");
    assert_eq!(s.app.runs(), 2, "the handler did not run");
    // Its existing keys are still replayed; other scopes are not affected.
    let again = post_as(&s, "alice", "/payments", "k1").await;
    assert!(again.replayed());
    assert_eq!(again.body, k1.body);
    assert_eq!(
        post_as(&s, "bob", "/payments", "k3").await.status,
        StatusCode::CREATED
    );
    assert_eq!(s.app.runs(), 3);
    // The refusal kept nothing and released the key: once alice's responses expired, k3 runs.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let later = post_as(&s, "alice", "/payments", "k3").await;
    assert_eq!(later.status, StatusCode::CREATED);
    assert!(!later.replayed());
    assert_eq!(s.app.runs(), 4);
}

#[tokio::test]
async fn a_scope_at_its_byte_limit_is_refused_new_keys() {
    let s = serve(layer().limit_per_scope(1000, 1000)).await;
    // 600 bytes each: under the limit after the first, at or over it after the second.
    for key in ["b1", "b2"] {
        assert_eq!(
            post_as(&s, "alice", "/bytes/600", key).await.status,
            StatusCode::OK
        );
    }
    post_as(&s, "alice", "/bytes/600", "b3").await.problem(429);
    post_as(&s, "alice", "/payments", "small")
        .await
        .problem(429);
    assert!(post_as(&s, "alice", "/bytes/600", "b2").await.replayed());
    assert_eq!(s.app.runs(), 2);
    // Responses that are not kept do not count.
    let s = serve(layer().limit_per_scope(1, 1)).await;
    for key in ["a", "b", "c"] {
        let reply = post_as(&s, "alice", "/status/429", key).await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "the handler's own 429"
        );
        assert!(reply
            .headers
            .get(CONTENT_TYPE)
            .is_none_or(|v| v != "application/problem+json"));
    }
    assert_eq!(s.app.runs(), 3);
}

// ---------------------------------------------------------------------------------------------
// Which responses are kept.

#[tokio::test]
async fn server_errors_are_passed_through_then_refused_as_unknown_outcomes() {
    // The default, at most once: the 500 goes to the first client as it was; the handler may
    // have done its work, so the key is refused rather than run again.
    let s = serve(layer()).await;
    let failed = s.post("/flaky", Some("k"), "{}").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.body, "processor down", "passed through as it was");
    assert!(!failed.replayed());
    for _ in 0..2 {
        let retry = s.post("/flaky", Some("k"), "{}").await;
        let doc = retry.problem(500);
        assert!(
            doc["type"].as_str().unwrap().ends_with("#outcome-unknown"),
            "{doc}"
        );
        assert!(!retry.replayed());
    }
    assert_eq!(s.app.runs(), 1);

    // At least once, on request: the retry runs again, and its response is kept.
    let s = serve(layer().on_unknown(OnUnknown::Rerun)).await;
    let failed = s.post("/flaky", Some("k"), "{}").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = s.post("/flaky", Some("k"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(retry.body, "created on run 2");
    let again = s.post("/flaky", Some("k"), "{}").await;
    assert!(again.replayed());
    assert_eq!(again.body, "created on run 2");
    assert_eq!(s.app.runs(), 2);
}

#[tokio::test]
async fn client_errors_are_kept_but_429_is_not_by_default() {
    let s = serve(layer()).await;
    let first = s.post("/status/404", Some("a"), "").await;
    let retry = s.post("/status/404", Some("a"), "").await;
    assert_eq!(retry.status, 404);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(s.app.runs(), 1);

    s.post("/status/429", Some("b"), "").await;
    let retry = s.post("/status/429", Some("b"), "").await;
    assert_eq!(retry.status, 429);
    assert!(!retry.replayed());
    assert_eq!(retry.body, "status 429, run 3");
}

#[tokio::test]
async fn kept_statuses_are_configurable() {
    let s = serve(layer().keep_status(200..300)).await;
    s.post("/status/409", Some("a"), "").await;
    let retry = s.post("/status/409", Some("a"), "").await;
    assert!(!retry.replayed());
    assert_eq!(retry.body, "status 409, run 2");

    let s = serve(
        layer().keep_status(|status: StatusCode| status.is_server_error() || status.is_success()),
    )
    .await;
    s.post("/status/503", Some("a"), "").await;
    let retry = s.post("/status/503", Some("a"), "").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "status 503, run 1");
}

// ---------------------------------------------------------------------------------------------
// Body limits.

#[tokio::test]
async fn request_bodies_over_the_limit_are_413() {
    let s = serve(layer().max_body_bytes(1024)).await;
    // Declared length over the limit: refused before reading.
    let doc = s
        .post("/payments", Some("a"), &"x".repeat(1025))
        .await
        .problem(413);
    assert!(doc["detail"].as_str().unwrap().contains("1024"), "{doc}");
    // Chunked, no declared length: refused once the limit is passed.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..3)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 600]))))
        .collect();
    let chunked = StreamBody::new(futures::stream::iter(chunks)).boxed();
    let request = s
        .request(Method::POST, "/payments")
        .header("idempotency-key", "b");
    s.send_body(request, chunked).await.problem(413);
    assert_eq!(s.app.runs(), 0);

    let at_limit = s.post("/payments", Some("c"), &"x".repeat(1024)).await;
    assert_eq!(at_limit.status, StatusCode::CREATED);
    assert_eq!(at_limit.json()["request"].as_str().unwrap().len(), 1024);
}

#[tokio::test]
async fn responses_over_the_limit_are_passed_through_then_refused_as_unknown_outcomes() {
    let s = serve(layer().max_body_bytes(1024)).await;
    // Known length (refused without reading) and streamed (read up to the limit, then resumed).
    for path in ["/bytes/5000", "/stream/5000"] {
        let runs = s.app.runs();
        let first = s.post(path, Some(path), "").await;
        assert_eq!(first.status, 200);
        assert!(first.body == pattern(5000), "{path}: passed through whole");
        // Not kept, and the handler ran: its outcome is unknown, the key is refused.
        let retry = s.post(path, Some(path), "").await;
        let doc = retry.problem(500);
        assert!(
            doc["type"].as_str().unwrap().ends_with("#outcome-unknown"),
            "{path}: {doc}"
        );
        assert_eq!(
            s.app.runs(),
            runs + 1,
            "{path}: the retry did not run again"
        );
    }
    // At the limit, a streamed body is kept.
    s.post("/stream/1024", Some("small"), "").await;
    let retry = s.post("/stream/1024", Some("small"), "").await;
    assert!(retry.replayed());
    assert!(retry.body == pattern(1024));
}

// ---------------------------------------------------------------------------------------------
// Other methods.

#[tokio::test]
async fn other_methods_pass_through_untouched() {
    let s = serve(layer().max_body_bytes(16)).await;
    for _ in 0..2 {
        let reply = s
            .send(
                s.request(Method::GET, "/payments")
                    .header("idempotency-key", "g"),
                "",
            )
            .await;
        assert_eq!(reply.status, 200);
        assert!(!reply.replayed());
    }
    assert_eq!(s.app.runs(), 2, "GET ran each time");
    // PUT is not in the default methods: no key needed, no body limit, headers and body intact.
    let body = "a body well over the sixteen-byte limit";
    let put = |key: Option<&'static str>| {
        let mut request = s.request(Method::PUT, "/echo").header("x-custom", "kept");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        s.send(request, body)
    };
    for key in [None, Some("p"), Some("p")] {
        let reply = put(key).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, body);
        assert_eq!(reply.headers["x-custom"], "kept");
        assert!(!reply.replayed());
    }
    assert_eq!(s.app.runs(), 5);

    // Methods are configurable.
    let s = serve(layer().methods([Method::PUT])).await;
    let first = s
        .send(
            s.request(Method::PUT, "/echo")
                .header("idempotency-key", "p"),
            "x",
        )
        .await;
    let retry = s
        .send(
            s.request(Method::PUT, "/echo")
                .header("idempotency-key", "p"),
            "x",
        )
        .await;
    assert!(!first.replayed() && retry.replayed());
    assert_eq!(
        s.post("/payments", None, PAYMENT).await.status,
        StatusCode::CREATED,
        "POST now passes"
    );
}

// ---------------------------------------------------------------------------------------------
// Claims: a client that goes away, lease renewal, store failure.

#[tokio::test]
async fn a_client_that_disconnects_does_not_stop_the_handler() {
    let s = serve(layer()).await;
    let mut socket = TcpStream::connect(s.addr).await.unwrap();
    socket
        .write_all(
            format!(
                "POST /payments HTTP/1.1\r\nhost: {}\r\nidempotency-key: gone\r\nx-principal: tester\r\nx-wait-for-gate: 1\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{PAYMENT}",
                s.addr,
                PAYMENT.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    s.app.started.notified().await;
    assert_eq!(
        s.post("/payments", Some("gone"), PAYMENT).await.status,
        StatusCode::CONFLICT
    );
    drop(socket);

    // The server notices the closed connection and drops the request's future (which used to
    // release the claim, so that the retry ran the handler again)...
    tokio::time::timeout(Duration::from_secs(10), s.app.dropped.notified())
        .await
        .expect("the server dropped the request of the client that left");
    assert_eq!(s.app.abandoned.load(SeqCst), 1);
    // ... but the handler runs on: the retry is told it is in progress.
    s.post("/payments", Some("gone"), PAYMENT)
        .await
        .problem(409);

    // Once it finishes, its response is replayed.
    s.app.gate.add_permits(1);
    let mut retry = None;
    for _ in 0..200 {
        let reply = s.post("/payments", Some("gone"), PAYMENT).await;
        if reply.status != StatusCode::CONFLICT {
            retry = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retry = retry.expect("the handler never finished");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.json()["run"], 1);
    assert_eq!(s.app.runs(), 1);
}

#[tokio::test]
async fn the_lease_is_renewed_while_the_handler_runs() {
    // Lease 500 ms, renewed every ~167 ms; the handler takes 1.8 s. Without renewal the second
    // request (at 1.1 s, twice the lease) would take the claim over and run the handler again.
    let s = Arc::new(serve(layer().lease(Duration::from_millis(500))).await);
    let first = tokio::spawn({
        let s = s.clone();
        async move {
            let request = s
                .request(Method::POST, "/payments")
                .header(CONTENT_TYPE, "application/json") // as `post` sends it: same request
                .header("idempotency-key", "long")
                .header("x-delay-ms", "1800");
            s.send(request, PAYMENT).await
        }
    });
    s.app.started.notified().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.post("/payments", Some("long"), PAYMENT)
        .await
        .problem(409);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        s.post("/payments", Some("long"), PAYMENT).await.body,
        first.body
    );
    assert_eq!(s.app.runs(), 1);
}

#[tokio::test]
async fn a_failing_store_fails_closed_with_503() {
    let s = serve(layer_with(DownStore {
        message: "connection refused to db.internal:6379",
    }))
    .await;
    let reply = s.post("/payments", Some("k"), PAYMENT).await;
    reply.problem(503);
    assert_eq!(reply.headers[RETRY_AFTER], "1");
    assert!(
        !String::from_utf8_lossy(&reply.body).contains("db.internal"),
        "backend details stay private"
    );
    assert_eq!(s.app.runs(), 0, "no claim, no run");
}

// ---------------------------------------------------------------------------------------------
// Plain hyper + tower, no axum; two servers sharing one store.

#[tokio::test]
async fn works_on_a_plain_tower_service_served_by_hyper() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let runs = runs.clone();
        let handler = tower::service_fn(move |req: Request<RequestBody<hyper::body::Incoming>>| {
            let runs = runs.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                let run = runs.fetch_add(1, SeqCst) + 1;
                let response = http::Response::builder()
                    .status(StatusCode::ACCEPTED)
                    .header(CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from(format!(
                        "run {run} got {} bytes",
                        body.len()
                    ))))
                    .unwrap();
                Ok::<_, hyper::Error>(response)
            }
        });
        // One client, two servers: a shared scope, named as such.
        let layer = IdempotencyLayer::shared(store.clone(), "jobs-of-the-one-client");
        let service = tower::Layer::layer(&layer, handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut bodies = HashSet::new();
    for addr in [addrs[0], addrs[1], addrs[0]] {
        let request = Request::post(format!("http://{addr}/jobs"))
            .header("idempotency-key", "job-1")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        bodies.insert(response.into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(
        bodies,
        HashSet::from([Bytes::from_static(b"run 1 got 7 bytes")]),
        "both servers replay one run"
    );
    assert_eq!(runs.load(SeqCst), 1);
}
