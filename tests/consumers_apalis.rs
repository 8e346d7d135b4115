//! An idempotent apalis job handler across OS processes: three apalis workers on one Redis
//! queue (apalis-redis 1.0), each job's handler calling an `#[idempotent]` function keyed by the
//! job's own id. One worker is SIGKILLed in the middle of a job; apalis re-enqueues the tasks of
//! the dead worker (its heartbeat stops, another worker's heartbeat finds it orphaned), the idem
//! claim of the dead worker lapses with its lease, and the job runs again elsewhere. Some jobs
//! are pushed twice (a producer retrying its push makes a second apalis task for the same job):
//! the second task replays the first one's result.
//!
//! Built like `tests/steps_processes.rs`: the workers are this test binary run again with
//! `--exact worker` (the role in `IDEM_WORKER`), and every handler appends to a ledger file
//! outside the store (one `O_APPEND` write per line): `deliver <job> <task> <pid>` when apalis
//! hands it a task, `start <job> <pid>` where the job's side effect starts, `end <job> <pid>`
//! where it ends, and `settled <job> <task> <pid> <result>` once the idempotent call returned.
//! The queue, the store's key prefix and the worker names are random; the keys are deleted at
//! the end. Skipped with a message when Redis (`IDEM_REDIS_URL`) is unreachable unless
//! `IDEM_REQUIRE_SERVICES=1`.
#![cfg(all(feature = "redis", unix))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Data, TaskId, TaskSink, WorkerBuilder, WorkerBuilderExt};
use apalis_redis::{Config, RedisStorage};
use idempotency::redis::redis;
use idempotency::{idempotent, Error, RedisStore, Store};
use serde::{Deserialize, Serialize};

/// The environment variable that makes the `worker` test a worker.
const ROLE: &str = "IDEM_WORKER";
/// Marks the lines of stdout that carry a worker's reports.
const MARK: &str = "@idem ";
/// Distinct jobs pushed.
const JOBS: usize = 200;
/// Every this-many-th job is pushed a second time, right after the first (a retried push).
const DUP_EVERY: usize = 8;
/// Worker processes.
const WORKERS: usize = 3;
/// The whole test's bound.
const DEADLINE: Duration = Duration::from_secs(90);

/// The job's payload: its own id is the idempotency key (the apalis task id is not: a retried
/// push makes a new task, with a new id, for the same job).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Email {
    id: String,
    to: String,
}

/// The apalis queue's settings shared by the producer and the workers. A worker heartbeats
/// every second and is taken for dead after 3 missed heartbeats: its in-flight tasks are then
/// pushed back on the queue by another worker's next heartbeat (2 to 4 s after the last one, as
/// apalis-redis counts in whole seconds).
fn queue_config(queue: &str) -> Config {
    Config::default()
        .queue(queue)
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(3)
        .batch_size(2)
}

// ---- the worker side ------------------------------------------------------------------------

/// What every handler of a worker needs, given to apalis as `Data`.
#[derive(Clone)]
struct Shared {
    store: Arc<dyn Store>,
    ledger: PathBuf,
}

/// Runs a worker when started by the test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "apalis", "unknown worker role");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let url = idem_support::redis_url();
        let store = RedisStore::connect_with_prefix(&url, &env("IDEM_PREFIX"))
            .await
            .unwrap_or_else(|e| panic!("worker cannot open the store: {e}"));
        let conn = apalis_redis::connect(url.as_str())
            .await
            .expect("apalis connects to Redis");
        let backend =
            RedisStorage::<Email>::new(conn).with_config(queue_config(&env("IDEM_QUEUE")));
        let shared = Shared {
            store: Arc::new(store),
            ledger: PathBuf::from(env("IDEM_LEDGER")),
        };
        let name = format!("{}-{}", env("IDEM_QUEUE"), std::process::id());
        report("ready", &name);
        // One job at a time per worker: at the kill, the victim is in exactly one job's body.
        let worker = WorkerBuilder::new(name)
            .backend(backend)
            .concurrency(1)
            .data(shared)
            .build(handle);
        let out = worker.run().await;
        report(
            "stopped",
            format_args!("{out:?}").to_string().replace('\n', " "),
        );
    });
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one report line for the parent's diagnostics.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// The apalis handler: records the delivery, then sends the email at most once per job id.
async fn handle(job: Email, task: TaskId, shared: Data<Shared>) -> Result<String, BoxDynError> {
    let pid = std::process::id();
    let id = job.id.clone();
    idem_support::append_line(&shared.ledger, &format!("deliver {id} {task} {pid}\n"));
    let sent = send(shared.store.clone(), &shared.ledger, job).await?;
    idem_support::append_line(
        &shared.ledger,
        &format!("settled {id} {task} {pid} {sent}\n"),
    );
    Ok(sent)
}

