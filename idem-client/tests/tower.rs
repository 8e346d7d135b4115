//! The tower layer end to end, over hyper-util's client, against idem's `IdempotencyLayer`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idem_client::{
    Attempts, Error, IdempotencyClientLayer, IdempotencyKey, KeyRule, RetryPolicy, IDEMPOTENCY_KEY,
};
use tower::{Layer, ServiceExt};

fn request(url: String, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn layer(attempt_timeout: Duration) -> IdempotencyClientLayer {
    IdempotencyClientLayer::new(
        RetryPolicy::new()
            .attempt_timeout(attempt_timeout)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .max_attempts(10),
    )
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_with_its_key_and_gets_the_first_runs_response() {
    let (addr, counts) = common::serve(Duration::from_millis(600), true).await;
    let client = layer(Duration::from_millis(150))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let response = client
        .oneshot(request(format!("http://{addr}/charge"), "order-1"))
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let attempts = *response.extensions().get::<Attempts>().unwrap();
    assert!(attempts.count >= 3, "{attempts:?}");
    assert_eq!(counts.requests(), attempts.count as usize);
    let key = response
        .extensions()
        .get::<IdempotencyKey>()
        .cloned()
        .unwrap();
    assert!(!key.as_str().is_empty());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counts.charges(), 1);
    assert_eq!(
        counts.produced(),
        vec![String::from_utf8(body.to_vec()).unwrap()]
    );
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_key() {
    let (addr, counts) = common::serve(Duration::ZERO, true).await;
    let client = layer(Duration::from_secs(30))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let mut req = request(format!("http://{addr}/charge?fault=503"), "order-2");
    req.extensions_mut()
        .insert(IdempotencyKey::new("order-2").unwrap());
    let response = client.oneshot(req).await.unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(response.extensions().get::<Attempts>().unwrap().count, 2);
    assert_eq!(
        response
            .extensions()
            .get::<IdempotencyKey>()
            .unwrap()
            .as_str(),
        "order-2"
    );
    assert_eq!(counts.requests(), 2);
    assert_eq!(counts.charges(), 1);
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_an_error_and_is_not_retried() {
    let (addr, counts) = common::serve(Duration::ZERO, true).await;
    let client = layer(Duration::from_secs(30))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let key = IdempotencyKey::new("order-3").unwrap();
    let mut first = request(format!("http://{addr}/charge"), "amount=500");
    first.extensions_mut().insert(key.clone());
    assert_eq!(client.clone().oneshot(first).await.unwrap().status(), 201);

    let mut second = request(format!("http://{addr}/charge"), "amount=900");
    second.extensions_mut().insert(key);
    let error = client.oneshot(second).await.unwrap_err();
    assert!(matches!(error, Error::KeyReused { .. }), "{error:?}");
    assert!(error
        .to_string()
        .contains("was already used for another request"));
    assert_eq!(counts.requests(), 2);
    assert_eq!(counts.charges(), 1);
}

#[tokio::test]
async fn a_key_header_that_cannot_be_sent_is_refused_and_nothing_is_sent() {
    let (addr, counts) = common::serve(Duration::ZERO, true).await;
    let client = layer(Duration::from_secs(30))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    for (value, rule) in [
        ("order 42", KeyRule::NotVisibleAscii { at: 5, byte: b' ' }),
        ("", KeyRule::Empty),
    ] {
        let mut req = request(format!("http://{addr}/charge"), "order-42");
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, http::HeaderValue::from_str(value).unwrap());
        let error = client.clone().oneshot(req).await.unwrap_err();
        match &error {
            Error::InvalidKey { key, rule: got } => {
                assert_eq!((key.as_str(), *got), (value, rule));
            }
            other => panic!("{value:?}: {other:?}"),
        }
        assert!(
            error.to_string().contains("the request was not sent"),
            "{error}"
        );
    }
    assert_eq!(counts.requests(), 0, "no request reached the server");

    // Without any key, one is generated (and the request is sent).
    let response = client
        .oneshot(request(format!("http://{addr}/charge"), "order-43"))
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.extensions().get::<IdempotencyKey>().is_some());
    assert_eq!(counts.requests(), 1);
}
