//! A Redis Streams consumer group made effectively-once: every job's side effect happens once,
//! although the stream delivers at least once.
//!
//! ```text
//! cargo run --example redis_streams --features redis      # Redis at redis://127.0.0.1:6379
//! IDEM_REDIS_URL=redis://host:6379/2 cargo run --example redis_streams --features redis
//! ```
//!
//! It runs for a few seconds on a stream of its own (a random name): a producer adds jobs,
//! some of them twice (a producer that retried `XADD` after losing the reply), one consumer
//! reads a batch and dies without acknowledging it, and three workers consume the rest, take
//! the dead consumer's messages over with `XAUTOCLAIM`, and fulfil every job once. It prints a
//! summary, deletes its keys, and exits 0 (1 if a job was lost or fulfilled twice).
//!
//! How a worker is put together, and why:
//!
//! - **The key is the job's own id, from the payload; never the stream entry id.** A producer
//!   that retries `XADD` (its connection dropped before the reply) adds a second entry, with a
//!   new entry id, for the same job. Keyed by the job id, the second delivery replays the first
//!   one's result; keyed by the entry id, it would fulfil the job again.
//! - **The fingerprint is the job's payload** (every parameter not in `skip`). A second entry
//!   with the same job id but other contents is a producer bug: `Error::KeyReuse`, nothing
//!   runs. Retrying cannot help, so the worker parks it on a dead-letter stream and acks it.
//! - **The lease is shorter than `XAUTOCLAIM`'s min-idle time.** A worker that dies mid-job
//!   leaves its message pending *and* its claim in the store. `XAUTOCLAIM` hands the message to
//!   another worker only after it has been idle for `MIN_IDLE`; by then the dead worker's lease
//!   (renewed while it lived, never after) has lapsed, so the new worker takes the key over at
//!   once and runs the job, instead of waiting on a claim nobody will finish. A job that was cut
//!   off mid-body therefore runs at most twice; a job that finished runs once, however often its
//!   message is delivered.
//! - **Ack after the call returns `Ok`**, whether the body ran or the result was replayed: the
//!   job is done. On `InFlight` or `WaitTimeout` (another worker still holds the job) or a
//!   store error, do not ack: the message stays pending and comes back through `XAUTOCLAIM`.
//!   A live worker whose job outlasts `MIN_IDLE` may see its message claimed by another: that
//!   worker finds the claim held (the lease is being renewed), waits for the result, replays it
//!   and acks; harmless, but pick `MIN_IDLE` well above a batch's usual run time.
//!
//! What is guaranteed: every job whose message is added is fulfilled (its message is acked only
//! once the job is done); a job's side effect happens once, or twice if a worker died in the
//! middle of it (idem cannot know whether the dead worker's effect took place: make the effect
//! itself check the fencing token, or use durable steps, to go further).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotency::redis::redis::{self, aio::MultiplexedConnection, AsyncConnectionConfig};
use idempotency::{idempotent, Error, RedisStore};
use serde::{Deserialize, Serialize};

/// How long a worker's claim on a job lives without renewal. Well below `MIN_IDLE`.
const LEASE: Duration = Duration::from_secs(1);
/// How long a message must have been pending before another worker takes it over.
const MIN_IDLE: Duration = Duration::from_secs(3);
/// How often each worker looks for messages to take over.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Messages per `XREADGROUP`, and how long it blocks when the stream is idle.
const BATCH: usize = 10;
const BLOCK: Duration = Duration::from_millis(200);

/// A job as the producer writes it: the payload of a stream entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    /// The producer's id for the job: the idempotency key.
    id: String,
    sku: String,
    quantity: u32,
}

/// What fulfilling a job returns; a replay returns the same value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipment {
    job_id: String,
    shipment_id: String,
    worker: String,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Idempotency(#[from] Error),
}

/// The side effect, kept outside the store: shipments made, per job id.
static SHIPPED: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// Fulfils a job at most once per job id, across every worker and process sharing the store.
/// `worker` (each passes its own name) and `ran` (set when the body runs, rather than the
/// result being replayed) are left out of the fingerprint.
#[idempotent(name = "jobs.fulfil", key = job.id.clone(), store = store, skip(store, worker, ran), lease = LEASE, on_conflict = "wait", ttl = "24h")]
async fn fulfil(
    store: &RedisStore,
    worker: &str,
    ran: &AtomicBool,
    job: Job,
) -> Result<Shipment, JobError> {
    ran.store(true, Ordering::Relaxed);
    *SHIPPED
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(job.id.clone())
        .or_default() += 1;
    tokio::time::sleep(Duration::from_millis(30)).await; // the warehouse's API
    Ok(Shipment {
        job_id: job.id,
        shipment_id: format!("sh_{:012x}", rand::random::<u64>() >> 16),
        worker: worker.to_owned(),
    })
}

