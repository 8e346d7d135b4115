//! The reqwest middleware end to end against idem's `IdempotencyLayer` on loopback.

mod common;

use std::time::Duration;

use idem_client::{
    Attempts, Error, IdempotencyKey, IdempotencyMiddleware, KeyRule, RetryPolicy, StopReason,
    IDEMPOTENCY_KEY,
};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

use common::{drop_first_response, serve};

fn client(policy: RetryPolicy) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(IdempotencyMiddleware::new(policy))
        .build()
}

/// A policy with short backoff, bounded attempts and a per-attempt timeout.
fn policy(attempt_timeout: Duration) -> RetryPolicy {
    RetryPolicy::new()
        .attempt_timeout(attempt_timeout)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .max_attempts(10)
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_with_its_key_and_gets_the_first_runs_response() {
    // The handler's first run takes 600 ms; each attempt gives up after 150 ms.
    let (addr, counts) = serve(Duration::from_millis(600), true).await;
    let response = client(policy(Duration::from_millis(150)))
        .post(format!("http://{addr}/charge"))
        .body("order-1")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let key = response
        .extensions()
        .get::<IdempotencyKey>()
        .cloned()
        .unwrap();
    let attempts = *response.extensions().get::<Attempts>().unwrap();
    // The timed-out attempt, at least one 409 (the handler still ran), the replay.
    assert!(attempts.count >= 3, "{attempts:?}");
    assert_eq!(attempts.stopped, None);
    assert_eq!(counts.requests(), attempts.count as usize);
    assert_eq!(uuid_version(key.as_str()), 7);
    let body = response.text().await.unwrap();
    assert_eq!(counts.charges(), 1);
    assert_eq!(counts.produced(), vec![body]);
}

#[tokio::test]
async fn a_connection_closed_before_the_response_is_retried_with_its_key() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let proxy = drop_first_response(addr).await;
    let response = client(policy(Duration::from_secs(30)))
        .post(format!("http://{proxy}/charge"))
        .body("order-2")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    // The server ran the first request, whose response never arrived: the retry is a replay.
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.extensions().get::<Attempts>().unwrap().count, 2);
    assert_eq!(counts.requests(), 2);
    let body = response.text().await.unwrap();
    assert_eq!(counts.charges(), 1);
    assert_eq!(counts.produced(), vec![body]);
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_key() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let response = client(policy(Duration::from_secs(30)))
        .post(format!("http://{addr}/charge?fault=503"))
        .with_extension(IdempotencyKey::new("order-3").unwrap())
        .body("order-3")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(
        response
            .extensions()
            .get::<IdempotencyKey>()
            .unwrap()
            .as_str(),
        "order-3"
    );
    assert_eq!(response.extensions().get::<Attempts>().unwrap().count, 2);
    assert_eq!(counts.requests(), 2);
    assert_eq!(counts.charges(), 1);
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_an_error_that_says_so_and_is_not_retried() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let client = client(policy(Duration::from_secs(30)));
    let url = format!("http://{addr}/charge");
    let key = IdempotencyKey::new("order-4").unwrap();
    let first = client
        .post(&url)
        .with_extension(key.clone())
        .body("amount=500")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);

    let error = client
        .post(&url)
        .with_extension(key)
        .body("amount=900")
        .send()
        .await
        .unwrap_err();
    let ours = Error::from_middleware(&error).expect("the middleware's error");
    assert!(matches!(ours, Error::KeyReused { .. }), "{ours:?}");
    assert_eq!(ours.key(), Some("order-4"));
    let text = error.to_string();
    assert!(
        text.contains("`order-4` was already used for another request"),
        "{text}"
    );
    assert!(
        text.contains("key-reused"),
        "the server's problem document: {text}"
    );
    assert_eq!(counts.requests(), 2, "the 422 is not retried");
    assert_eq!(counts.charges(), 1);
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_not_retried() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("order-"), Ok("5")];
    let response = client(policy(Duration::from_secs(30)))
        .post(format!("http://{addr}/charge?fault=503"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    assert_eq!(
        *response.extensions().get::<Attempts>().unwrap(),
        Attempts {
            count: 1,
            stopped: Some(StopReason::BodyNotReplayable)
        }
    );
    assert!(response.extensions().get::<IdempotencyKey>().is_some());
    assert_eq!(counts.requests(), 1);
    assert_eq!(counts.charges(), 0);
}

#[tokio::test]
async fn a_streaming_body_that_times_out_is_an_error_naming_the_key() {
    let (addr, counts) = serve(Duration::from_millis(600), true).await;
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("order-6")];
    let error = client(policy(Duration::from_millis(150)))
        .post(format!("http://{addr}/charge"))
        .with_extension(IdempotencyKey::new("order-6").unwrap())
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap_err();
    let ours = Error::from_middleware(&error).expect("the middleware's error");
    match ours {
        Error::Failed {
            key,
            attempts,
            reason,
            ..
        } => {
            assert_eq!((key.as_str(), *attempts), ("order-6", 1));
            assert_eq!(*reason, StopReason::BodyNotReplayable);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        error.to_string().contains("the body is a stream"),
        "{error}"
    );
    assert_eq!(counts.requests(), 1);
}

#[tokio::test]
async fn get_requests_pass_through_without_a_key() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let response = client(policy(Duration::from_secs(30)))
        .get(format!("http://{addr}/charge"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.extensions().get::<IdempotencyKey>().is_none());
    assert_eq!(counts.requests(), 1);
}

#[tokio::test]
async fn a_key_header_that_cannot_be_sent_is_refused_and_nothing_is_sent() {
    let (addr, counts) = serve(Duration::ZERO, true).await;
    let client = client(policy(Duration::from_secs(30)));
    let url = format!("http://{addr}/charge");
    let long = "k".repeat(256);
    let cases: [(&[&[u8]], KeyRule, &str); 5] = [
        (
            &[b"order 42"],
            KeyRule::NotVisibleAscii { at: 5, byte: b' ' },
            "byte 5 is a space",
        ),
        (&[b""], KeyRule::Empty, "it is empty"),
        (
            &[long.as_bytes()],
            KeyRule::TooLong { len: 256 },
            "it is 256 bytes long; a key is at most 255 bytes",
        ),
        (
            &[b"ord\xe9r-42"],
            KeyRule::NotVisibleAscii { at: 3, byte: 0xe9 },
            "a non-ASCII byte (0xe9)",
        ),
        (
            &[b"order-42", b"order-43"],
            KeyRule::Repeated,
            "more than one Idempotency-Key header",
        ),
    ];
    for (values, rule, message) in cases {
        let mut request = client.post(&url).body("order-42");
        for value in values {
            request = request.header(
                IDEMPOTENCY_KEY,
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let error = request.send().await.unwrap_err();
        let ours = Error::from_middleware(&error).expect("the middleware's error");
        match ours {
            Error::InvalidKey { rule: got, .. } => assert_eq!(*got, rule),
            other => panic!("{values:?}: {other:?}"),
        }
        assert_eq!(ours.key(), None, "nothing was sent");
        let text = error.to_string();
        assert!(text.contains(message), "{text}");
        assert!(text.contains("the request was not sent"), "{text}");
    }
    assert_eq!(counts.requests(), 0, "no request reached the server");
    assert_eq!(counts.charges(), 0);

    // The caller's valid header is sent as it is, never replaced.
    let response = client
        .post(&url)
        .header(IDEMPOTENCY_KEY, "order-42")
        .body("order-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response
            .extensions()
            .get::<IdempotencyKey>()
            .unwrap()
            .as_str(),
        "order-42"
    );
    assert_eq!(counts.requests(), 1);
}

fn uuid_version(key: &str) -> usize {
    // The version is the first hex digit of the third group: xxxxxxxx-xxxx-Vxxx-...
    let group = key.split('-').nth(2).unwrap();
    usize::from_str_radix(&group[..1], 16).unwrap()
}
