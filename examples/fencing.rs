//! Fencing reaches the database: a body passes its fencing token to the write it guards, so a
//! holder that stalled past its lease cannot apply its write after another caller took over.
//!
//! ```text
//! cargo run --example fencing --features postgres
//! ```
//!
//! Connects to `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`); keeps its
//! idempotency records in `idem_records` and its accounts in `fencing_example_accounts`.
//!
//! What happens:
//! 1. worker A claims the key for "debit 500 from account 1", then stalls (a GC pause, a frozen
//!    VM) for longer than its lease;
//! 2. worker B retries, takes the key over (its token is larger) and debits: the row records
//!    B's token as its fence;
//! 3. A wakes up and tries its debit with its own, older token: the guarded `UPDATE` matches no
//!    row, so the account is debited once. A also learns that its claim is gone.

use std::sync::Arc;
use std::time::Duration;

use idempotency::postgres::tokio_postgres::{self, NoTls};
use idempotency::store::{Claim, FencingToken};
use idempotency::Operation;
use idempotency::{idempotent, PostgresStore, StorageKey, Store};

#[derive(Debug)]
enum DebitError {
    /// The write was refused: a newer holder of the key has written.
    Fenced,
    Db(tokio_postgres::Error),
    Idem(idempotency::Error),
}

impl std::fmt::Display for DebitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DebitError::Fenced => f.write_str("refused by the fence: a newer holder wrote"),
            DebitError::Db(e) => write!(f, "database: {e}"),
            DebitError::Idem(e) => write!(f, "{e}"),
        }
    }
}

impl From<idempotency::Error> for DebitError {
    fn from(e: idempotency::Error) -> Self {
        DebitError::Idem(e)
    }
}

impl From<tokio_postgres::Error> for DebitError {
    fn from(e: tokio_postgres::Error) -> Self {
        DebitError::Db(e)
    }
}

/// The downstream write, guarded by the token: it applies only if no newer holder wrote.
async fn guarded_debit(
    db: &tokio_postgres::Client,
    account: i64,
    amount: i64,
    token: FencingToken,
) -> Result<i64, DebitError> {
    let row = db
        .query_opt(
            "UPDATE fencing_example_accounts SET balance = balance - $2, fence = $3
             WHERE id = $1 AND fence < $3 RETURNING balance",
            &[&account, &amount, &(token.0 as i64)],
        )
        .await?;
    row.map(|r| r.get(0)).ok_or(DebitError::Fenced)
}

/// Debits once per request id; the body hands its fencing token to the write.
#[idempotent(name = "example.debit", key = request_id, store = store.clone(), skip(store, db), lease = "1s")]
async fn debit(
    store: Arc<PostgresStore>,
    db: Arc<tokio_postgres::Client>,
    request_id: String,
    account: i64,
    amount: i64,
) -> Result<i64, DebitError> {
    let call = idempotency::context::current().expect("inside an idempotent call");
    println!(
        "   B's body runs with token {} (takeover: {})",
        call.token().0,
        call.is_takeover()
    );
    call.check()?; // stop before the side effect if the claim is already lost
    guarded_debit(&db, account, amount, call.token()).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = Arc::new(PostgresStore::connect(&url).await?);
    let (db, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let db = Arc::new(db);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS fencing_example_accounts (
             id bigint PRIMARY KEY, balance bigint NOT NULL, fence bigint NOT NULL DEFAULT 0);
         INSERT INTO fencing_example_accounts (id, balance) VALUES (1, 10000)
             ON CONFLICT (id) DO UPDATE SET balance = 10000, fence = 0;",
    )
    .await?;
    let request_id = format!("debit-{:08x}", rand::random::<u32>());
    let key = StorageKey::derive_for(&Operation::named("example.debit"), "", &request_id)?;

    println!("1. worker A claims {request_id} (lease 300 ms), then stalls for 600 ms");
    let a = match store.claim(&key, None, Duration::from_millis(300)).await? {
        Claim::Acquired { token, .. } => token,
        other => return Err(format!("unexpected {other:?}").into()),
    };
    println!("   A holds token {}", a.0);
    tokio::time::sleep(Duration::from_millis(600)).await;

    println!("2. worker B retries the same request");
    match debit(store.clone(), db.clone(), request_id.clone(), 1, 500).await {
        Ok(balance) => println!("   B debited: balance {balance}"),
        Err(e) => println!("   B: {e}"),
    }

    println!("3. worker A wakes up and writes with its old token {}", a.0);
    match guarded_debit(&db, 1, 500, a).await {
        Ok(balance) => println!("   A debited again (this must not happen): balance {balance}"),
        Err(DebitError::Fenced) => println!("   A's write is refused by the fence"),
        Err(e) => println!("   A: {e}"),
    }
    match store.complete(&key, a, b"", Duration::from_secs(60)).await {
        Err(idempotency::Error::LeaseLost { .. }) => {
            println!("   A cannot store a result either: LeaseLost")
        }
        other => println!("   A's complete: {other:?}"),
    }

    let balance: i64 = db
        .query_one(
            "SELECT balance FROM fencing_example_accounts WHERE id = 1",
            &[],
        )
        .await?
        .get(0);
    println!("\nbalance {balance}: debited once (10000 - 500)");
    assert_eq!(balance, 9500);
    Ok(())
}
