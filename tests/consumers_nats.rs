//! A NATS JetStream pull consumer made effectively-once with `#[idempotent]`, across OS
//! processes: 200 jobs on a stream, three worker processes fetching from one durable consumer
//! (`AckPolicy::Explicit`), one of them SIGKILLed in the middle of a job. JetStream redelivers
//! the dead worker's unacknowledged messages to the others once `ack_wait` has passed; the idem
//! store (Redis) absorbs every delivery of a job whose body already ran, and lets the
//! interrupted job be taken over once its holder's lease has lapsed.
//!
//! Built like `tests/steps_processes.rs`: the workers are this test binary run again with
//! `--exact worker` (the role in `IDEM_WORKER`), they print `@idem <kind> <payload>` lines the
//! parent parses, and every job body appends `start <job> <pid>` to a ledger file at its first
//! line and `end <job> <pid>` at its last (one `O_APPEND` write per line), so the ledger shows
//! every run of a body whatever the store or the broker say. Every 50th job's first
//! delivery also "loses" its ack after the body ran (`dropack <job> <pid>`), so JetStream
//! delivers it again and that delivery must replay. A second file records every
//! delivery (`deliver <job> <pid>`, or `redeliver <job> <pid>` when JetStream's delivery count
//! is above 1) and every delivery the store absorbed (`replayed <job> <pid>`).
//!
//! NATS at `IDEM_NATS_URL` (default `nats://127.0.0.1:4222`, started with `-js`) and Redis at
//! `IDEM_REDIS_URL`; skipped with a message when either is unreachable unless
//! `IDEM_REQUIRE_SERVICES=1`. Every run has a random stream name and idem scope, and deletes
//! its stream at the end, failed or not.
#![cfg(all(feature = "redis", unix))]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream, AckKind};
use futures::StreamExt;
use idem_support::process;
use idempotency::{idempotent, Error, StorageKey, Store};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

/// The environment variable that makes the `worker` test a worker, and names its role.
const ROLE: &str = "IDEM_WORKER";
/// Marks the lines of stdout that carry a worker's reports.
const MARK: &str = "@idem ";
/// How many jobs the test publishes.
const JOBS: usize = 200;
/// How many worker processes consume them.
const WORKERS: usize = 3;
/// The consumer's `ack_wait`: an unacknowledged delivery is sent again after this long.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// How often a worker tells JetStream a job is still in progress (`+WPI`). The lease (1 s, in
/// the attribute of [`ship`]) plus this interval stays below `ACK_WAIT`, so a redelivery after
/// a crash always finds the dead holder's lease lapsed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The consumer's name (the stream's name is random).
const CONSUMER: &str = "workers";

/// One job as published: its id (the idempotency key) and how long its body takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    ms: u64,
}

// ---- the worker side ------------------------------------------------------------------------

