//! A payment-style service function, retried the way real clients retry.
//!
//! Runs on the in-memory default store, no server needed:
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotency::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChargeRequest {
    order_id: String,
    amount_cents: u64,
    currency: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    charge_id: String,
    amount_cents: u64,
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("card declined")]
    Declined,
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// How many times the payment processor was really called.
static PROCESSOR_CALLS: AtomicU32 = AtomicU32::new(0);

/// Charges an order at most once, whatever the number of retries.
#[idempotent(name = "payments.charge", key = format!("charge:{}", req.order_id), ttl = "24h")]
async fn charge(req: ChargeRequest) -> Result<Receipt, PaymentError> {
    PROCESSOR_CALLS.fetch_add(1, Ordering::SeqCst);
    // The payment processor is slow...
    tokio::time::sleep(Duration::from_millis(200)).await;
    if req.amount_cents == 0 {
        return Err(PaymentError::Declined);
    }
    Ok(Receipt {
        charge_id: format!("ch_{:016x}", rand::random::<u64>()),
        amount_cents: req.amount_cents,
    })
}

#[tokio::main]
async fn main() {
    let req = ChargeRequest {
        order_id: "order-42".into(),
        amount_cents: 500,
        currency: "usd".into(),
    };

    println!(
        "1. first call                -> {:?}",
        charge(req.clone()).await
    );
    println!(
        "2. retry with the same key   -> {:?}",
        charge(req.clone()).await
    );

    // A client that times out and retries at once meets its own first call still running:
    // the retry is rejected with `InFlight` (the default `on_conflict = "reject"`), and a later
    // retry gets the result.
    let other = ChargeRequest {
        order_id: "order-43".into(),
        ..req.clone()
    };
    let (a, b) = tokio::join!(charge(other.clone()), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        charge(other.clone()).await
    });
    println!("3. two concurrent calls      -> {a:?}");
    println!("                                {b:?}");

    // The same key with a different payload is a client bug, refused without charging.
    let tampered = ChargeRequest {
        amount_cents: 9_900,
        ..req.clone()
    };
    println!(
        "4. same key, other payload   -> {:?}",
        charge(tampered).await
    );

    // Errors are not kept: a declined charge can be retried (and runs again).
    let declined = ChargeRequest {
        order_id: "order-44".into(),
        amount_cents: 0,
        ..req.clone()
    };
    println!(
        "5. declined                  -> {:?}",
        charge(declined.clone()).await
    );
    println!(
        "6. declined, retried         -> {:?}",
        charge(declined).await
    );

    let m = idempotency::counters();
    println!(
        "\nprocessor called {} times for 7 calls; hits {}, misses {}, conflicts {}, key reuses {}",
        PROCESSOR_CALLS.load(Ordering::SeqCst),
        m.hits,
        m.misses,
        m.conflicts,
        m.key_reuses
    );
}