/// The side effect: `start` and `end` in the ledger around 20 to 50 ms of work. Another task
/// of the same job waits for this one and replays its result; a dead holder's claim is taken
/// over 2 s after its last renewal.
#[idempotent(name = "consumers_apalis.email", key = job.id.clone(), store = store, skip(store, ledger), lease = "2s", on_conflict = "wait", wait = "30s")]
async fn send(store: Arc<dyn Store>, ledger: &Path, job: Email) -> Result<String, Error> {
    let pid = std::process::id();
    idem_support::append_line(ledger, &format!("start {} {pid}\n", job.id));
    tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 31)).await;
    idem_support::append_line(ledger, &format!("end {} {pid}\n", job.id));
    Ok(format!("sent-by-{pid}"))
}

// ---- the parent side ------------------------------------------------------------------------

/// A worker process, SIGKILLed and reaped on drop; its output goes to files for diagnostics.
struct Worker {
    child: Child,
    reaped: bool,
    out: PathBuf,
}

impl Worker {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes the queue's and the store's keys when dropped, whether the test passed or not.
struct Cleanup {
    queue: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        idem_support::redis::delete_matching(&format!("{}:*", self.queue));
        idem_support::redis::delete_prefix(&self.prefix);
        // apalis-redis lists every queue in one global sorted set.
        if let Ok(mut con) =
            redis::Client::open(idem_support::redis_url()).and_then(|c| c.get_connection())
        {
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg("core:apalis:queues:list")
                .arg(format!("{}:workers", self.queue))
                .query(&mut con);
        }
    }
}

