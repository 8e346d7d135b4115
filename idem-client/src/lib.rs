//! # idem-client — retry with the same `Idempotency-Key`, automatically
//!
//! An idempotency key only helps if the client sends one and keeps it across its retries. This
//! crate does that for Rust HTTP clients: a [`reqwest-middleware`](reqwest_middleware) middleware
//! ([`IdempotencyMiddleware`]) and a tower layer for hyper clients
//! ([`IdempotencyClientLayer`]), with one retry policy ([`RetryPolicy`]).
//!
//! For each POST and PATCH (configurable) it:
//! - attaches an `Idempotency-Key`: a new UUIDv7, or yours through an [`IdempotencyKey`] request
//!   extension (or the request's own header); a key you set that cannot be sent is refused with
//!   [`Error::InvalidKey`] (its [`KeyRule`] names the rule it broke) and nothing is sent: it is
//!   never replaced by a new key;
//! - keeps that key on every retry of the request, so the server runs the operation once;
//! - retries connection errors and timeouts, `409 Conflict` (the first attempt is still running
//!   on the server: it waits, honouring `Retry-After`) and the 5xx/429 statuses you choose, with
//!   exponential backoff and jitter, within a cap on attempts and on total time;
//! - never retries a streaming body, which cannot be sent twice ([`StopReason::BodyNotReplayable`]);
//! - turns a `422` problem document (the key was used for another request) into
//!   [`Error::KeyReused`];
//! - puts the key ([`IdempotencyKey`]) and the attempt count ([`Attempts`]) in the response's
//!   extensions, and the key in every [`Error`], so that it can be logged and reused later for
//!   the same operation.
//!
//! With reqwest (this crate re-exports the [`reqwest`] and [`reqwest_middleware`] it is built
//! against; TLS is your reqwest's choice):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use idem_client::{Attempts, IdempotencyKey, IdempotencyMiddleware, RetryPolicy};
//! use reqwest_middleware::ClientBuilder;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let client = ClientBuilder::new(reqwest::Client::new())
//!         .with(IdempotencyMiddleware::new(
//!             RetryPolicy::new()
//!                 .attempt_timeout(Duration::from_millis(200))
//!                 .max_attempts(6),
//!         ))
//!         .build();
//!
//!     let response = client
//!         .post("http://127.0.0.1:3000/payments")
//!         .bearer_auth("alice") // the example server keeps one key space per client
//!         .header("content-type", "application/json")
//!         .body(r#"{"amount": 500, "currency": "usd"}"#)
//!         .send()
//!         .await?;
//!     let key = response.extensions().get::<IdempotencyKey>().cloned().unwrap();
//!     let attempts = response.extensions().get::<Attempts>().unwrap().count;
//!     println!("{} after {attempts} attempt(s), key {key}", response.status());
//!     println!("{}", response.text().await?);
//!
//!     // The same operation again later (a restart, a queue): the same key, the same payment.
//!     let again = client
//!         .post("http://127.0.0.1:3000/payments")
//!         .bearer_auth("alice") // the example server keeps one key space per client
//!         .header("content-type", "application/json")
//!         .body(r#"{"amount": 500, "currency": "usd"}"#)
//!         .with_extension(key)
//!         .send()
//!         .await?;
//!     println!("replayed: {:?}", again.headers().get("idempotent-replayed"));
//!     Ok(())
//! }
//! ```
//!
//! Errors of the requests it applies to come back as `reqwest_middleware::Error::Middleware`
//! holding an [`Error`]; get it with [`Error::from_middleware`] to read the key and the reason.
//!
//! The server side is `idempotency::http::IdempotencyLayer` (crate `idempotency`, feature
//! `http`); this crate depends on none of it and works with any server that implements the
//! IETF Idempotency-Key draft or Stripe's keys.

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod attempts;
mod error;
mod key;
mod layer;
mod middleware;
mod policy;
mod retry;

pub use attempts::{AttemptTimedOut, Attempts, StopReason};
pub use error::{BoxError, Error};
pub use key::{IdempotencyKey, KeyRule, IDEMPOTENCY_KEY, MAX_KEY_LEN};
pub use layer::{IdempotencyClient, IdempotencyClientLayer, ResponseFuture};
pub use middleware::IdempotencyMiddleware;
pub use policy::{is_transient, parse_retry_after, RetryPolicy};

/// The `reqwest` this crate is built against (0.13).
pub use reqwest;
/// The `reqwest-middleware` this crate is built against (0.5).
pub use reqwest_middleware;