/// Runs a worker when started by the test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "consume", "unknown worker role");
    // The parent closes our stdin when every job is done: then the worker stops fetching.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::SeqCst);
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(consume(stop));
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one report line for the parent.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// Fetches batches from the consumer until told to stop, runs each job through [`ship`], and
/// acknowledges it once `ship` returned a result (run here or replayed).
async fn consume(stop: Arc<AtomicBool>) {
    let store_url = env("IDEM_STORE");
    let store = idempotency::connect(&store_url)
        .await
        .unwrap_or_else(|e| panic!("worker cannot open `{store_url}`: {e}"));
    let nats_url = env("IDEM_NATS_URL");
    let client = async_nats::connect(&nats_url)
        .await
        .unwrap_or_else(|e| panic!("worker cannot reach NATS at `{nats_url}`: {e}"));
    let js = jetstream::new(client);
    let consumer: consumer::PullConsumer = js
        .get_stream(env("IDEM_STREAM"))
        .await
        .expect("the stream")
        .get_consumer(CONSUMER)
        .await
        .expect("the consumer");
    let ledger = PathBuf::from(env("IDEM_LEDGER"));
    let deliveries = PathBuf::from(env("IDEM_DELIVERIES"));
    let scope = env("IDEM_SCOPE");
    let pid = std::process::id();
    let (mut delivered, mut ran, mut replayed, mut unacked) = (0u64, 0u64, 0u64, 0u64);
    report("ready", pid);
    while !stop.load(Ordering::SeqCst) {
        // A small batch: every fetched message waits its turn in this worker, and one that
        // waited longer than `ack_wait` would be delivered to another worker meanwhile.
        let mut batch = match consumer
            .fetch()
            .max_messages(4)
            .expires(Duration::from_millis(300))
            .messages()
            .await
        {
            Ok(batch) => batch,
            Err(e) => {
                report("fetch-error", e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    report("fetch-error", e);
                    break;
                }
            };
            let attempt = message.info().map(|i| i.delivered).unwrap_or(0);
            let job: Job = serde_json::from_slice(&message.payload).expect("a job");
            delivered += 1;
            let event = if attempt > 1 { "redeliver" } else { "deliver" };
            idem_support::append_line(&deliveries, &format!("{event} {} {pid}\n", job.id));

            // Keeps JetStream from redelivering the message while the call runs (waiting for
            // another holder, or running the body): idem renews its lease, NATS needs `+WPI`.
            let ticking = Arc::new(AtomicBool::new(true));
            let progress = {
                let ticking = ticking.clone();
                let acker = message.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(PROGRESS_EVERY).await;
                        if !ticking.load(Ordering::SeqCst) {
                            break;
                        }
                        let _ = acker.ack_with(AckKind::Progress).await;
                    }
                })
            };
            let body_ran = AtomicBool::new(false);
            let out = ship(store.clone(), &ledger, &scope, &body_ran, job.clone()).await;
            ticking.store(false, Ordering::SeqCst);
            progress.abort();
            match out {
                Ok(_) => {
                    if body_ran.load(Ordering::SeqCst) {
                        ran += 1;
                    } else {
                        replayed += 1;
                        idem_support::append_line(
                            &deliveries,
                            &format!("replayed {} {pid}\n", job.id),
                        );
                    }
                    // A lost ack, as when the connection drops after the body ran: every 50th
                    // job's first delivery goes unacknowledged, JetStream delivers it again
                    // after `ack_wait`, and that delivery must replay.
                    if attempt == 1 && lost_ack(&job.id) {
                        idem_support::append_line(
                            &deliveries,
                            &format!("dropack {} {pid}\n", job.id),
                        );
                        continue;
                    }
                    message.ack().await.expect("ack");
                }
                // Another holder still runs it, or the store is down: no ack, JetStream
                // redelivers after `ack_wait` and the next delivery replays or takes over.
                Err(e) => {
                    unacked += 1;
                    report("job-error", format_args!("{} {e}", job.id));
                }
            }
        }
    }
    let m = idempotency::counters();
    report(
        "counts",
        format_args!(
            "delivered={delivered} ran={ran} replayed={replayed} unacked={unacked} takeovers={}",
            m.takeovers
        ),
    );
}

/// Whether the worker "loses" the ack of `job`'s first delivery: every 50th job.
fn lost_ack(job: &str) -> bool {
    job.strip_prefix("job-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n % 50 == 25)
}

/// Ships a job once per job id: `start` at its first line, 20 to 50 ms of work, `end` at its
/// last. The result names the process that ran the body.
#[idempotent(name = "jobs.ship", key = job.id.clone(), scope = scope, store = store.clone(), skip(store, ledger, scope, ran), lease = "1s", on_conflict = "wait", wait = "20s")]
async fn ship(
    store: Arc<dyn Store>,
    ledger: &Path,
    scope: &str,
    ran: &AtomicBool,
    job: Job,
) -> Result<String, Error> {
    let pid = std::process::id();
    idem_support::append_line(ledger, &format!("start {} {pid}\n", job.id));
    ran.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(job.ms)).await;
    idem_support::append_line(ledger, &format!("end {} {pid}\n", job.id));
    Ok(format!("shipped {} by {pid}", job.id))
}

// ---- the parent side ------------------------------------------------------------------------

