//! A charge retried against an SQLite file: the result survives a restart of the process.
//!
//! ```text
//! cargo run --example sqlite --features sqlite                  # uses ./idem-example.sqlite
//! cargo run --example sqlite --features sqlite -- /tmp/my.db    # or any path
//! ```
//!
//! Run it twice: the second run's first call is replayed from the file, because the first run
//! stored the receipt there for ten minutes. Several processes may share the file.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotency::{idempotent, SqliteStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChargeRequest {
    order_id: String,
    amount_cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    charge_id: String,
    amount_cents: u64,
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// How many times this process really called the payment processor.
static PROCESSOR_CALLS: AtomicU32 = AtomicU32::new(0);

/// Charges an order at most once, across restarts and processes sharing the file.
#[idempotent(name = "example.charge", key = format!("charge:{}", req.order_id), ttl = "10m", store = store, skip(store))]
async fn charge(store: &SqliteStore, req: ChargeRequest) -> Result<Receipt, PaymentError> {
    PROCESSOR_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Receipt {
        charge_id: format!("ch_{:016x}", rand::random::<u64>()),
        amount_cents: req.amount_cents,
    })
}

fn ran_or_replayed(before: u32) -> &'static str {
    if PROCESSOR_CALLS.load(Ordering::SeqCst) > before {
        "ran the body"
    } else {
        "replayed from the file, body not run"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "idem-example.sqlite".into());
    let store = SqliteStore::open(&path).await?;
    println!("store: {path}");

    let req = ChargeRequest {
        order_id: "order-42".into(),
        amount_cents: 500,
    };
    for attempt in 1..=3 {
        let before = PROCESSOR_CALLS.load(Ordering::SeqCst);
        let receipt = charge(&store, req.clone()).await?;
        println!(
            "attempt {attempt}: {receipt:?} ({})",
            ran_or_replayed(before)
        );
    }

    let tampered = ChargeRequest {
        amount_cents: 9_900,
        ..req
    };
    println!(
        "same key, other amount: {:?}",
        charge(&store, tampered).await.map_err(|e| e.to_string())
    );

    let purged = idempotency::Store::purge_expired(&store).await?;
    println!("purge_expired removed {purged} expired records");
    println!(
        "\nthe processor was called {} time(s) in this run; run again to see the first call replayed",
        PROCESSOR_CALLS.load(Ordering::SeqCst)
    );
    Ok(())
}
