//! A Redis Streams consumer group made effectively-once, across processes, through a crash.
//!
//! A producer adds `JOBS` jobs to a stream, `DOUBLES` of them twice under the same job id (a
//! producer that retried `XADD`). `WORKERS` worker processes consume the group: each message is
//! a job handled by an `#[idempotent]` function keyed by the job id, acked after the call
//! returns `Ok`, and `XAUTOCLAIM` takes over messages pending longer than `MIN_IDLE` (longer
//! than the lease, so a dead worker's claim has lapsed by then). The parent SIGKILLs one
//! worker in the middle of a job; the others take its pending messages over and finish.
//!
//! The workers are this test binary run again with `--exact worker` (the `worker` test reads
//! its role from `IDEM_WORKER` and returns at once without it). They print `@idem <kind>
//! <payload>` lines the parent reads, and each job's body appends `start <job> <pid>` to a
//! ledger file (`O_APPEND`, one write per line) before its effect and `end <job> <pid>` after,
//! so the ledger shows every run, whatever the store says.
//!
//! Skipped with a message when Redis is unreachable, unless `IDEM_REQUIRE_SERVICES=1`.
#![cfg(all(feature = "redis", unix))]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idem_support::{process, AppError};
use idempotency::redis::redis::{self, aio::MultiplexedConnection, AsyncConnectionConfig};
use idempotency::{idempotent, Error, RedisStore};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The environment variable that makes the `worker` test a worker.
const ROLE: &str = "IDEM_WORKER";
/// Marks the lines of stdout that carry a worker's reports.
const MARK: &str = "@idem ";
/// Jobs, jobs the producer adds twice, and worker processes.
const JOBS: usize = 200;
const DOUBLES: usize = 20;
const WORKERS: usize = 3;
/// The idem lease of a job, and how long a message must be pending before `XAUTOCLAIM` takes
/// it over: three leases, so a dead worker's claim has lapsed when its message comes back.
const LEASE: Duration = Duration::from_secs(1);
const MIN_IDLE: Duration = Duration::from_secs(3);
/// How often a worker sweeps for idle messages, its batch size and its blocking read.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
const BATCH: usize = 5;
const BLOCK: Duration = Duration::from_millis(200);
/// Jobs the victim finishes before it is killed in the middle of the next one.
const KILL_AFTER: usize = 10;
/// The whole test's bound.
const DEADLINE: Duration = Duration::from_secs(60);

// ---- the worker side ------------------------------------------------------------------------

/// A job as the producer writes it into an entry's `job` field.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    sku: String,
    quantity: u32,
}

/// What the body returns: who ran it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    job: String,
    pid: u32,
}

/// Fulfils a job once per job id: the ledger's `start` line is the effect beginning.
#[idempotent(name = "jobs.fulfil", key = job.id.clone(), store = store, skip(store, ledger, ran), lease = LEASE, on_conflict = "wait")]
async fn fulfil(
    store: &RedisStore,
    ledger: &Path,
    ran: &AtomicBool,
    job: Job,
) -> Result<Done, AppError> {
    ran.store(true, Ordering::Relaxed);
    let pid = std::process::id();
    idem_support::append_line(ledger, &format!("start {} {pid}\n", job.id));
    let ms = rand::thread_rng().gen_range(20..=50);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    idem_support::append_line(ledger, &format!("end {} {pid}\n", job.id));
    Ok(Done { job: job.id, pid })
}

/// Runs the consumer role when started by the test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "consumer", "unknown worker role");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(consume());
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one report line for the parent.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// A stream entry: its id and fields.
type Entry = (String, HashMap<String, String>);

