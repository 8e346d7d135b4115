//! A webhook handler that deduplicates deliveries by event id.
//!
//! Webhook providers deliver at least once: the same event arrives again after a timeout, and
//! sometimes twice at the same moment. The handler below applies each event once and answers
//! every delivery of it with the same acknowledgement.
//!
//! ```text
//! cargo run --example webhook
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use idempotency::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WebhookEvent {
    id: String,
    kind: String,
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Ack {
    event_id: String,
    balance_after: i64,
}

#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// The side effect that must not happen twice: customer balances.
static BALANCES: Mutex<Option<HashMap<String, i64>>> = Mutex::new(None);

/// Applies one event. Concurrent duplicates wait for the first delivery's result
/// (`on_conflict = "wait"`), so every delivery gets a 200 with the same body.
#[idempotent(name = "webhooks.handle", key = &event.id, ttl = "72h", on_conflict = "wait", wait = "10s")]
async fn handle(event: WebhookEvent) -> Result<Ack, WebhookError> {
    tokio::time::sleep(Duration::from_millis(100)).await; // e.g. a database write
    let mut balances = BALANCES.lock().unwrap();
    let balance = balances
        .get_or_insert_with(HashMap::new)
        .entry(event.customer.clone())
        .or_insert(0);
    *balance += match event.kind.as_str() {
        "payment.succeeded" => event.amount_cents,
        "refund.created" => -event.amount_cents,
        _ => 0,
    };
    Ok(Ack {
        event_id: event.id,
        balance_after: *balance,
    })
}

#[tokio::main]
async fn main() {
    let paid = WebhookEvent {
        id: "evt_1".into(),
        kind: "payment.succeeded".into(),
        customer: "cus_9".into(),
        amount_cents: 2_500,
    };
    let refund = WebhookEvent {
        id: "evt_2".into(),
        kind: "refund.created".into(),
        customer: "cus_9".into(),
        amount_cents: 500,
    };

    // Delivery, a simultaneous duplicate, and a late redelivery of the same event.
    let (a, b) = tokio::join!(handle(paid.clone()), handle(paid.clone()));
    println!("evt_1 delivery              -> {a:?}");
    println!("evt_1 concurrent duplicate  -> {b:?}");
    println!(
        "evt_1 redelivered later     -> {:?}",
        handle(paid.clone()).await
    );
    println!(
        "evt_2 delivery              -> {:?}",
        handle(refund.clone()).await
    );
    println!("evt_2 redelivered           -> {:?}", handle(refund).await);

    // A forged delivery reusing a known id with another payload is refused.
    let forged = WebhookEvent {
        amount_cents: 1_000_000,
        ..paid
    };
    println!("evt_1 with another payload  -> {:?}", handle(forged).await);

    let balance = BALANCES
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|b| b.get("cus_9").copied());
    println!("\nfinal balance of cus_9: {balance:?} (2500 - 500, each event applied once)");
}
