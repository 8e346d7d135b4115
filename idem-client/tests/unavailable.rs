//! The client and the layer together never turn a retryable answer into a stuck key (issue 20):
//! a handler whose dependency is down answers 503 twice (doing nothing), then 201. The layer
//! releases the key on each 503 (the handler said "not now"), the client retries the 503s with
//! the same key, and the operation ends in 201: three handler runs, one payment, and every
//! later request with the key gets that payment replayed.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use idem_client::{Attempts, IdempotencyKey, IdempotencyMiddleware, RetryPolicy};
use idempotency::http::IdempotencyLayer;
use idempotency::MemoryStore;
use reqwest_middleware::ClientBuilder;

#[tokio::test]
async fn two_503s_then_201_ends_in_201_with_one_payment() {
    let runs = Arc::new(AtomicUsize::new(0));
    let payments = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/payments",
            post({
                let (runs, payments) = (runs.clone(), payments.clone());
                move || async move {
                    // Counted where the handler starts.
                    if runs.fetch_add(1, SeqCst) < 2 {
                        return (StatusCode::SERVICE_UNAVAILABLE, "bank unreachable")
                            .into_response();
                    }
                    let n = payments.fetch_add(1, SeqCst) + 1;
                    (StatusCode::CREATED, format!("pay_{n}")).into_response()
                }
            }),
        )
        .layer(IdempotencyLayer::shared(MemoryStore::new(), "unavailable"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = ClientBuilder::new(reqwest::Client::new())
        .with(IdempotencyMiddleware::new(
            RetryPolicy::new()
                .backoff(Duration::from_millis(20), Duration::from_millis(100))
                .max_attempts(6),
        ))
        .build();
    let response = client
        .post(format!("http://{addr}/payments"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let attempts = response.extensions().get::<Attempts>().unwrap().count;
    let key = response
        .extensions()
        .get::<IdempotencyKey>()
        .cloned()
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "pay_1");
    assert_eq!(attempts, 3, "503, 503, 201");
    assert_eq!(runs.load(SeqCst), 3, "the handler ran three times");
    assert_eq!(payments.load(SeqCst), 1, "one payment");

    // The same operation later: the payment replayed, the handler not run.
    let again = client
        .post(format!("http://{addr}/payments"))
        .body("{}")
        .with_extension(key)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), "pay_1");
    assert_eq!(runs.load(SeqCst), 3);
}