/// A connection for the stream commands, whose response timeout outlasts `BLOCK`.
async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The consumer loop: every `SWEEP_EVERY` `XAUTOCLAIM` messages idle past `MIN_IDLE`, else
/// `XREADGROUP` new ones; handle each, ack it once its call returned `Ok`. Until the stop file
/// exists.
async fn consume() {
    let url = idem_support::redis_url();
    let (stream, group, consumer) = (env("IDEM_STREAM"), env("IDEM_GROUP"), env("IDEM_CONSUMER"));
    let ledger = PathBuf::from(env("IDEM_LEDGER"));
    let stop = PathBuf::from(env("IDEM_STOP"));
    let store = RedisStore::connect_with_prefix(&url, &env("IDEM_PREFIX"))
        .await
        .expect("the store");
    let mut con = connect(&url).await.expect("a Redis connection");
    report("ready", std::process::id());
    let deadline = Instant::now() + DEADLINE;
    let mut cursor = "0-0".to_owned();
    let mut last_sweep = Instant::now();
    while !stop.exists() && Instant::now() < deadline {
        let mut batch: Vec<(Entry, &str)> = Vec::new();
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let (next, entries, _deleted): (String, Vec<Entry>, Vec<String>) =
                redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(&group)
                    .arg(&consumer)
                    .arg(MIN_IDLE.as_millis() as u64)
                    .arg(&cursor)
                    .query_async(&mut con)
                    .await
                    .expect("XAUTOCLAIM");
            cursor = next;
            batch.extend(entries.into_iter().map(|e| (e, "claimed")));
        }
        if batch.is_empty() {
            let reply: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&group)
                .arg(&consumer)
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut con)
                .await
                .expect("XREADGROUP");
            let entries = reply.into_iter().flatten().flat_map(|(_, e)| e);
            batch.extend(entries.map(|e| (e, "new")));
        }
        // Every delivery is reported before any is handled, so a kill mid-batch loses none.
        let jobs: Vec<(String, Job, &str)> = batch
            .into_iter()
            .map(|((id, fields), via)| {
                let job: Job = serde_json::from_str(&fields["job"]).expect("a job");
                report("delivered", format_args!("{id} {} {via}", job.id));
                (id, job, via)
            })
            .collect();
        for (id, job, _) in jobs {
            let ran = AtomicBool::new(false);
            let outcome = match fulfil(&store, &ledger, &ran, job).await {
                Ok(_) if ran.load(Ordering::Relaxed) => "ran",
                Ok(_) => "replayed",
                // Another worker holds the job: leave it pending, XAUTOCLAIM brings it back.
                Err(AppError::Idem(Error::InFlight { .. })) => "inflight",
                Err(AppError::Idem(Error::WaitTimeout { .. })) => "timeout",
                Err(e) => panic!("job of entry {id}: {e:?}"),
            };
            let acked = matches!(outcome, "ran" | "replayed");
            if acked {
                let n: u64 = redis::cmd("XACK")
                    .arg(&stream)
                    .arg(&group)
                    .arg(&id)
                    .query_async(&mut con)
                    .await
                    .expect("XACK");
                assert!(n <= 1);
            }
            report("handled", format_args!("{id} {outcome} {acked}"));
        }
    }
}

// ---- the parent side ------------------------------------------------------------------------

/// A worker process: killed (SIGKILL) and reaped on drop unless it was waited for, so a failing
/// test leaves no process behind.
struct Worker {
    child: Child,
    reaped: bool,
    lines: Receiver<process::Report>,
    seen: Vec<process::Report>,
    stderr: Option<JoinHandle<String>>,
}

impl Worker {
    fn spawn(vars: &[(&str, &str)]) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(ROLE, "consumer")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((kind, payload)) =
                    line.split_once(MARK).and_then(|(_, r)| r.split_once(' '))
                {
                    let _ = tx.send((kind.to_owned(), payload.to_owned()));
                }
            }
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
            stderr: Some(stderr),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit successfully; returns all it reported.
    fn finish(mut self, deadline: Instant) -> Vec<process::Report> {
        let status = process::exit_by(&mut self.child, &self.lines, &mut self.seen, deadline);
        self.reaped = status.is_some();
        match status {
            Some(s) if s.success() => std::mem::take(&mut self.seen),
            other => {
                let stderr = if self.reaped {
                    self.stderr.take().and_then(|h| h.join().ok())
                } else {
                    None
                };
                panic!(
                    "worker {} ended with {other:?}; stderr: {}",
                    self.pid(),
                    stderr.unwrap_or_default()
                )
            }
        }
    }

    /// Kills the process with SIGKILL, reaps it, and returns what it reported before.
    fn kill(mut self) -> Vec<process::Report> {
        self.child.kill().expect("SIGKILL the worker");
        self.child.wait().expect("reap the worker");
        self.reaped = true;
        while let Ok(r) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(r);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill(); // SIGKILL also ends a stopped process.
            let _ = self.child.wait();
        }
    }
}

/// The run's keys on the server: the stream (and its group) and the store's records, deleted
/// when dropped, whether the test passed or not.
struct Keys {
    stream: String,
    prefix: String,
}

impl Drop for Keys {
    fn drop(&mut self) {
        idem_support::delete_redis_prefix(&self.prefix);
        idem_support::redis::delete_matching(&self.stream);
    }
}

