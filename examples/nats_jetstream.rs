//! A NATS JetStream pull consumer made effectively-once with `#[idempotent]`.
//!
//! JetStream delivers at least once: a message not acknowledged within the consumer's
//! `ack_wait` is delivered again, to this worker or another, whether its job never ran, is
//! still running, or ran and only the ack was lost. Keying the job handler by the job's id in a
//! shared store (Redis here) makes every delivery after the first replay the stored result
//! instead of shipping the parcel again; the handler then acknowledges the message.
//!
//! ```text
//! nats-server -js &                                   # JetStream at nats://127.0.0.1:4222
//! cargo run --example nats_jetstream --features redis # Redis at redis://127.0.0.1:6379
//! IDEM_NATS_URL=nats://host:4222 IDEM_REDIS_URL=redis://host:6379 cargo run ...
//! ```
//!
//! The example creates a stream with a random name and a durable pull consumer, publishes 20
//! jobs (one of them twice, as a producer retry would), lets three workers consume them while
//! one worker "crashes" between running a job and acknowledging it, prints what ran and what
//! was replayed, and deletes its stream.
//!
//! Choosing the lease and `ack_wait`:
//!
//! - The lease (`lease = "1s"`) is shorter than `ack_wait` (2 s). A worker that dies in the
//!   middle of a job stops renewing its lease; by the time JetStream redelivers the message
//!   (`ack_wait` after the last delivery or progress ack), the lease has lapsed and the next
//!   worker takes the claim over at once instead of waiting for it (a crash mid-body means the
//!   body runs at most twice, like any takeover).
//! - idem renews the lease while the body runs, but JetStream knows nothing of that: a job
//!   longer than `ack_wait` would be delivered to a second worker, which then waits for the
//!   first (`on_conflict = "wait"`), holding the message too. The worker therefore sends
//!   `AckKind::Progress` (`+WPI`, "work in progress") every `ack_wait / 2` while the call runs,
//!   which restarts JetStream's `ack_wait` clock. Keep `progress interval + lease < ack_wait`,
//!   so that after a crash the redelivery still finds the lease lapsed.
//! - A call that fails with `InFlight` or `WaitTimeout` (another worker still holds the job) is
//!   not acknowledged: JetStream redelivers it, and the next delivery replays or takes over.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream, AckKind};
use futures::StreamExt;
use idempotency::{idempotent, Store};
use serde::{Deserialize, Serialize};

/// How many jobs the example publishes.
const JOBS: usize = 20;
/// How many workers consume them (tasks of this process; in production, processes).
const WORKERS: usize = 3;
/// JetStream redelivers a message not acknowledged within this long.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a worker tells JetStream the job it holds is still in progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A job as published: the id is the idempotency key (and the `Nats-Msg-Id`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    parcel: String,
}

/// What shipping a job produced; replayed to every later delivery of the same job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipment {
    job: String,
    label: String,
    worker: usize,
}

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// Parcels really shipped (the side effect outside the store).
static SHIPPED: AtomicU32 = AtomicU32::new(0);

/// Ships a job's parcel once per job id, whichever worker and delivery gets there first.
/// `worker` is who ran it: skipped from the fingerprint, since each worker passes its own;
/// `ran` tells the caller that this call ran the body (else it replayed a stored result).
#[idempotent(name = "jobs.ship", key = job.id.clone(), store = store.clone(), skip(store, worker, ran), lease = "1s", on_conflict = "wait", wait = "10s", ttl = "1h")]
async fn ship(
    store: Arc<dyn Store>,
    worker: usize,
    ran: &AtomicBool,
    job: Job,
) -> Result<Shipment, ShipError> {
    ran.store(true, Ordering::SeqCst);
    SHIPPED.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await; // the carrier's API
    Ok(Shipment {
        job: job.id,
        label: format!("lbl_{:08x}", rand::random::<u32>()),
        worker,
    })
}

/// What the workers saw, for the summary.
#[derive(Default)]
struct Tally {
    deliveries: u32,
    redeliveries: u32,
    replays: u32,
    acked: HashSet<String>,
}