/// A stream entry: its id and its fields.
type Entry = (String, HashMap<String, String>);

/// Where the workers read from, and what they counted.
struct Consumers {
    stream: String,
    group: String,
    dead_letters: String,
    store: RedisStore,
    acked: AtomicUsize,
    deliveries: AtomicUsize,
    redeliveries: AtomicUsize,
    replays: AtomicUsize,
    stop: AtomicBool,
}

/// A connection for the stream commands, with a response timeout above `BLOCK`.
async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// New messages for `consumer`: `XREADGROUP GROUP g consumer COUNT n BLOCK ms STREAMS s >`.
async fn read_new(
    con: &mut MultiplexedConnection,
    c: &Consumers,
    consumer: &str,
) -> redis::RedisResult<Vec<Entry>> {
    let reply: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&c.group)
        .arg(consumer)
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&c.stream)
        .arg(">")
        .query_async(con)
        .await?;
    Ok(reply.into_iter().flatten().flat_map(|(_, e)| e).collect())
}

/// Messages pending longer than `MIN_IDLE` (their consumer died or is stuck), now `consumer`'s:
/// `XAUTOCLAIM s g consumer min-idle cursor`. Returns them and the cursor of the next sweep.
async fn claim_idle(
    con: &mut MultiplexedConnection,
    c: &Consumers,
    consumer: &str,
    cursor: &str,
) -> redis::RedisResult<(String, Vec<Entry>)> {
    // Redis 7 adds a third element: ids of entries deleted from the stream meanwhile.
    let (next, entries, _deleted): (String, Vec<Entry>, Vec<String>) = redis::cmd("XAUTOCLAIM")
        .arg(&c.stream)
        .arg(&c.group)
        .arg(consumer)
        .arg(MIN_IDLE.as_millis() as u64)
        .arg(cursor)
        .query_async(con)
        .await?;
    Ok((next, entries))
}

/// Handles one delivered message, and acks it once its job is done (or can never be done).
async fn handle(
    con: &mut MultiplexedConnection,
    c: &Consumers,
    consumer: &str,
    (entry_id, fields): Entry,
) -> redis::RedisResult<()> {
    c.deliveries.fetch_add(1, Ordering::Relaxed);
    let Some(job) = fields
        .get("job")
        .and_then(|j| serde_json::from_str::<Job>(j).ok())
    else {
        return park(con, c, &entry_id, "not a job").await;
    };
    let ran = AtomicBool::new(false);
    match fulfil(&c.store, consumer, &ran, job.clone()).await {
        Ok(shipment) => {
            if !ran.load(Ordering::Relaxed) {
                c.replays.fetch_add(1, Ordering::Relaxed);
                println!(
                    "{consumer}: {} already shipped as {} (replayed)",
                    job.id, shipment.shipment_id
                );
            }
            ack(con, c, &entry_id).await
        }
        // Another worker holds the job (or the store is down): leave the message pending;
        // XAUTOCLAIM brings it back once it has been idle for MIN_IDLE.
        Err(JobError::Idempotency(
            Error::InFlight { .. } | Error::WaitTimeout { .. } | Error::Store { .. },
        )) => Ok(()),
        // The same job id with another payload: a producer bug no retry fixes.
        Err(JobError::Idempotency(e @ Error::KeyReuse { .. })) => {
            park(con, c, &entry_id, &e.to_string()).await
        }
        Err(e) => {
            eprintln!(
                "{consumer}: job {} failed, left pending for a retry: {e}",
                job.id
            );
            Ok(())
        }
    }
}

