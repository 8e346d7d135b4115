//! The test server: an axum app behind idem's `IdempotencyLayer`, on loopback, with a charge
//! counter at the start of its handler and faults injected in front of the layer.
#![allow(dead_code)] // each test file uses part of it

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idempotency::http::IdempotencyLayer;
use idempotency::MemoryStore;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// The one place that builds the server-side layer.
pub fn idempotency_layer(require_key: bool) -> IdempotencyLayer {
    IdempotencyLayer::shared(MemoryStore::new(), "idem-client-tests").require_key(require_key)
}

/// What the server saw.
#[derive(Default)]
pub struct Counts {
    /// Handler runs: incremented as the handler's first statement.
    pub charges: AtomicUsize,
    /// Requests that reached the server (in front of the idempotency layer).
    pub requests: AtomicUsize,
    /// The bodies the handler produced, in order.
    pub produced: Mutex<Vec<String>>,
    /// Handler arrivals per request body (the first is slow).
    arrivals: Mutex<HashMap<String, usize>>,
    /// Keys a fault was already injected for.
    faulted: Mutex<HashSet<String>>,
}

impl Counts {
    pub fn charges(&self) -> usize {
        self.charges.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn produced(&self) -> Vec<String> {
        self.produced.lock().unwrap().clone()
    }
}

struct App {
    counts: Arc<Counts>,
    /// How long the first handler run for a body takes; later runs for it are immediate.
    first_run: Duration,
}

/// The charge endpoint: counts the charge first, is slow the first time it sees a body.
async fn charge(State(app): State<Arc<App>>, body: String) -> impl IntoResponse {
    let charge = app.counts.charges.fetch_add(1, Ordering::SeqCst) + 1;
    let arrival = {
        let mut arrivals = app.counts.arrivals.lock().unwrap();
        let n = arrivals.entry(body.clone()).or_default();
        *n += 1;
        *n
    };
    if arrival == 1 {
        tokio::time::sleep(app.first_run).await;
    }
    let produced = format!("charge #{charge} for {body}");
    app.counts.produced.lock().unwrap().push(produced.clone());
    (StatusCode::CREATED, produced)
}

/// In front of the idempotency layer: counts requests, and with `?fault=503` answers 503 to the
/// first request of each key (a gateway that was briefly unavailable).
async fn faults(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    app.counts.requests.fetch_add(1, Ordering::SeqCst);
    if request.uri().query() == Some("fault=503") {
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if app.counts.faulted.lock().unwrap().insert(key) {
            let mut res = (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
            res.headers_mut()
                .insert("retry-after", HeaderValue::from_static("0"));
            return res;
        }
    }
    next.run(request).await
}

/// A server on loopback whose handler's first run for a body takes `first_run`.
pub async fn serve(first_run: Duration, require_key: bool) -> (SocketAddr, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let app = Arc::new(App {
        counts: counts.clone(),
        first_run,
    });
    let router = Router::new()
        .route("/charge", post(charge))
        .with_state(app.clone())
        .layer(idempotency_layer(require_key))
        .layer(middleware::from_fn_with_state(app, faults));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, counts)
}

/// A TCP proxy to `upstream` that forwards its first connection's request, waits for the
/// response to start (the handler has run), and closes the connection instead of passing the
/// response on; later connections are forwarded both ways.
pub async fn drop_first_response(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let (mut from_client, _to_client) = client.split();
                    let (mut from_server, mut to_server) = server.split();
                    let forward = tokio::io::copy(&mut from_client, &mut to_server);
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        _ = forward => {}
                        _ = from_server.read(&mut byte) => {}
                    }
                    // Both sockets are dropped here: the client sees the connection closed.
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    addr
}
