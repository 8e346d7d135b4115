//! Calls the `http_server` example's `POST /payments` through `idempotency::client`'s reqwest
//! middleware, with a per-attempt timeout shorter than the server's payment delay: the first
//! attempt times out while the server charges, the retries with the same key get 409 until the
//! charge is done, and then its replay. One charge, whatever the number of attempts.
//!
//! ```text
//! cargo run --example http_server --features http                       # terminal 1
//! cargo run --example client --features client,http                    # terminal 2
//! ```
//!
//! Environment: `PORT` (the server's, default 3000), `ATTEMPT_TIMEOUT_MS` (default 100; the
//! server's `PAYMENT_DELAY_MS` defaults to 300). The server keeps one namespace of keys per
//! `Authorization` header; this client sends `Bearer alice`.

use std::time::Duration;

use http::Extensions;
use idempotency::client::reqwest::{Client, Request, Response};
use idempotency::client::reqwest_middleware::{self, ClientBuilder, Middleware, Next};
use idempotency::client::{Attempts, Error, IdempotencyKey, IdempotencyMiddleware, RetryPolicy};

/// Prints every attempt: placed after `IdempotencyMiddleware`, it sees each one it sends.
struct PrintAttempts;

#[async_trait::async_trait]
impl Middleware for PrintAttempts {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let result = next.run(req, extensions).await;
        match &result {
            Ok(res) => println!("  attempt: key {key} -> {}", res.status()),
            Err(e) if e.is_timeout() => println!("  attempt: key {key} -> timed out"),
            Err(e) => println!("  attempt: key {key} -> error: {e}"),
        }
        result
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(3000);
    let timeout_ms: u64 = std::env::var("ATTEMPT_TIMEOUT_MS")
        .ok()
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(100);
    let url = format!("http://127.0.0.1:{port}/payments");
    let client = ClientBuilder::new(Client::new())
        .with(IdempotencyMiddleware::new(
            RetryPolicy::new()
                .attempt_timeout(Duration::from_millis(timeout_ms))
                .max_attempts(8),
        ))
        .with(PrintAttempts)
        .build();
    let body = r#"{"amount": 500, "currency": "usd"}"#;

    println!("POST {url} (each attempt times out after {timeout_ms} ms)");
    let response = match client
        .post(&url)
        .header("authorization", "Bearer alice")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            if let Some(e) = Error::from_middleware(&e) {
                eprintln!("failed: {e}");
            } else {
                eprintln!("failed: {e} (is the http_server example running on port {port}?)");
            }
            std::process::exit(1);
        }
    };
    let key = response
        .extensions()
        .get::<IdempotencyKey>()
        .cloned()
        .unwrap();
    let attempts = response.extensions().get::<Attempts>().copied().unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let status = response.status();
    let first: serde_json::Value = serde_json::from_str(&response.text().await?)?;
    println!(
        "result: {status} after {} attempt(s), key {key}, replayed: {replayed}\n  {first}",
        attempts.count
    );

    // The same operation once more, say after a restart: the same key gets the same payment.
    println!("POST {url} again with key {key}");
    let again = client
        .post(&url)
        .header("authorization", "Bearer alice")
        .header("content-type", "application/json")
        .body(body)
        .with_extension(key)
        .send()
        .await?;
    let again: serde_json::Value = serde_json::from_str(&again.text().await?)?;
    println!("  {again}");
    println!(
        "one charge: {} (the server logged one `charged` line for it)",
        if first["id"] == again["id"] {
            format!("both answers are payment {}", first["id"])
        } else {
            "NO: two different payments".to_owned()
        }
    );
    Ok(())
}
