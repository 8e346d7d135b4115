//! A webhook handler that deduplicates deliveries by event id.
//!
//! Webhook providers deliver at least once: the same event arrives again after a timeout, and
//! sometimes twice at the same moment. The handler below applies each event once and answers
//! every delivery of it with the same acknowledgement.
//!
//! It also tells a redelivery from a first delivery without changing the handler's signature:
//! `idempotency::observe(handle(event))` says how the call was served (`Served::Ran` or
//! `Served::Replayed`), and the `on_replay` hook marks every replayed acknowledgement with
//! `replayed: true` (the stored one stays as the first delivery produced it).
//!
//! ```text
//! cargo run --example webhook
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use idempotency::{idempotent, observe, ReplayInfo, Served};
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
    /// `true` on an acknowledgement replayed to a redelivery (set by [`mark_replayed`], never
    /// stored).
    #[serde(default)]
    replayed: bool,
}

/// The replay hook: runs on every replayed acknowledgement (never on a first delivery), on the
/// value the caller gets; the stored record is not changed.
fn mark_replayed(ack: Ack, _: &ReplayInfo) -> Ack {
    Ack {
        replayed: true,
        ..ack
    }
}

#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// The side effect that must not happen twice: customer balances.
static BALANCES: Mutex<Option<HashMap<String, i64>>> = Mutex::new(None);

/// Applies one event. Concurrent duplicates wait for the first delivery's result
/// (`on_conflict = "wait"`), so every delivery gets a 200 with the same body (marked
/// `replayed` when it is not the first).
#[idempotent(name = "webhooks.handle", key = &event.id, ttl = "72h", on_conflict = "wait", wait = "10s", on_replay = mark_replayed)]
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
        replayed: false,
    })
}

/// What the web framework would call: applies the event and logs a duplicate delivery.
async fn deliver(event: WebhookEvent) -> Result<Ack, WebhookError> {
    let id = event.id.clone();
    let (ack, served) = observe(handle(event)).await;
    match &served {
        Some(Served::Replayed(info)) => println!(
            "  duplicate delivery of {id}: answered with the result stored by token {}",
            info.token().0
        ),
        Some(Served::Ran { .. }) => println!("  first delivery of {id}: applied"),
        _ => {}
    }
    ack
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
    let (a, b) = tokio::join!(deliver(paid.clone()), deliver(paid.clone()));
    println!("evt_1 delivery              -> {a:?}");
    println!("evt_1 concurrent duplicate  -> {b:?}");
    println!(
        "evt_1 redelivered later     -> {:?}",
        deliver(paid.clone()).await
    );
    println!(
        "evt_2 delivery              -> {:?}",
        deliver(refund.clone()).await
    );
    println!("evt_2 redelivered           -> {:?}", deliver(refund).await);

    // A forged delivery reusing a known id with another payload is refused.
    let forged = WebhookEvent {
        amount_cents: 1_000_000,
        ..paid
    };
    println!("evt_1 with another payload  -> {:?}", deliver(forged).await);

    let balance = BALANCES
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|b| b.get("cus_9").copied());
    println!("\nfinal balance of cus_9: {balance:?} (2500 - 500, each event applied once)");
}
