//! A job consumer where several workers receive the same message.
//!
//! Queues deliver at least once, and fan-out or redelivery after a visibility timeout means
//! several workers can hold the same message. Each job below runs once; the other workers get
//! its result and acknowledge the message.
//!
//! ```text
//! cargo run --example jobs
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotency::{idempotent, MemoryStore, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    id: u64,
    email: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sent {
    message_id: u64,
    provider_id: String,
    worker: usize,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// Emails really sent.
static EMAILS_SENT: AtomicU32 = AtomicU32::new(0);

/// Sends the welcome email for a message, once per message id. `worker` is who ran it: it is
/// skipped from the fingerprint, since every worker passes its own number.
#[idempotent(name = "jobs.send_email", key = msg.id, store = store.clone(), skip(store, worker), on_conflict = "wait", lease = "5s", ttl = "1h")]
async fn send_welcome(
    store: Arc<dyn Store>,
    worker: usize,
    msg: Message,
) -> Result<Sent, JobError> {
    EMAILS_SENT.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await; // the email provider's API
    Ok(Sent {
        message_id: msg.id,
        provider_id: format!("em_{:08x}", rand::random::<u32>()),
        worker,
    })
}

#[tokio::main]
async fn main() {
    // One store shared by the workers (in production: Redis or PostgreSQL, shared by processes).
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (queue, _) = broadcast::channel::<Message>(64);

    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let mut inbox = queue.subscribe();
            let store = store.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                while let Ok(msg) = inbox.recv().await {
                    let sent = send_welcome(store.clone(), worker, msg)
                        .await
                        .expect("job failed");
                    acked.push(sent);
                }
                (worker, acked)
            })
        })
        .collect();

    // Every worker receives every message (fan-out), and message 2 is redelivered.
    for (id, email) in [
        (1, "ana@example.com"),
        (2, "bo@example.com"),
        (2, "bo@example.com"),
        (3, "cy@example.com"),
    ] {
        queue
            .send(Message {
                id,
                email: email.into(),
            })
            .unwrap();
    }
    drop(queue);

    for w in workers {
        let (worker, acked) = w.await.unwrap();
        for s in acked {
            println!(
                "worker {worker} acked message {} -> {} (sent by worker {})",
                s.message_id, s.provider_id, s.worker
            );
        }
    }
    println!(
        "\n{} deliveries to 4 workers, {} emails sent (one per message)",
        4 * 4,
        EMAILS_SENT.load(Ordering::SeqCst)
    );
    // Before returning from `main` (on SIGTERM, once the consumer stopped polling): finish the
    // bodies whose callers gave up, or record their unknown outcome. Returning without it would
    // drop them mid-way, as a crash does, and a redelivery would run them again.
    let report = idempotency::drain(std::time::Duration::from_secs(20)).await;
    println!("drained: {report:?}");
}
