//! The same flaky server (the first run of each operation outlasts the client's per-attempt
//! timeout), called for N operations by `reqwest-retry`'s `RetryTransientMiddleware` three ways
//! and by this crate's middleware, counting the charges at the start of the handler.
//! `cargo test -p idem-client --test side_by_side -- --nocapture` prints the table.

mod common;

use std::time::Duration;

use futures::future::join_all;
use http::Extensions;
use idem_client::{IdempotencyKey, IdempotencyMiddleware, RetryPolicy, IDEMPOTENCY_KEY};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::RetryTransientMiddleware;

const OPERATIONS: usize = 50;
const FIRST_RUN: Duration = Duration::from_millis(600);
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(150);

/// A new key on every attempt: what a key generated inside the retried closure amounts to.
struct NewKeyPerAttempt;

#[async_trait::async_trait]
impl Middleware for NewKeyPerAttempt {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = IdempotencyKey::generate();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, key.header_value().clone());
        next.run(req, extensions).await
    }
}

fn reqwest_retry() -> RetryTransientMiddleware<ExponentialBackoff> {
    let backoff = ExponentialBackoff::builder()
        .retry_bounds(Duration::from_millis(20), Duration::from_millis(200))
        .build_with_max_retries(9);
    RetryTransientMiddleware::new_with_policy(backoff)
}

#[derive(Clone, Copy, PartialEq)]
enum Key {
    None,
    OncePerOperation,
}

struct Row {
    client: &'static str,
    charges: usize,
    created: usize,
    conflicts: usize,
    failed: usize,
}

/// Runs the N operations concurrently against a fresh server and counts.
async fn run(name: &'static str, client: ClientWithMiddleware, key: Key, require_key: bool) -> Row {
    let (addr, counts) = common::serve(FIRST_RUN, require_key).await;
    let url = format!("http://{addr}/charge");
    let operations = (0..OPERATIONS).map(|i| {
        let mut request = client
            .post(&url)
            .timeout(ATTEMPT_TIMEOUT)
            .body(format!("operation-{i}"));
        if key == Key::OncePerOperation {
            request = request.header(IDEMPOTENCY_KEY, IdempotencyKey::generate().as_str());
        }
        request.send()
    });
    let mut row = Row {
        client: name,
        charges: 0,
        created: 0,
        conflicts: 0,
        failed: 0,
    };
    for result in join_all(operations).await {
        match result.map(|r| r.status().as_u16()) {
            Ok(201) => row.created += 1,
            Ok(409) => row.conflicts += 1,
            _ => row.failed += 1,
        }
    }
    row.charges = counts.charges();
    row
}

#[tokio::test]
async fn keeping_the_key_is_what_charges_once() {
    let plain = || ClientBuilder::new(reqwest::Client::new());
    let rows = [
        run(
            "reqwest-retry, no key",
            plain().with(reqwest_retry()).build(),
            Key::None,
            false,
        )
        .await,
        run(
            "reqwest-retry, a new key per attempt",
            plain().with(reqwest_retry()).with(NewKeyPerAttempt).build(),
            Key::None,
            true,
        )
        .await,
        run(
            "reqwest-retry, one key per operation",
            plain().with(reqwest_retry()).build(),
            Key::OncePerOperation,
            true,
        )
        .await,
        run(
            "idem-client IdempotencyMiddleware",
            plain()
                .with(IdempotencyMiddleware::new(
                    RetryPolicy::new()
                        .backoff(Duration::from_millis(20), Duration::from_millis(200))
                        .max_attempts(10),
                ))
                .build(),
            Key::None,
            true,
        )
        .await,
    ];

    println!("\n{OPERATIONS} operations; each first run takes {FIRST_RUN:?}, each attempt times out after {ATTEMPT_TIMEOUT:?}\n");
    println!("| client | charges | 201 Created | 409 Conflict | errors |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.client, row.charges, row.created, row.conflicts, row.failed
        );
    }
    println!();

    let [no_key, new_key, same_key, ours] = &rows;
    assert!(
        no_key.charges > OPERATIONS,
        "reqwest-retry without a key charged {}",
        no_key.charges
    );
    assert!(
        new_key.charges > OPERATIONS,
        "a new key per attempt charged {}",
        new_key.charges
    );
    assert_eq!(
        same_key.charges, OPERATIONS,
        "a key kept across reqwest-retry's retries"
    );
    assert_eq!(ours.charges, OPERATIONS);
    assert_eq!(ours.created, OPERATIONS);
}