/// The ledger's lines, split in words.
fn ledger(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn spawn(dir: &Path, i: usize, queue: &str, prefix: &str, ledger: &Path) -> Worker {
    let out = dir.join(format!("worker-{i}.out"));
    let file = std::fs::File::create(&out).expect("worker output file");
    let child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
        .env(ROLE, "apalis")
        .env("IDEM_QUEUE", queue)
        .env("IDEM_PREFIX", prefix)
        .env("IDEM_LEDGER", ledger)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup the output file"))
        .stderr(file)
        .spawn()
        .expect("start a worker");
    Worker {
        child,
        reaped: false,
        out,
    }
}

#[test]
fn apalis_kill_and_redeliver() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let Some(mut probe) = runtime.block_on(idem_support::redis::probe()) else {
        return;
    };
    let run = format!("{:016x}", rand::random::<u64>());
    let queue = format!("idem-apalis-q-{run}");
    let prefix = format!("idem-apalis-{run}");
    let _cleanup = Cleanup {
        queue: queue.clone(),
        prefix: prefix.clone(),
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let ledger_path = dir.path().join("ledger.txt");

    // The producer: every job once, every DUP_EVERY-th one twice in a row.
    let tasks = runtime.block_on(async {
        let conn = apalis_redis::connect(idem_support::redis_url())
            .await
            .expect("apalis connects to Redis");
        let mut producer = RedisStorage::<Email>::new(conn).with_config(queue_config(&queue));
        let mut tasks = 0;
        for n in 0..JOBS {
            let job = Email {
                id: format!("job-{n:03}"),
                to: format!("user{n}@example.com"),
            };
            let times = if n % DUP_EVERY == 0 { 2 } else { 1 };
            for _ in 0..times {
                producer.push(job.clone()).await.expect("push a job");
                tasks += 1;
            }
        }
        tasks
    });

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|i| spawn(dir.path(), i, &queue, &prefix, &ledger_path))
        .collect();
    let victim = workers[0].pid().to_string();
    let fail = |workers: &[Worker], what: String| -> ! {
        let mut text = what;
        for w in workers {
            text.push_str(&format!("\n--- worker {} ---\n{}", w.pid(), w.output()));
        }
        panic!("{text}");
    };

    // Kill the victim in the middle of a job, once it has finished a few.
    let interrupted = loop {
        if Instant::now() >= deadline {
            fail(
                &workers,
                "the victim never was in the middle of a job".into(),
            );
        }
        let mut open: BTreeMap<String, usize> = BTreeMap::new();
        let mut ended = 0;
        for l in ledger(&ledger_path) {
            if l.len() >= 3 && l[2] == victim {
                match l[0].as_str() {
                    "start" => *open.entry(l[1].clone()).or_default() += 1,
                    "end" => {
                        ended += 1;
                        *open.entry(l[1].clone()).or_default() -= 1;
                    }
                    _ => {}
                }
            }
        }
        if ended >= 3 {
            if let Some((job, _)) = open.iter().find(|(_, n)| **n > 0) {
                workers[0].kill();
                break job.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let killed_at = started.elapsed();

    // Wait until apalis counts every task done and every job has ended.
    let done_set = format!("{queue}:done");
    loop {
        let done: usize = runtime
            .block_on(async {
                redis::cmd("SCARD")
                    .arg(&done_set)
                    .query_async(&mut probe)
                    .await
            })
            .expect("SCARD the done set");
        let ends = ledger(&ledger_path)
            .iter()
            .filter(|l| l[0] == "end")
            .map(|l| l[1].clone())
            .collect::<HashSet<_>>()
            .len();
        if done == tasks && ends == JOBS {
            break;
        }
        for w in &mut workers[1..] {
            if !w.running() {
                let pid = w.pid();
                fail(&workers, format!("worker {pid} ended early"));
            }
        }
        if Instant::now() >= deadline {
            fail(
                &workers,
                format!("by the deadline: {done}/{tasks} tasks done, {ends}/{JOBS} jobs ended"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let settled_at = started.elapsed();
    // A moment for any late duplicate to show in the ledger, then stop the survivors.
    std::thread::sleep(Duration::from_millis(300));
    for w in &mut workers[1..] {
        if !w.running() {
            let pid = w.pid();
            fail(&workers, format!("worker {pid} ended early"));
        }
    }
    for w in &mut workers {
        w.kill();
    }

    // ---- the ledger's account ----
    let lines = ledger(&ledger_path);
    let mut starts: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut ends: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut deliveries_of_task: HashMap<&str, usize> = HashMap::new();
    let (mut deliveries, mut settled_by_survivors, mut delivered_to_survivors) = (0, 0, 0);
    let mut interrupted_task = None;
    for l in &lines {
        match (l[0].as_str(), &l[1..]) {
            ("deliver", [job, task, pid]) => {
                deliveries += 1;
                *deliveries_of_task.entry(task).or_default() += 1;
                if *pid != victim {
                    delivered_to_survivors += 1;
                } else if *job == interrupted {
                    interrupted_task = Some(task.as_str());
                }
            }
            ("start", [job, pid]) => starts.entry(job).or_default().push(pid),
            ("end", [job, pid]) => ends.entry(job).or_default().push(pid),
            ("settled", [_, _, pid, _]) if *pid != victim => settled_by_survivors += 1,
            ("settled", _) => {}
            _ => fail(&workers, format!("a malformed ledger line: {l:?}")),
        }
    }
    let started_count: usize = starts.values().map(Vec::len).sum();
    let effects: usize = ends.values().map(Vec::len).sum();
    let redeliveries = deliveries - deliveries_of_task.len();
    let duplicates_absorbed = deliveries - started_count;
    let interrupted_restarts = starts.values().filter(|p| p.len() > 1).count();
    let lost = (0..JOBS)
        .filter(|n| !ends.contains_key(format!("job-{n:03}").as_str()))
        .count();
    println!(
        "@figures apalis jobs={JOBS} tasks={tasks} deliveries={deliveries} redeliveries={redeliveries} \
         duplicates_absorbed={duplicates_absorbed} effects={effects} \
         interrupted_restarts={interrupted_restarts} lost={lost} killed_at_ms={} settled_ms={}",
        killed_at.as_millis(),
        settled_at.as_millis()
    );

    assert_eq!(lost, 0, "jobs without an end");
    assert_eq!(deliveries_of_task.len(), tasks, "every task delivered");
    for n in 0..JOBS {
        let job = format!("job-{n:03}");
        let e = &ends[job.as_str()];
        assert_eq!(e.len(), 1, "{job}: one effect, got ends by {e:?}");
        let s = &starts[job.as_str()];
        if job == interrupted {
            assert_eq!(
                s.len(),
                2,
                "{job} (interrupted): started again once, by {s:?}"
            );
            assert_eq!(s[0], victim, "{job}: first started by the victim");
            assert_ne!(e[0], victim, "{job}: ended by a survivor");
        } else {
            assert_eq!(s.len(), 1, "{job}: started once, by {s:?}");
        }
    }
    assert_eq!(
        interrupted_restarts, 1,
        "only the interrupted job ran twice"
    );
    let task = interrupted_task.expect("the victim's delivery of the interrupted job");
    assert!(
        deliveries_of_task[task] >= 2,
        "apalis re-enqueued the dead worker's task {task}"
    );
    assert_eq!(
        settled_by_survivors, delivered_to_survivors,
        "every delivery to a live worker ran or replayed"
    );
    // Each second push of a job is a delivery that ran nothing.
    assert!(
        duplicates_absorbed >= tasks - JOBS,
        "{duplicates_absorbed} duplicates absorbed, {} pushed twice",
        tasks - JOBS
    );
    assert!(started.elapsed() < DEADLINE, "within the deadline");
}
