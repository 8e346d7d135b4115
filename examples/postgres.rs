//! A retried call replayed from PostgreSQL.
//!
//! ```text
//! cargo run --example postgres --features postgres          # order 42: run it twice, the second run replays
//! cargo run --example postgres --features postgres -- 7      # another order
//! ```
//!
//! Connects to `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and keeps
//! its records in the table `idem_records`, created if missing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotency::store::RecordState;
use idempotency::Operation;
use idempotency::{idempotent, PostgresStore, StorageKey, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    order_id: u64,
    amount_cents: u64,
}

#[derive(Debug)]
enum PaymentError {
    Idem(idempotency::Error),
}

impl From<idempotency::Error> for PaymentError {
    fn from(e: idempotency::Error) -> Self {
        PaymentError::Idem(e)
    }
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PaymentError::Idem(e) => write!(f, "{e}"),
        }
    }
}

/// How many times the body ran in this process.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Charges once per order id; every retry within the hour gets the first receipt back, from
/// any process sharing the database.
#[idempotent(name = "example.charge", key = order_id, store = store, skip(store), ttl = "1h")]
async fn charge(
    store: &PostgresStore,
    order_id: u64,
    amount_cents: u64,
) -> Result<Receipt, PaymentError> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    println!("   the body runs: charging {amount_cents} cents for order {order_id}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Receipt {
        id: format!("rcpt_{:08x}", rand::random::<u32>()),
        order_id,
        amount_cents,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let order_id = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 42,
    };
    println!("connecting to {url}");
    let store = PostgresStore::connect(&url).await?;
    println!("records live in table `{}`\n", store.table());

    let steps = [
        ("charge the order, 500 cents", 500),
        ("the client timed out and retries the same request", 500),
        ("a buggy client reuses the key for another amount", 900),
    ];
    for (n, (what, amount_cents)) in steps.into_iter().enumerate() {
        println!("{}. {what}", n + 1);
        let runs = RUNS.load(Ordering::SeqCst);
        match charge(&store, order_id, amount_cents).await {
            Ok(receipt) if RUNS.load(Ordering::SeqCst) > runs => {
                println!("   -> {receipt:?}, stored")
            }
            Ok(receipt) => {
                println!("   -> {receipt:?}, replayed from PostgreSQL: the body did not run")
            }
            Err(e) => println!("   -> refused: {e}"),
        }
    }

    let key = StorageKey::derive_for(&Operation::named("example.charge"), "", &order_id)?;
    match store.get(&key).await? {
        Some(stored) => match stored.state {
            RecordState::Completed { token, record } => println!(
                "\nthe row under key {key}: completed by fencing token {}, {} bytes",
                token.0,
                record.len()
            ),
            RecordState::InFlight { token } => {
                println!("\nthe row under key {key}: in flight, token {}", token.0)
            }
        },
        None => println!("\nno row under key {key}"),
    }
    println!("run again with `-- {order_id}` within the hour: even the first call is replayed");
    Ok(())
}