/// A running worker process: killed (SIGKILL) and reaped on drop unless it was waited for, so
/// a failing test leaves no process behind.
struct Worker {
    child: Child,
    reaped: bool,
    lines: Receiver<process::Report>,
    seen: Vec<process::Report>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Worker {
    /// Starts this test binary as a worker of `world`.
    fn start(world: &World) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(ROLE, "consume")
            .env("IDEM_STORE", &world.store_url)
            .env("IDEM_NATS_URL", &world.nats_url)
            .env("IDEM_STREAM", &world.stream)
            .env("IDEM_SCOPE", &world.scope)
            .env("IDEM_LEDGER", &world.ledger)
            .env("IDEM_DELIVERIES", &world.deliveries)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((kind, payload)) =
                    line.split_once(MARK).and_then(|(_, r)| r.split_once(' '))
                {
                    let _ = tx.send((kind.to_owned(), payload.to_owned()));
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            text
        });
        Worker {
            child,
            reaped: false,
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next report of `kind` (reports of other kinds are kept).
    fn wait_for(&mut self, kind: &str, deadline: Instant) -> String {
        process::next_report(&self.lines, &mut self.seen, kind, deadline)
            .unwrap_or_else(|what| self.fail(&what))
    }

    /// Fails the test if the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.reaped = true;
            self.fail(format_args!("exited early with {status}"));
        }
    }

    /// Closes the worker's stdin (it stops fetching), waits for it to exit successfully, and
    /// returns its `counts` report as a map.
    fn finish(mut self, deadline: Instant) -> HashMap<String, u64> {
        drop(self.child.stdin.take());
        let status = process::exit_by(&mut self.child, &self.lines, &mut self.seen, deadline)
            .unwrap_or_else(|| self.fail("still running at the deadline"));
        self.reaped = true;
        if !status.success() {
            self.fail(format_args!("exited with {status}"));
        }
        let counts: Vec<&str> = self
            .seen
            .iter()
            .filter(|(k, _)| k == "counts")
            .map(|(_, p)| p.as_str())
            .collect();
        let [counts] = counts[..] else {
            self.fail("expected one `counts` report")
        };
        counts
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("a count")))
            .collect()
    }

    /// Fails the test with `what`, the reports so far and, if the process has ended, its
    /// output.
    fn fail(&mut self, what: impl std::fmt::Display) -> ! {
        while let Ok(report) = self.lines.try_recv() {
            self.seen.push(report);
        }
        let mut diagnosis = format!("reports: {:?}", self.seen);
        if self.reaped || matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
            for (name, handle) in [
                ("stdout", self.stdout.take()),
                ("stderr", self.stderr.take()),
            ] {
                if let Some(text) = handle.and_then(|h| h.join().ok()) {
                    diagnosis.push_str(&format!("\n--- worker {name} ---\n{text}"));
                }
            }
        }
        panic!("worker (pid {}): {what}; {diagnosis}", self.pid())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One run's world: a random stream with its durable consumer, a random idem scope, the
/// ledger and deliveries files. Dropping it deletes the stream.
struct World {
    nats_url: String,
    store_url: String,
    stream: String,
    scope: String,
    ledger: PathBuf,
    deliveries: PathBuf,
    js: jetstream::Context,
    runtime: tokio::runtime::Runtime,
    _dir: TempDir,
}

impl World {
    /// Connects to NATS and Redis and creates the stream and its consumer; `None` (skip) when
    /// either server cannot be reached.
    fn new() -> Option<World> {
        let nats_url =
            std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        let store_url = idem_support::redis_url();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let probe = StorageKey::derive("consumers_nats", "probe").expect("key");
        if let Err(e) = runtime.block_on(async {
            let store = idempotency::connect(&store_url).await?;
            store.get(&probe).await?;
            Ok::<_, Error>(())
        }) {
            idem_support::unavailable("Redis", e);
            return None;
        }
        let js = match runtime.block_on(async {
            let client = tokio::time::timeout(
                Duration::from_secs(5),
                async_nats::connect(nats_url.as_str()),
            )
            .await
            .map_err(|_| "no answer in 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(jetstream::new(client))
        }) {
            Ok(js) => js,
            Err(e) => {
                idem_support::unavailable(&format!("NATS at {nats_url}"), e);
                return None;
            }
        };
        let name = format!("idem-nats-{:016x}", rand::random::<u64>());
        let dir = tempfile::tempdir().expect("temporary directory");
        let world = World {
            nats_url,
            store_url,
            scope: name.clone(),
            stream: name,
            ledger: dir.path().join("ledger.txt"),
            deliveries: dir.path().join("deliveries.txt"),
            js,
            runtime,
            _dir: dir,
        };
        // A server that answers may still have JetStream off: creating the stream says so.
        if let Err(e) = world.runtime.block_on(world.create()) {
            let what = format!("NATS JetStream at {}", world.nats_url);
            drop(world);
            idem_support::unavailable(&what, e);
            return None;
        }
        Some(world)
    }

    /// Creates the stream and its durable pull consumer.
    async fn create(&self) -> Result<(), String> {
        let stream = self
            .js
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject()],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create the stream: {e}"))?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_deliver: 50,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create the consumer: {e}"))?;
        Ok(())
    }

    fn subject(&self) -> String {
        format!("jobs.{}", self.stream)
    }

    /// Publishes `JOBS` jobs, each with its id as `Nats-Msg-Id` too.
    fn publish(&self) {
        self.runtime.block_on(async {
            let mut acks = Vec::new();
            for n in 0..JOBS {
                let job = Job {
                    id: format!("job-{n:03}"),
                    ms: 20 + rand::random::<u64>() % 31,
                };
                let ack = self
                    .js
                    .send_publish(
                        self.subject(),
                        jetstream::message::PublishMessage::build()
                            .message_id(&job.id)
                            .payload(serde_json::to_vec(&job).expect("json").into()),
                    )
                    .await
                    .expect("publish");
                acks.push(ack);
            }
            for ack in acks {
                let ack = ack.await.expect("publish acknowledged");
                assert!(!ack.duplicate, "each job id is published once");
            }
        });
    }

    /// The consumer's `(num_ack_pending, num_pending)`.
    fn pending(&self) -> (usize, u64) {
        self.runtime.block_on(async {
            let info = self
                .js
                .get_stream(&self.stream)
                .await
                .expect("the stream")
                .consumer_info(CONSUMER)
                .await
                .expect("consumer info");
            (info.num_ack_pending, info.num_pending)
        })
    }

    /// The ledger as `(event, job, pid)` triples.
    fn ledger(&self) -> Vec<(String, String, String)> {
        lines(&self.ledger)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let js = self.js.clone();
        let stream = self.stream.clone();
        let deleted = self
            .runtime
            .block_on(async move { js.delete_stream(&stream).await });
        if let Err(e) = deleted {
            eprintln!("could not delete the stream {}: {e}", self.stream);
        }
    }
}