/// The ledger's lines, split into words.
fn ledger(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// The job `pid` started and has not ended, if any (a worker runs one job at a time).
fn started_not_ended(lines: &[Vec<String>], pid: u32) -> Option<String> {
    let pid = pid.to_string();
    let mut open: Option<String> = None;
    for l in lines.iter().filter(|l| l[2] == pid) {
        match l[0].as_str() {
            "start" => open = Some(l[1].clone()),
            "end" if open.as_ref() == Some(&l[1]) => open = None,
            other => panic!("unexpected ledger line {other} in {l:?}"),
        }
    }
    open
}

#[test]
fn killed_consumer_is_taken_over_and_every_job_runs_once() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let Some(mut con) = runtime.block_on(idem_support::redis::probe()) else {
        return;
    };
    let run = format!("{:016x}", rand::random::<u64>());
    let keys = Keys {
        stream: format!("idem-streams-{run}"),
        prefix: format!("idem-streams-store-{run}"),
    };
    let group = format!("fulfilment-{run}");
    let stream = keys.stream.clone();
    let query = |cmd: &mut redis::Cmd, con: &mut MultiplexedConnection| -> redis::Value {
        runtime
            .block_on(cmd.query_async(con))
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    };
    query(
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(&group)
            .arg("0")
            .arg("MKSTREAM"),
        &mut con,
    );

    // The producer: every job once, and DOUBLES of them again somewhere later, as a producer
    // that retried XADD after losing its reply would.
    let mut rng = rand::thread_rng();
    let mut order: Vec<usize> = (0..JOBS).collect();
    let doubled: Vec<usize> = order.choose_multiple(&mut rng, DOUBLES).copied().collect();
    for &j in &doubled {
        let first = order.iter().position(|&o| o == j).expect("added");
        let again = rng.gen_range(first + 1..=order.len());
        order.insert(again, j);
    }
    let mut entries: BTreeMap<String, String> = BTreeMap::new(); // entry id -> job id
    for j in order {
        let job = Job {
            id: format!("job-{j:03}"),
            sku: format!("sku-{}", j % 7),
            quantity: 1 + j as u32 % 3,
        };
        let payload = serde_json::to_string(&job).expect("JSON");
        let id = match query(
            redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("job")
                .arg(payload),
            &mut con,
        ) {
            redis::Value::BulkString(id) => String::from_utf8(id).expect("an entry id"),
            other => panic!("XADD replied {other:?}"),
        };
        entries.insert(id, job.id);
    }
    assert_eq!(entries.len(), JOBS + DOUBLES);

    let dir = tempfile::tempdir().expect("temporary directory");
    let ledger_path = dir.path().join("ledger.txt");
    let stop = dir.path().join("stop");
    let workers: Vec<Worker> = (0..WORKERS)
        .map(|i| {
            Worker::spawn(&[
                ("IDEM_STREAM", stream.as_str()),
                ("IDEM_GROUP", group.as_str()),
                ("IDEM_CONSUMER", &format!("consumer-{i}")),
                ("IDEM_PREFIX", keys.prefix.as_str()),
                ("IDEM_LEDGER", ledger_path.to_str().expect("UTF-8 path")),
                ("IDEM_STOP", stop.to_str().expect("UTF-8 path")),
            ])
        })
        .collect();
    let mut workers = workers.into_iter();
    let victim = workers.next().expect("a victim");
    let survivors: Vec<Worker> = workers.collect();

    // Kill the victim in the middle of a job, once it has finished a few: stop it (so the
    // ledger cannot move under us), look for a job it started and has not ended, and kill it
    // if there is one; else let it run a moment and look again.
    let victim_pid = victim.pid() as libc::pid_t;
    let interrupted = loop {
        assert!(Instant::now() < deadline, "the victim never got to a job");
        std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(5..40)));
        let victim_ended = ledger(&ledger_path)
            .iter()
            .filter(|l| l[0] == "end" && l[2] == victim.pid().to_string())
            .count();
        if victim_ended < KILL_AFTER {
            continue;
        }
        process::signal(victim_pid, libc::SIGSTOP);
        process::wait_stopped(victim_pid, deadline).expect("the victim stops");
        match started_not_ended(&ledger(&ledger_path), victim.pid()) {
            Some(job) => break job,
            None => process::signal(victim_pid, libc::SIGCONT),
        }
    };
    let killed_at = started.elapsed();
    let mut reports = victim.kill();
    println!(
        "killed consumer-0 (pid {victim_pid}) at {killed_at:?} in the middle of {interrupted}"
    );

    // Wait until every job has ended, no message is pending, and every entry was delivered.
    let last_entry = entries.keys().next_back().expect("entries").clone();
    loop {
        let lines = ledger(&ledger_path);
        let ended: BTreeSet<&str> = lines
            .iter()
            .filter(|l| l[0] == "end")
            .map(|l| l[1].as_str())
            .collect();
        let pending = match query(redis::cmd("XPENDING").arg(&stream).arg(&group), &mut con) {
            redis::Value::Array(summary) => match summary.first() {
                Some(redis::Value::Int(n)) => *n,
                other => panic!("XPENDING summary {other:?}"),
            },
            other => panic!("XPENDING replied {other:?}"),
        };
        let last_delivered = group_field(&query(
            redis::cmd("XINFO").arg("GROUPS").arg(&stream),
            &mut con,
        ));
        if ended.len() == JOBS && pending == 0 && last_delivered == last_entry {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done in time: {} jobs ended, {pending} messages pending, last delivered {last_delivered} of {last_entry}",
            ended.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop, b"stop").expect("create the stop file");
    for w in survivors {
        reports.extend(w.finish(deadline));
    }
    let elapsed = started.elapsed();

    // The ledger: every job ended once; each started once, but the interrupted one, twice.
    let lines = ledger(&ledger_path);
    let mut starts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &lines {
        let count = if l[0] == "start" {
            &mut starts
        } else {
            &mut ends
        };
        *count.entry(l[1].as_str()).or_default() += 1;
    }
    let jobs: BTreeSet<&str> = entries.values().map(String::as_str).collect();
    assert_eq!(jobs.len(), JOBS);
    let lost: Vec<&str> = jobs
        .iter()
        .copied()
        .filter(|j| !ends.contains_key(j))
        .collect();
    assert_eq!(lost, Vec::<&str>::new(), "jobs never fulfilled");
    for (job, n) in &ends {
        assert_eq!(*n, 1, "{job} ended {n} times");
    }
    for (job, n) in &starts {
        let expected = if *job == interrupted { 2 } else { 1 };
        assert_eq!(
            *n, expected,
            "{job} started {n} times (interrupted: {interrupted})"
        );
    }
    let restarts = starts.values().filter(|&&n| n > 1).count();

    // The stream: every entry delivered new once, acked; nothing left pending.
    let mut deliveries = 0;
    let mut redeliveries = 0;
    let mut new_deliveries: BTreeMap<&str, usize> = BTreeMap::new();
    let mut acked: BTreeSet<&str> = BTreeSet::new();
    let mut absorbed = 0;
    let mut left_pending = 0;
    for (kind, payload) in &reports {
        let words: Vec<&str> = payload.split_whitespace().collect();
        match (kind.as_str(), &words[..]) {
            ("delivered", [id, job, via]) => {
                assert_eq!(entries[*id], *job, "entry {id} carries its job");
                deliveries += 1;
                if *via == "claimed" {
                    redeliveries += 1;
                } else {
                    *new_deliveries.entry(id).or_default() += 1;
                }
            }
            ("handled", [id, outcome, acked_it]) => {
                match *outcome {
                    "replayed" => absorbed += 1,
                    "inflight" | "timeout" => left_pending += 1,
                    _ => {}
                }
                if *acked_it == "true" {
                    acked.insert(id);
                }
            }
            ("ready", _) => {}
            other => panic!("unexpected report {other:?}"),
        }
    }
    assert_eq!(
        new_deliveries.len(),
        JOBS + DOUBLES,
        "every entry was delivered"
    );
    assert!(
        new_deliveries.values().all(|&n| n == 1),
        "no entry delivered new twice"
    );
    assert!(
        redeliveries >= 1,
        "the victim's pending messages were taken over"
    );
    let all: BTreeSet<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(acked, all, "every entry acked");
    assert!(
        absorbed >= DOUBLES - 1,
        "the producer's doubles were replayed, not run: {absorbed}"
    );

    println!(
        "jobs {JOBS}, entries {}, deliveries {deliveries}, redeliveries {redeliveries}, duplicate deliveries absorbed {absorbed}, left pending for redelivery {left_pending}, side effects {}, lost {}, in {elapsed:?}",
        entries.len(),
        ends.len(),
        lost.len()
    );
    println!(
        "@figures redis_streams jobs={JOBS} entries={} deliveries={deliveries} redeliveries={redeliveries} duplicates_absorbed={absorbed} effects={} interrupted_restarts={restarts} lost={} seconds={:.1}",
        entries.len(),
        ends.len(),
        lost.len(),
        elapsed.as_secs_f64()
    );
    drop(keys);
    let exists = query(redis::cmd("EXISTS").arg(&stream), &mut con);
    assert_eq!(exists, redis::Value::Int(0), "the stream is deleted");
}

/// The `last-delivered-id` of the one group in an `XINFO GROUPS` reply.
fn group_field(reply: &redis::Value) -> String {
    let redis::Value::Array(groups) = reply else {
        panic!("XINFO GROUPS replied {reply:?}")
    };
    let [redis::Value::Array(fields)] = &groups[..] else {
        panic!("one group expected: {reply:?}")
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    fields
        .chunks(2)
        .find(|kv| text(&kv[0]) == "last-delivered-id")
        .map(|kv| text(&kv[1]))
        .expect("last-delivered-id")
}
