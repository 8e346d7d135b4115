//! The layer's builder is like `Call`'s: stores as `IntoStore` (`&store` works), durations as
//! `IntoDuration`, and no setter panics: a value the layer cannot use refuses every request it
//! applies to with `500 #idempotency-failed`, and the handler does not run.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use idempotency::http::{IdempotencyLayer, RequestBody};
use idempotency::MemoryStore;
use tower::{service_fn, Layer, ServiceExt};

async fn post(layer: IdempotencyLayer, runs: Arc<AtomicUsize>) -> (u16, String) {
    let svc = layer.layer(service_fn(
        move |_req: Request<RequestBody<Full<Bytes>>>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        },
    ));
    let req = Request::post("/x")
        .header("idempotency-key", "k1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_borrowed_store_and_durations_as_seconds() {
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::shared(&store, "builder")
        .ttl(60)
        .lease(5)
        .recovery(30);
    let runs = Arc::new(AtomicUsize::new(0));
    assert_eq!(post(layer.clone(), runs.clone()).await.0, 200);
    assert_eq!(post(layer, runs.clone()).await.0, 200);
    assert_eq!(runs.load(SeqCst), 1, "replayed from the borrowed store");
}

#[tokio::test]
async fn mistakes_refuse_requests_and_never_panic() {
    let cases: Vec<(&str, IdempotencyLayer)> = vec![
        (
            "scope name is empty",
            IdempotencyLayer::shared(MemoryStore::new(), ""),
        ),
        ("NUL", IdempotencyLayer::shared(MemoryStore::new(), "a\0b")),
        (
            "invalid header name",
            IdempotencyLayer::shared(MemoryStore::new(), "s").replay_headers(["bad header"]),
        ),
        (
            "limit of 0",
            IdempotencyLayer::shared(MemoryStore::new(), "s").limit_per_scope(0, 1),
        ),
        (
            "shorter than the minimum",
            IdempotencyLayer::shared(MemoryStore::new(), "s")
                .lease(std::time::Duration::from_millis(1)),
        ),
    ];
    for (what, layer) in cases {
        let runs = Arc::new(AtomicUsize::new(0));
        let (status, body) = post(layer, runs.clone()).await;
        assert_eq!(status, 500, "{what}: {body}");
        assert!(body.contains("idempotency-failed"), "{what}: {body}");
        assert_eq!(runs.load(SeqCst), 0, "{what}: the handler did not run");
    }
}