/// A ledger-like file as whitespace-separated triples.
fn lines(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace().map(str::to_owned);
            let mut next = || w.next().unwrap_or_default();
            (next(), next(), next())
        })
        .collect()
}

/// The jobs `pid` started and has not ended, per the ledger.
fn open_jobs(ledger: &[(String, String, String)], pid: &str) -> Vec<String> {
    let mut open: BTreeMap<&str, i32> = BTreeMap::new();
    for (event, job, who) in ledger {
        if who == pid {
            *open.entry(job).or_default() += match event.as_str() {
                "start" => 1,
                "end" => -1,
                _ => 0,
            };
        }
    }
    open.into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(job, _)| job.to_owned())
        .collect()
}

#[test]
fn killed_worker_redelivered_effectively_once() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let Some(world) = World::new() else {
        return;
    };
    let began = Instant::now();
    let end = began + Duration::from_secs(60);
    world.publish();

    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| Worker::start(&world)).collect();
    for w in &mut workers {
        w.wait_for("ready", end);
    }

    // The victim is stopped (SIGSTOP) once the ledger shows it inside a job after a few it
    // finished; stopped, its ledger lines are final, so a job still open then is one it is
    // killed in the middle of. If it finished that job in between, it goes on (SIGCONT).
    let victim = workers.remove(0);
    let victim_pid = victim.pid().to_string();
    let interrupted = loop {
        assert!(Instant::now() < end, "the victim never ran a job");
        let ledger = world.ledger();
        let ended = ledger
            .iter()
            .filter(|(e, _, p)| e == "end" && *p == victim_pid)
            .count();
        if ended >= 5 && !open_jobs(&ledger, &victim_pid).is_empty() {
            process::signal(victim.pid() as libc::pid_t, libc::SIGSTOP);
            process::wait_stopped(victim.pid() as libc::pid_t, end).expect("victim stopped");
            let open = open_jobs(&world.ledger(), &victim_pid);
            if let [job] = &open[..] {
                break job.clone();
            }
            assert!(open.is_empty(), "one job at a time per worker: {open:?}");
            process::signal(victim.pid() as libc::pid_t, libc::SIGCONT);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    drop(victim); // SIGKILL, and reaped
    let killed_at = began.elapsed();

    // The survivors take the rest, the dead worker's unacknowledged messages included.
    let done = loop {
        for w in &mut workers {
            w.check_alive();
        }
        let ends: std::collections::HashSet<String> = world
            .ledger()
            .into_iter()
            .filter(|(e, _, _)| e == "end")
            .map(|(_, job, _)| job)
            .collect();
        if ends.len() == JOBS && world.pending() == (0, 0) {
            break began.elapsed();
        }
        assert!(
            Instant::now() < end,
            "not done in 60 s: {} of {JOBS} jobs ended, consumer (ack pending, pending) = {:?}",
            ends.len(),
            world.pending()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let counts: Vec<HashMap<String, u64>> = workers.into_iter().map(|w| w.finish(end)).collect();

    // What ran: the ledger.
    let ledger = world.ledger();
    let mut starts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (event, job, pid) in &ledger {
        match event.as_str() {
            "start" => starts.entry(job.clone()).or_default().push(pid.clone()),
            "end" => ends.entry(job.clone()).or_default().push(pid.clone()),
            other => panic!("unknown ledger line {other} {job} {pid}"),
        }
    }
    let all: Vec<String> = (0..JOBS).map(|n| format!("job-{n:03}")).collect();
    let lost: Vec<&String> = all.iter().filter(|j| !ends.contains_key(*j)).collect();
    assert!(lost.is_empty(), "jobs never completed: {lost:?}");
    for job in &all {
        let ended = &ends[job];
        assert_eq!(ended.len(), 1, "{job} ended once: {ended:?}");
        let started = &starts[job];
        if *job == interrupted {
            assert_eq!(
                started.len(),
                2,
                "the interrupted job started in the victim and once more: {started:?}"
            );
            assert_eq!(started[0], victim_pid, "first in the victim");
            assert_ne!(ended[0], victim_pid, "ended elsewhere");
        } else {
            assert_eq!(started.len(), 1, "{job} started once: {started:?}");
            assert_eq!(started, ended, "{job} started and ended in one process");
        }
    }
    assert_eq!(world.pending(), (0, 0), "nothing left unacknowledged");

    // What JetStream delivered.
    let deliveries = lines(&world.deliveries);
    let redelivered = deliveries
        .iter()
        .filter(|(e, _, _)| e == "redeliver")
        .count();
    let delivered = redelivered + deliveries.iter().filter(|(e, _, _)| e == "deliver").count();
    let absorbed = deliveries
        .iter()
        .filter(|(e, _, _)| e == "replayed")
        .count();
    assert!(
        deliveries
            .iter()
            .any(|(e, job, _)| e == "redeliver" && *job == interrupted),
        "the interrupted job was redelivered: {:?}",
        deliveries
            .iter()
            .filter(|(_, job, _)| *job == interrupted)
            .collect::<Vec<_>>()
    );
    let dropped: Vec<&String> = deliveries
        .iter()
        .filter(|(e, _, _)| e == "dropack")
        .map(|(_, job, _)| job)
        .collect();
    assert!(!dropped.is_empty(), "some first deliveries lost their ack");
    for job in &dropped {
        assert!(
            deliveries
                .iter()
                .any(|(e, j, _)| e == "replayed" && j == *job),
            "the redelivery of {job}, whose ack was lost, replayed"
        );
    }
    let effects = starts.values().map(Vec::len).sum::<usize>();
    let restarts = starts.values().filter(|s| s.len() > 1).count();
    let takeovers: u64 = counts.iter().map(|c| c["takeovers"]).sum();
    let unacked: u64 = counts.iter().map(|c| c["unacked"]).sum();
    assert!(takeovers >= 1, "a survivor took the interrupted job over");
    assert_eq!(
        delivered,
        effects + absorbed + unacked as usize + open_deliveries(&deliveries, &ledger, &victim_pid),
        "every delivery ran a body, was replayed, was left unacked, or died with the victim"
    );
    println!(
        "@figures nats jobs={JOBS} deliveries={delivered} redeliveries={redelivered} \
         duplicates_absorbed={absorbed} effects={effects} interrupted_restarts={restarts} lost={} \
         unacked={unacked} takeovers={takeovers} killed_at_ms={} done_ms={}",
        lost.len(),
        killed_at.as_millis(),
        done.as_millis()
    );
}

/// The victim's deliveries that neither ran a body nor were replayed: the rest of its last
/// batch, fetched but not begun when it died.
fn open_deliveries(
    deliveries: &[(String, String, String)],
    ledger: &[(String, String, String)],
    victim: &str,
) -> usize {
    let of_victim = |rows: &[(String, String, String)], event: &str| {
        rows.iter()
            .filter(|(e, _, pid)| e == event && pid == victim)
            .count()
    };
    of_victim(deliveries, "deliver") + of_victim(deliveries, "redeliver")
        - of_victim(deliveries, "replayed")
        - of_victim(ledger, "start")
}
