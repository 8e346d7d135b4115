// The README's first snippet, whole: tests/docs.rs keeps the README's copy equal to this file,
// and .ci/run runs it against the Redis it names (`cargo run --example readme --features redis`).
use idempotency::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ChargeRequest {
    order_id: u64,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    charge_id: String,
}

#[derive(Debug)]
enum PaymentError {
    Idempotency(idempotency::Error),
}

impl From<idempotency::Error> for PaymentError {
    fn from(e: idempotency::Error) -> Self {
        PaymentError::Idempotency(e)
    }
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let PaymentError::Idempotency(e) = self;
        write!(f, "{e}")
    }
}

impl std::error::Error for PaymentError {}

#[idempotent(name = "billing.charge", key = format!("charge:{}", req.order_id), ttl = "24h")]
async fn charge(req: ChargeRequest) -> Result<Receipt, PaymentError> {
    // Your payment processor's call goes here: it runs once per order id.
    let id = std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos();
    Ok(Receipt {
        charge_id: format!("ch_{id}_{}", req.amount_cents),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Every process that shares this Redis charges each order once. (Without a store installed,
    // calls fall back to a memory store inside this process only, and say so in a warning.)
    let store = idempotency::connect("redis://127.0.0.1:6379").await?;
    idempotency::install(store);

    let order_id = std::process::id().into(); // a new order each run
    let first = charge(ChargeRequest {
        order_id,
        amount_cents: 500,
    })
    .await?;
    let retry = charge(ChargeRequest {
        order_id,
        amount_cents: 500,
    })
    .await?;
    assert_eq!(first, retry); // the retry replays the first receipt
    Ok(())
}