/// `XACK s g id`.
async fn ack(con: &mut MultiplexedConnection, c: &Consumers, id: &str) -> redis::RedisResult<()> {
    let _: u64 = redis::cmd("XACK")
        .arg(&c.stream)
        .arg(&c.group)
        .arg(id)
        .query_async(con)
        .await?;
    c.acked.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Moves a message that can never be handled to the dead-letter stream, and acks it.
async fn park(
    con: &mut MultiplexedConnection,
    c: &Consumers,
    id: &str,
    why: &str,
) -> redis::RedisResult<()> {
    eprintln!("entry {id} parked on {}: {why}", c.dead_letters);
    let _: String = redis::cmd("XADD")
        .arg(&c.dead_letters)
        .arg("*")
        .arg("entry")
        .arg(id)
        .arg("why")
        .arg(why)
        .query_async(con)
        .await?;
    ack(con, c, id).await
}

/// A worker: takes over idle messages every `SWEEP_EVERY`, else reads new ones.
async fn worker(url: String, c: Arc<Consumers>, name: String) -> redis::RedisResult<()> {
    let mut con = connect(&url).await?;
    let mut cursor = "0-0".to_owned();
    let mut last_sweep = Instant::now();
    while !c.stop.load(Ordering::Relaxed) {
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let (next, entries) = claim_idle(&mut con, &c, &name, &cursor).await?;
            cursor = next;
            c.redeliveries.fetch_add(entries.len(), Ordering::Relaxed);
            for entry in entries {
                println!("{name}: took over {} from a dead consumer", entry.0);
                handle(&mut con, &c, &name, entry).await?;
            }
        }
        for entry in read_new(&mut con, &c, &name).await? {
            handle(&mut con, &c, &name, entry).await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let run = format!("{:08x}", rand::random::<u32>());
    let prefix = format!("idem-streams-example-{run}");
    let store = match RedisStore::connect_with_prefix(&url, &prefix).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cannot reach Redis at {url}: {e}\nstart one with `redis-server`, or set IDEM_REDIS_URL");
            std::process::exit(1);
        }
    };
    let mut con = connect(&url).await.expect("connect to Redis");
    let c = Arc::new(Consumers {
        stream: format!("jobs-{run}"),
        group: "fulfilment".to_owned(),
        dead_letters: format!("jobs-{run}:dead"),
        store,
        acked: AtomicUsize::new(0),
        deliveries: AtomicUsize::new(0),
        redeliveries: AtomicUsize::new(0),
        replays: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    // The group reads the stream from its start; MKSTREAM creates the stream if need be. A
    // worker that starts later gets BUSYGROUP here, which it ignores.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&c.stream)
        .arg(&c.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await
        .expect("XGROUP CREATE");

    // The producer: 30 jobs, and every sixth sent again, as after a lost XADD reply.
    let jobs = 30;
    let mut entries = 0;
    for i in 0..jobs {
        let job = Job {
            id: format!("order-{run}-{i:03}"),
            sku: format!("sku-{}", i % 7),
            quantity: 1 + i % 3,
        };
        let payload = serde_json::to_string(&job).expect("JSON");
        for _ in 0..if i % 6 == 0 { 2 } else { 1 } {
            let _: String = redis::cmd("XADD")
                .arg(&c.stream)
                .arg("*")
                .arg("job")
                .arg(&payload)
                .query_async(&mut con)
                .await
                .expect("XADD");
            entries += 1;
        }
    }

    // A consumer that reads a batch and dies before handling it: its messages stay pending
    // until a worker's XAUTOCLAIM takes them over, MIN_IDLE later.
    let lost = read_new(&mut con, &c, "crashed").await.expect("XREADGROUP");
    println!("consumer `crashed` read {} messages and died", lost.len());
    c.deliveries.fetch_add(lost.len(), Ordering::Relaxed);

    let started = Instant::now();
    let workers: Vec<_> = (1..=3)
        .map(|i| tokio::spawn(worker(url.clone(), c.clone(), format!("worker-{i}"))))
        .collect();
    while c.acked.load(Ordering::Relaxed) < entries && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker task").expect("worker");
    }

    // XPENDING's summary: the number of pending messages first.
    let summary: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(&c.stream)
        .arg(&c.group)
        .query_async(&mut con)
        .await
        .expect("XPENDING");
    let pending = match summary.first() {
        Some(redis::Value::Int(n)) => *n,
        other => panic!("XPENDING replied {other:?}"),
    };
    let shipped = SHIPPED.lock().unwrap().take().unwrap_or_default();
    let twice = shipped.values().filter(|&&n| n > 1).count();
    println!(
        "\n{jobs} jobs in {entries} entries, done in {:.1} s: {} deliveries ({} of them redeliveries of the dead consumer's messages), {} duplicates absorbed (replayed), {} shipments, {twice} jobs shipped twice, {} jobs not shipped, {pending} messages still pending",
        started.elapsed().as_secs_f64(),
        c.deliveries.load(Ordering::Relaxed),
        c.redeliveries.load(Ordering::Relaxed),
        c.replays.load(Ordering::Relaxed),
        shipped.values().sum::<u32>(),
        jobs as usize - shipped.len(),
    );

    // Clean up: the streams, and the store's records under its prefix.
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    keys.extend([c.stream.clone(), c.dead_letters.clone()]);
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut con).await;

    if twice > 0 || shipped.len() != jobs as usize || pending > 0 {
        std::process::exit(1);
    }
}