/// Fetches batches until `stop`, runs each job through [`ship`] with progress acks while it
/// runs, and acknowledges it. Worker 0 skips the ack of its first job once, as if it had
/// crashed right after shipping: JetStream redelivers that message after `ack_wait`.
async fn work(
    worker: usize,
    consumer: consumer::PullConsumer,
    store: Arc<dyn Store>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) -> Result<(), async_nats::Error> {
    let mut crash_once = worker == 0;
    while !stop.load(Ordering::SeqCst) {
        let mut batch = consumer
            .fetch()
            .max_messages(5)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            let message = message?;
            let delivered = message.info()?.delivered;
            let job: Job = serde_json::from_slice(&message.payload)?;

            // idem renews its lease while the body runs; JetStream needs to hear it too.
            let heartbeat = {
                let message = message.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(PROGRESS_EVERY).await;
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                })
            };
            let ran = AtomicBool::new(false);
            let out = ship(store.clone(), worker, &ran, job.clone()).await;
            heartbeat.abort();

            let ran = ran.load(Ordering::SeqCst);
            {
                let mut t = tally.lock().unwrap();
                t.deliveries += 1;
                t.redeliveries += u32::from(delivered > 1);
                t.replays += u32::from(out.is_ok() && !ran);
            }
            match out {
                Ok(shipment) => {
                    let how = if ran { "shipped" } else { "replayed" };
                    println!(
                        "worker {worker}: {} delivery {delivered}: {how} {} (label {}, by worker {})",
                        job.id, job.parcel, shipment.label, shipment.worker
                    );
                    if crash_once {
                        crash_once = false;
                        println!(
                            "worker {worker}: {} shipped but never acked (a crash)",
                            job.id
                        );
                        continue;
                    }
                    message.ack().await?;
                    tally.lock().unwrap().acked.insert(job.id);
                }
                // Another worker holds the job (or the store failed): no ack, JetStream
                // delivers it again after `ack_wait`.
                Err(e) => println!("worker {worker}: {} not acked: {e}", job.id),
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let nats_url =
        std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let redis_url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());

    let client = match tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::connect(nats_url.as_str()),
    )
    .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => fail(&format!("cannot reach NATS at {nats_url}: {e}")),
        Err(_) => fail(&format!(
            "cannot reach NATS at {nats_url}: no answer in 5 s"
        )),
    };
    let js = jetstream::new(client);
    let store = match idempotency::connect(&redis_url).await {
        Ok(store) => store,
        Err(e) => fail(&format!("cannot reach Redis at {redis_url}: {e}")),
    };

    let name = format!("idem-example-{:08x}", rand::random::<u32>());
    let subject = format!("jobs.{name}");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            // The window in which JetStream drops a second publish with the same Nats-Msg-Id.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        // A server without JetStream (started without `-js`) refuses here.
        .unwrap_or_else(|e| {
            fail(&format!(
                "cannot create a JetStream stream on {nats_url} ({e}): is it started with `-js`?"
            ))
        });
    let outcome = run(&js, &stream, &subject, store).await;
    if let Err(e) = js.delete_stream(&name).await {
        eprintln!("could not delete the stream {name}: {e}");
    }
    match outcome {
        Ok(()) => println!("stream {name} deleted"),
        Err(e) => fail(&e),
    }
}

/// Publishes the jobs, runs the workers until every job is acknowledged, prints the summary.
async fn run(
    js: &jetstream::Context,
    stream: &stream::Stream,
    subject: &str,
    store: Arc<dyn Store>,
) -> Result<(), String> {
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("shippers".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // Generous: a job redelivered this many times is dropped by JetStream.
            max_deliver: 20,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create the consumer: {e}"))?;

    // `Nats-Msg-Id` makes JetStream drop a second publish of the same job within the duplicate
    // window: that covers a producer retrying a publish whose ack it did not get. It does
    // nothing for redelivery to consumers (a message stored once is still delivered at least
    // once): that is what the idempotency key in the handler is for.
    let mut deduplicated = 0;
    for n in 0..JOBS {
        let job = Job {
            id: format!("job-{n:02}"),
            parcel: format!("parcel #{}", 1000 + n),
        };
        let payload = serde_json::to_vec(&job).map_err(|e| e.to_string())?;
        // Job 0 is published twice, as by a producer retry.
        for _ in 0..if n == 0 { 2 } else { 1 } {
            let ack = js
                .send_publish(
                    subject.to_owned(),
                    PublishMessage::build()
                        .message_id(&job.id)
                        .payload(payload.clone().into()),
                )
                .await
                .map_err(|e| format!("publish: {e}"))?
                .await
                .map_err(|e| format!("publish ack: {e}"))?;
            if ack.duplicate {
                deduplicated += 1;
            }
        }
    }

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(work(
                w,
                consumer.clone(),
                store.clone(),
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let began = Instant::now();
    let mut consumer = consumer;
    let done = loop {
        let info = consumer
            .info()
            .await
            .map_err(|e| format!("consumer info: {e}"))?;
        let settled = info.num_ack_pending == 0 && info.num_pending == 0;
        if settled && tally.lock().unwrap().acked.len() == JOBS {
            break true;
        }
        if began.elapsed() > Duration::from_secs(30) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("a worker failed: {e}")),
            Err(e) => return Err(format!("a worker panicked: {e}")),
        }
    }

    let t = tally.lock().unwrap();
    let shipped = SHIPPED.load(Ordering::SeqCst);
    println!(
        "\n{JOBS} jobs in {:.1} s: {deduplicated} duplicate publish dropped by JetStream, \
         {} deliveries ({} redeliveries), {shipped} parcels shipped, {} deliveries replayed \
         from the store",
        began.elapsed().as_secs_f64(),
        t.deliveries,
        t.redeliveries,
        t.replays
    );
    if !done {
        return Err(format!(
            "not every job was acknowledged in 30 s ({} of {JOBS})",
            t.acked.len()
        ));
    }
    if shipped as usize != JOBS {
        return Err(format!("{shipped} parcels shipped for {JOBS} jobs"));
    }
    Ok(())
}

/// Prints why the example cannot go on, and exits non-zero.
fn fail(why: &str) -> ! {
    eprintln!("{why}");
    std::process::exit(1)
}
