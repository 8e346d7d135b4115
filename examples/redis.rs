//! A charge retried against Redis: the result is stored there and replayed to every retry, from
//! this process or any other.
//!
//! ```text
//! cargo run --example redis --features redis            # Redis at redis://127.0.0.1:6379
//! IDEM_REDIS_URL=redis://host:6379/2 cargo run --example redis --features redis
//! ```
//!
//! Run it twice: the second run's first call is replayed from Redis, because the first run
//! stored the receipt there for ten minutes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotency::redis::redis;
use idempotency::store::RecordState;
use idempotency::Operation;
use idempotency::{idempotent, RedisStore, StorageKey, Store};
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

/// The tenant the charges are made for: records of other tenants never mix with these.
const SCOPE: &str = "tenant-demo";

/// Charges an order at most once across every process sharing the Redis server.
#[idempotent(name = "example.charge", key = format!("charge:{}", req.order_id), ttl = "10m", scope = SCOPE, store = store, skip(store))]
async fn charge(store: &RedisStore, req: ChargeRequest) -> Result<Receipt, PaymentError> {
    PROCESSOR_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Receipt {
        charge_id: format!("ch_{:016x}", rand::random::<u64>()),
        amount_cents: req.amount_cents,
    })
}

fn ran_or_replayed(before: u32) -> &'static str {
    if PROCESSOR_CALLS.load(Ordering::SeqCst) > before {
        "ran the body"
    } else {
        "replayed, body not run"
    }
}

#[tokio::main]
async fn main() {
    let url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let store = match RedisStore::connect_with_prefix(&url, "idem-example").await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cannot reach Redis at {url}: {e}\nstart one with `redis-server`, or set IDEM_REDIS_URL");
            std::process::exit(1);
        }
    };
    println!(
        "connected to {url}, records under the prefix `{}`",
        store.prefix()
    );

    let req = ChargeRequest {
        order_id: "order-1001".into(),
        amount_cents: 2_500,
    };

    let before = PROCESSOR_CALLS.load(Ordering::SeqCst);
    let first = charge(&store, req.clone()).await;
    println!(
        "1. first call              -> {first:?} ({})",
        ran_or_replayed(before)
    );

    let before = PROCESSOR_CALLS.load(Ordering::SeqCst);
    let retry = charge(&store, req.clone()).await;
    println!(
        "2. retry, same key         -> {retry:?} ({})",
        ran_or_replayed(before)
    );

    // A retry that arrives while the first call still runs is rejected, not run twice.
    let fresh = ChargeRequest {
        order_id: format!("order-{}", rand::random::<u32>()),
        ..req.clone()
    };
    let (a, b) = tokio::join!(charge(&store, fresh.clone()), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        charge(&store, fresh.clone()).await
    });
    println!("3. two calls at once       -> {a:?}");
    println!("                              {b:?}");

    // The same key with another amount is a client bug: refused, nothing charged.
    let tampered = ChargeRequest {
        amount_cents: 99_900,
        ..req.clone()
    };
    println!(
        "4. same key, other amount  -> {:?}",
        charge(&store, tampered).await
    );

    // What Redis holds for the order.
    let key = StorageKey::derive_for(
        &Operation::named("example.charge"),
        SCOPE,
        &format!("charge:{}", req.order_id),
    )
    .unwrap();
    let record_key = store.record_key(&key);
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&record_key)
        .query_async(&mut store.connection())
        .await
        .unwrap_or(-2);
    match store.get(&key).await {
        Ok(Some(stored)) => {
            let state = match stored.state {
                RecordState::Completed { token, record } => {
                    format!("completed, token {}, {} bytes", token.0, record.len())
                }
                RecordState::InFlight { token } => format!("in flight, token {}", token.0),
            };
            println!(
                "5. in Redis: {record_key}\n   {state}, expires in {} s",
                ttl_ms / 1000
            );
        }
        other => println!("5. in Redis: {record_key}: {other:?}"),
    }

    println!(
        "\nthe processor was called {} times in this run; run the example again within ten minutes \
         and call 1 is replayed from Redis",
        PROCESSOR_CALLS.load(Ordering::SeqCst)
    );
}
