//! Timeouts and the handler's own "not now" (issue 19 item 3, issue 20 item 1): tower-http's
//! `TimeoutLayer` on either side of `IdempotencyLayer`, and handlers that answer 503 or set
//! `Retry-After`, against a real axum server on 127.0.0.1. Handler starts are counted on the
//! handler's first line.
//!
//! - Timeout **inside** (between the layer and the handler): the timeout cancels the handler
//!   midway and answers 408; that is an unknown outcome, not "nothing was done": 3 POSTs, 1
//!   handler start, the retries refused with `500 #outcome-unknown`.
//! - Timeout **outside** (the README's advice): the timeout drops the layer's future; the handler
//!   runs on by itself and its response is kept: 3 POSTs, 1 start, the last one a replay.
//! - A 504 from inside is an unknown outcome too; a 503, or a 500 with `Retry-After`, releases the
//!   key at once: the retry runs the handler again.
#![cfg(feature = "http")]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use idempotency::http::IdempotencyLayer;
use idempotency::MemoryStore;
use tower_http::timeout::TimeoutLayer;

/// The handler takes this long; the timeouts are shorter.
const HANDLER: Duration = Duration::from_millis(600);
const TIMEOUT: Duration = Duration::from_millis(150);

#[derive(Clone, Default)]
struct Counts {
    starts: Arc<AtomicUsize>,
}

/// A slow payment handler that counts its start on its first line.
async fn slow(counts: Counts) -> impl IntoResponse {
    let n = counts.starts.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(HANDLER).await;
    (StatusCode::CREATED, format!("pay_{n}"))
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::shared(MemoryStore::new(), "timeouts")
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// POSTs `/pay` with `key`: the status, `Idempotent-Replayed`, and the body.
async fn post_pay(addr: std::net::SocketAddr, key: &str) -> (u16, bool, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{addr}/pay"))
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("an answer within 10 s")
        .expect("a response");
    let status = res.status().as_u16();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Where the timeout stands relative to `IdempotencyLayer`.
#[derive(Clone, Copy)]
enum Timeout {
    /// Between the layer and the handler (axum's order: the last `.layer` runs first).
    Inside(StatusCode),
    /// Around the layer: it runs first, and drops the layer's future, not the handler.
    Outside,
}

/// The slow payment handler behind the layer and a tower-http `TimeoutLayer` of `TIMEOUT`.
fn slow_app(counts: &Counts, timeout: Timeout) -> Router {
    let counts = counts.clone();
    let app = Router::new().route("/pay", post(move || slow(counts)));
    match timeout {
        Timeout::Inside(status) => app
            .layer(TimeoutLayer::with_status_code(status, TIMEOUT))
            .layer(layer()),
        Timeout::Outside => app.layer(layer()).layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            TIMEOUT,
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_inside_the_layer_is_an_unknown_outcome_not_a_rerun() {
    let counts = Counts::default();
    let addr = serve(slow_app(
        &counts,
        Timeout::Inside(StatusCode::REQUEST_TIMEOUT),
    ))
    .await;
    let first = post_pay(addr, "inside").await;
    assert_eq!(first.0, 408, "the inner timeout's answer passes through");
    for _ in 0..2 {
        let retry = post_pay(addr, "inside").await;
        assert_eq!(retry.0, 500, "refused: {retry:?}");
        assert!(retry.2.contains("outcome-unknown"), "{retry:?}");
    }
    tokio::time::sleep(HANDLER).await;
    assert_eq!(
        counts.starts.load(SeqCst),
        1,
        "3 POSTs, 1 handler start: a cancelled handler is not run again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_from_inside_is_an_unknown_outcome() {
    let counts = Counts::default();
    let addr = serve(slow_app(
        &counts,
        Timeout::Inside(StatusCode::GATEWAY_TIMEOUT),
    ))
    .await;
    assert_eq!(post_pay(addr, "gw").await.0, 504);
    assert_eq!(post_pay(addr, "gw").await.0, 500);
    tokio::time::sleep(HANDLER).await;
    assert_eq!(counts.starts.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_outside_the_layer_lets_the_handler_finish_and_replays_it() {
    let counts = Counts::default();
    let addr = serve(slow_app(&counts, Timeout::Outside)).await;
    let first = post_pay(addr, "outside").await;
    assert_eq!(first.0, 408, "the client saw the outer timeout");
    let during = post_pay(addr, "outside").await;
    assert!(
        during.0 == 409 || during.0 == 408,
        "while the handler runs on: 409 (or the outer timeout again): {during:?}"
    );
    tokio::time::sleep(HANDLER).await;
    let after = post_pay(addr, "outside").await;
    assert_eq!((after.0, after.1, after.2.as_str()), (201, true, "pay_1"));
    assert_eq!(counts.starts.load(SeqCst), 1, "3 POSTs, 1 handler start");
}

/// A handler whose dependency is down twice, then up: it answers 503 (or 500 with
/// `Retry-After`) without doing anything, then 201.
fn flaky(counts: Counts, answer: fn() -> axum::response::Response) -> Router {
    Router::new()
        .route(
            "/pay",
            post(move || {
                let counts = counts.clone();
                async move {
                    let n = counts.starts.fetch_add(1, SeqCst) + 1;
                    if n <= 2 {
                        answer()
                    } else {
                        (StatusCode::CREATED, format!("pay_{n}")).into_response()
                    }
                }
            }),
        )
        .layer(layer())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_releases_the_key_and_the_retry_runs() {
    let counts = Counts::default();
    let addr = serve(flaky(counts.clone(), || {
        (StatusCode::SERVICE_UNAVAILABLE, "db down").into_response()
    }))
    .await;
    assert_eq!(post_pay(addr, "k503").await.0, 503);
    assert_eq!(post_pay(addr, "k503").await.0, 503);
    let third = post_pay(addr, "k503").await;
    assert_eq!((third.0, third.2.as_str()), (201, "pay_3"));
    let replay = post_pay(addr, "k503").await;
    assert_eq!(
        (replay.0, replay.1, replay.2.as_str()),
        (201, true, "pay_3")
    );
    assert_eq!(counts.starts.load(SeqCst), 3, "two refusals, one payment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_with_retry_after_releases_the_key() {
    let counts = Counts::default();
    let addr = serve(flaky(counts.clone(), || {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(http::header::RETRY_AFTER, "1")],
            "try later",
        )
            .into_response()
    }))
    .await;
    assert_eq!(post_pay(addr, "kra").await.0, 500);
    assert_eq!(post_pay(addr, "kra").await.0, 500);
    assert_eq!(post_pay(addr, "kra").await.0, 201);
    assert_eq!(counts.starts.load(SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_500_stays_an_unknown_outcome() {
    let counts = Counts::default();
    let addr = serve(flaky(counts.clone(), || {
        (StatusCode::INTERNAL_SERVER_ERROR, "failed midway").into_response()
    }))
    .await;
    assert_eq!(post_pay(addr, "k500").await.0, 500);
    let retry = post_pay(addr, "k500").await;
    assert_eq!(retry.0, 500);
    assert!(retry.2.contains("outcome-unknown"), "{retry:?}");
    assert_eq!(counts.starts.load(SeqCst), 1);
}
