//! Durable steps: a checkout with three side effects (charge the card, email the receipt,
//! write the ledger entry), killed between its first and second step, and resumed.
//!
//! ```text
//! cargo run --example steps --features sqlite
//! ```
//!
//! The example runs itself as a child process on an SQLite file in a temporary directory. The
//! child charges the card, and is killed (SIGKILL) right after the `charge` step's value was
//! stored. The parent then calls the checkout again: it waits out the child's lease, takes the
//! call over, gets the charge back from the store without charging again, and runs only the
//! email and ledger steps. It exits non-zero if the card was charged twice.

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use idempotency::{idempotent, step, step_key, Error, SqliteStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    email_id: String,
    ledger_entry: u64,
}

/// How many times this process charged a card.
static CHARGES: AtomicU32 = AtomicU32::new(0);

/// Each step runs at most once per order, whichever process runs the call; `crash` makes the
/// body stop for good after the charge (the parent kills the process there).
#[idempotent(name = "example.checkout", key = order_id, lease = "2s", on_conflict = "wait", wait = "10s", store = store, skip(store, crash))]
async fn checkout(store: &SqliteStore, order_id: &str, crash: bool) -> Result<Receipt, Error> {
    // The same in every run of this call: the payment processor's own idempotency key, which
    // covers the one case steps cannot (a crash while the charge itself is in flight).
    let charge_key = step_key("charge")?;
    println!(
        "processor Idempotency-Key for the charge: {}…",
        &charge_key[..16]
    );
    let charge_id: String = step("charge", async {
        CHARGES.fetch_add(1, Ordering::SeqCst);
        let id = format!("ch_{:012x}", rand::random::<u64>() >> 16);
        println!("charged {id}");
        Ok::<_, Error>(id)
    })
    .await?;
    println!("step `charge` done, its value stored: {charge_id}");
    if crash {
        std::future::pending::<()>().await;
    }
    let email_id: String = step("email", async {
        println!("emailed the receipt for {charge_id}");
        Ok::<_, Error>(format!("em_{:08x}", rand::random::<u32>()))
    })
    .await?;
    let ledger_entry: u64 = step("ledger", async {
        println!("wrote the ledger entry for {charge_id}");
        Ok::<_, Error>(1042)
    })
    .await?;
    Ok(Receipt {
        charge_id,
        email_id,
        ledger_entry,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path, order] = &args[..] {
        if flag == "--child" {
            let store = SqliteStore::open(path).await?;
            checkout(&store, order, true).await?;
            unreachable!("the child is killed after its charge");
        }
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("steps.sqlite");
    let order = format!("order-{:08x}", rand::random::<u32>());
    println!(
        "checkout of {order} in a child process (store: {})",
        path.display()
    );
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--child")
        .arg(&path)
        .arg(&order)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut charged = None;
    while let Some(line) = lines.next_line().await? {
        println!("  child: {line}");
        if let Some(rest) = line.strip_prefix("charged ") {
            charged = Some(rest.to_owned());
        }
        if line.starts_with("step `charge` done") {
            break;
        }
    }
    let charged = charged.ok_or("the child ended before its charge completed")?;
    child.kill().await?; // SIGKILL: no cleanup, the claim stays in flight until its lease ends
    println!("killed the child between `charge` and `email`\n");

    println!("calling again: waits out the child's 2 s lease, takes the call over, resumes");
    let store = SqliteStore::open(&path).await?;
    let receipt = checkout(&store, &order, false).await?;
    println!("{receipt:?}");
    if CHARGES.load(Ordering::SeqCst) > 0 || receipt.charge_id != charged {
        eprintln!("the card was charged twice");
        std::process::exit(1);
    }
    println!("the charge {charged} was replayed from the store, not run again");
    Ok(())
}
