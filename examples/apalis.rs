//! An apalis job handler that sends each email at most once, on apalis's Redis backend.
//!
//! apalis delivers a task at least once: the tasks of a worker that died are pushed back on the
//! queue once its heartbeats stop, and a producer that retries a push makes a second task for
//! the same job. The handler below calls an `#[idempotent]` function keyed by the job's own id
//! (in its payload), so whichever task of a job comes first sends the email, and every other
//! delivery of that job gets the same result without sending it again.
//!
//! ```text
//! cargo run --example apalis --features redis           # Redis at redis://127.0.0.1:6379
//! IDEM_REDIS_URL=redis://host:6379/2 cargo run --example apalis --features redis
//! ```
//!
//! It pushes 10 jobs (4 of them twice) on a queue of its own, runs two workers until every task
//! is done (10 s at most), prints what happened and deletes its keys.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Data, TaskId, TaskSink, WorkerBuilder, WorkerContext};
use apalis_redis::{Config, RedisStorage};
use idempotency::redis::redis;
use idempotency::{idempotent, RedisStore};
use serde::{Deserialize, Serialize};

/// The job: its `id` is the producer's, the same on every push of the job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Email {
    id: String,
    to: String,
}

/// What the email provider answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sent {
    provider_id: String,
    worker: String,
}

/// The handlers' shared state, given to apalis as `Data`.
#[derive(Clone)]
struct App {
    store: Arc<RedisStore>,
    /// Emails really sent: the side effect, outside the store.
    sent: Arc<AtomicU32>,
    /// Tasks apalis handed to a handler.
    delivered: Arc<AtomicU32>,
}

/// Sends the email at most once per job id, across every worker and process sharing the Redis
/// server. A second task of the same job waits while the first one runs (`on_conflict =
/// "wait"`) and then gets its result. If a worker dies in the middle, apalis-redis re-enqueues
/// its tasks once its heartbeats stop (`heartbeat_interval × missed_heartbeats`, 2 to 3 s
/// below); the next worker's call waits until the dead claim's 10 s lease lapses (`wait` must
/// cover that), takes it over and sends the email again: a crash in the middle of the body
/// means at most twice. The record's `ttl` must outlast any redelivery or retried push.
///
/// Keying by apalis's task id instead (a `TaskId` argument of the handler, `key =
/// task.to_string()`) would absorb only redeliveries of the same task (a dead worker's tasks,
/// retries), not a second push of the same job, which is a new task with a new id.
#[idempotent(name = "jobs.email", key = job.id.clone(), store = store, skip(store, app, worker), ttl = "1h", lease = "10s", on_conflict = "wait", wait = "30s")]
async fn send_email(
    store: &RedisStore,
    app: &App,
    worker: &str,
    job: Email,
) -> Result<Sent, idempotency::Error> {
    app.sent.fetch_add(1, Ordering::SeqCst);
    // The provider's call.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Sent {
        provider_id: format!("msg_{:016x}", rand::random::<u64>()),
        worker: worker.to_owned(),
    })
}

/// The apalis handler.
async fn handle(
    job: Email,
    task: TaskId,
    app: Data<App>,
    worker: WorkerContext,
) -> Result<Sent, BoxDynError> {
    app.delivered.fetch_add(1, Ordering::SeqCst);
    let sent = send_email(&app.store, &app, worker.name(), job.clone()).await?;
    println!(
        "{} task {task} {} -> {} (sent by {})",
        worker.name(),
        job.id,
        sent.provider_id,
        sent.worker
    );
    Ok(sent)
}

#[tokio::main]
async fn main() {
    let url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let run = format!("{:08x}", rand::random::<u32>());
    let queue = format!("idem-example-apalis-{run}");
    let store = match RedisStore::connect_with_prefix(&url, &format!("idem-example-apalis-{run}"))
        .await
    {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!("cannot reach Redis at {url}: {e}\nstart one with `redis-server`, or set IDEM_REDIS_URL");
            std::process::exit(1);
        }
    };
    let conn = apalis_redis::connect(url.as_str())
        .await
        .expect("apalis connects to Redis");
    // A dead worker's tasks go back on the queue 2 to 3 s after its last heartbeat (the
    // default is 30 s × 10).
    let config = Config::default()
        .queue(&queue)
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(2);
    let mut producer = RedisStorage::<Email>::new(conn).with_config(config);

    // 10 jobs; the producer retries the push of 4 of them (a timeout it could not tell from a
    // failure): 14 tasks.
    let mut tasks = 0;
    for n in 0..10 {
        let job = Email {
            id: format!("email-{n}"),
            to: format!("user{n}@example.com"),
        };
        for _ in 0..(if n % 3 == 0 { 2 } else { 1 }) {
            producer.push(job.clone()).await.expect("push a job");
            tasks += 1;
        }
    }
    println!("pushed {tasks} tasks for 10 jobs on the apalis queue `{queue}`");

    let app = App {
        store,
        sent: Arc::new(AtomicU32::new(0)),
        delivered: Arc::new(AtomicU32::new(0)),
    };
    // Two workers on the queue (in one process here; in production, one per process).
    let mut runs = Vec::new();
    for w in ["worker-a", "worker-b"] {
        let worker = WorkerBuilder::new(format!("{queue}-{w}"))
            .backend(producer.clone())
            .data(app.clone())
            .build(handle);
        let delivered = app.delivered.clone();
        runs.push(tokio::spawn(worker.run_with_ctx(move |ctx| {
            let delivered = delivered.clone();
            async move {
                let until = Instant::now() + Duration::from_secs(10);
                while delivered.load(Ordering::SeqCst) < tasks && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A moment for the last results to be acknowledged.
                tokio::time::sleep(Duration::from_millis(300)).await;
                ctx.stop()
            }
        })));
    }
    for run in runs {
        if let Err(e) = run.await.expect("worker task") {
            eprintln!("a worker stopped with {e}");
        }
    }

    let sent = app.sent.load(Ordering::SeqCst);
    let delivered = app.delivered.load(Ordering::SeqCst);
    println!(
        "\n{delivered} tasks delivered, {sent} emails sent, {} duplicate deliveries absorbed",
        delivered.saturating_sub(sent)
    );

    // Delete the queue's keys and the records.
    let mut con = app.store.connection();
    for pattern in [format!("{queue}:*"), format!("{}:*", app.store.prefix())] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut con).await;
        }
    }
    let _: redis::RedisResult<()> = redis::cmd("ZREM")
        .arg("core:apalis:queues:list")
        .arg(format!("{queue}:workers"))
        .query_async(&mut con)
        .await;
    println!("deleted the queue `{queue}` and its records");

    if delivered != tasks || sent != 10 {
        eprintln!("expected {tasks} deliveries and 10 emails sent");
        std::process::exit(1);
    }
}
