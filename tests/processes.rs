//! Several OS processes sharing one store: exactly once across processes, crash recovery after
//! SIGKILL, a holder stopped (SIGSTOP) past its lease fenced off, and results that outlive the
//! process that stored them.
//!
//! The workers are this test binary run again with `--exact worker`: the `worker` test reads
//! its role from `IDEM_WORKER` (and returns at once when it is absent, as in the parent run),
//! opens the store with `idempotency::connect(IDEM_STORE)`, and prints one `@idem <kind> <payload>`
//! line per result to stdout, which the parent parses. Bodies append to a ledger file outside
//! the store, one `write` per line with `O_APPEND`, so the ledger shows every run of a body,
//! whatever the store says.
//!
//! Each test is written once over a store URL and instantiated for SQLite (a fresh file) and,
//! with their features, for Redis (`IDEM_REDIS_URL`, default `redis://127.0.0.1:6379`) and
//! PostgreSQL (`IDEM_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`), and a
//! Redis Cluster (`IDEM_REDIS_CLUSTER_URL`, the nodes `.ci/redis-cluster` starts), and DynamoDB
//! (`IDEM_DYNAMODB_URL`, a table of each test's own), which are skipped with a message when unreachable unless `IDEM_REQUIRE_SERVICES=1`. Every run uses
//! a random scope, so runs never share records in a shared server.
#![cfg(all(feature = "sqlite", unix))]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idem_support::process;
use idempotency::store::RecordState;
use idempotency::Operation;
use idempotency::{idempotent, Error, StorageKey, Store};
use rand::seq::SliceRandom;
use tempfile::TempDir;

/// The environment variable that makes the `worker` test a worker, and names its role.
const ROLE: &str = "IDEM_WORKER";
/// Marks the lines of stdout that carry a worker's results.
const MARK: &str = "@idem ";
/// Processes in the hammer test, keys they share, and calls per key per process.
const PROCESSES: usize = 4;
const KEYS: usize = 100;
const ROUNDS: usize = 3;

// ---- the worker side ------------------------------------------------------------------------

/// Runs a worker role when started by a test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let url = env("IDEM_STORE");
        let store = idempotency::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("worker cannot open `{url}`: {e}"));
        let scope = env("IDEM_SCOPE");
        let ledger = PathBuf::from(env("IDEM_LEDGER"));
        match role.as_str() {
            "hammer" => hammer_worker(store, scope, ledger).await,
            "call" => call_worker(store, scope, ledger).await,
            other => panic!("unknown worker role `{other}`"),
        }
    });
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one result line for the parent.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// Waits (bounded) until `path` exists.
async fn until_exists(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[idempotent(name = "processes.hammered", key = key, scope = &*scope, store = store.clone(), skip(store, ledger, scope), on_conflict = "wait", wait = "15s")]
async fn hammered(
    store: Arc<dyn Store>,
    ledger: Arc<Path>,
    scope: Arc<str>,
    key: String,
) -> Result<String, Error> {
    let value = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
    idem_support::append_line(&ledger, &format!("run {key} {value}\n"));
    // Hold the claim a moment, so that other callers find it in flight.
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 4 + 1)).await;
    Ok(value)
}

/// Every key `ROUNDS` times, in a random order, all at once; waits for the go file first so
/// that all processes start together.
async fn hammer_worker(store: Arc<dyn Store>, scope: String, ledger: PathBuf) {
    let (scope, ledger): (Arc<str>, Arc<Path>) = (scope.into(), ledger.into());
    let mut keys: Vec<String> = (0..KEYS * ROUNDS)
        .map(|i| format!("k{}", i % KEYS))
        .collect();
    keys.shuffle(&mut rand::thread_rng());
    report("ready", std::process::id());
    until_exists(Path::new(&env("IDEM_GO"))).await;
    let calls: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (store, ledger, scope) = (store.clone(), ledger.clone(), scope.clone());
            tokio::spawn(async move { (key.clone(), hammered(store, ledger, scope, key).await) })
        })
        .collect();
    for call in calls {
        match call.await.expect("call task") {
            (key, Ok(value)) => report("value", format_args!("{key} {value}")),
            (key, Err(e)) => report("error", format_args!("{key} {e:?}")),
        }
    }
}

/// How long the body of [`held`] holds its claim.
enum Hold {
    /// Finishes at once.
    Brief,
    /// Sleeps a minute: the parent kills the process first.
    Forever,
    /// Until this file exists.
    Until(PathBuf),
}

#[idempotent(name = "processes.held", key = key, scope = scope, store = store.clone(), skip(store, ledger, scope, hold), lease = "1s", on_conflict = "wait", wait = "15s")]
async fn held(
    store: Arc<dyn Store>,
    ledger: &Path,
    scope: &str,
    key: String,
    hold: Hold,
) -> Result<String, Error> {
    let pid = std::process::id();
    let value = format!("{pid}-{:016x}", rand::random::<u64>());
    idem_support::append_line(ledger, &format!("start {key} {pid}\n"));
    report("started", pid);
    match hold {
        Hold::Brief => {}
        Hold::Forever => tokio::time::sleep(Duration::from_secs(60)).await,
        Hold::Until(path) => until_exists(&path).await,
    }
    idem_support::append_line(ledger, &format!("done {key} {pid} {value}\n"));
    Ok(value)
}

/// One call of [`held`] on `IDEM_KEY`; reports the result and this process's counters.
async fn call_worker(store: Arc<dyn Store>, scope: String, ledger: PathBuf) {
    let hold = match env("IDEM_HOLD").as_str() {
        "brief" => Hold::Brief,
        "forever" => Hold::Forever,
        path => Hold::Until(path.into()),
    };
    let out = held(store, &ledger, &scope, env("IDEM_KEY"), hold).await;
    let m = idempotency::counters();
    report(
        "metrics",
        format_args!(
            "misses={} hits={} takeovers={} leases_lost={}",
            m.misses, m.hits, m.takeovers, m.leases_lost
        ),
    );
    match out {
        Ok(value) => report("value", value),
        // The variant alone: errors about a record also print its storage key.
        Err(e) => report(
            "error",
            format!("{e:?}").split([' ', '{', '(']).next().unwrap_or(""),
        ),
    }
}

// ---- the parent side ------------------------------------------------------------------------

/// A running worker process: killed (SIGKILL) and reaped on drop unless it was waited for, so
/// a failing test leaves no process behind.
struct Worker {
    role: String,
    child: Child,
    reaped: bool,
    lines: Receiver<(String, String)>,
    seen: Vec<(String, String)>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a worker reported, and how it ended.
struct Finished {
    reports: Vec<(String, String)>,
}

impl Finished {
    fn all(&self, kind: &str) -> Vec<&str> {
        self.reports
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, p)| p.as_str())
            .collect()
    }

    fn one(&self, kind: &str) -> &str {
        match self.all(kind)[..] {
            [one] => one,
            ref other => panic!(
                "expected one `{kind}` report, got {other:?} in {:?}",
                self.reports
            ),
        }
    }

    /// The `metrics` report as a map.
    fn metrics(&self) -> HashMap<&str, u64> {
        self.one("metrics")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.parse().expect("a counter")))
            .collect()
    }
}

impl Worker {
    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits for the next report of `kind` (reports of other kinds are kept for [`finish`]).
    fn wait_for(&mut self, kind: &str, deadline: Instant) -> String {
        process::next_report(&self.lines, &mut self.seen, kind, deadline)
            .unwrap_or_else(|what| self.fail(&what))
    }

    /// Waits for the process to exit successfully, and returns all it reported.
    fn finish(mut self, deadline: Instant) -> Finished {
        let status = process::exit_by(&mut self.child, &self.lines, &mut self.seen, deadline)
            .unwrap_or_else(|| self.fail("still running at the deadline"));
        self.reaped = true;
        if !status.success() {
            self.fail(format_args!("exited with {status}"));
        }
        Finished {
            reports: std::mem::take(&mut self.seen),
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the worker");
        self.reaped = true;
        self.child.wait().expect("reap the worker")
    }

    /// Sends `signal` to the process.
    fn signal(&self, signal: libc::c_int) {
        process::signal(self.pid(), signal);
    }

    /// Waits until the process is stopped (after SIGSTOP), without reaping it.
    fn wait_stopped(&mut self, deadline: Instant) {
        if let Err(what) = process::wait_stopped(self.pid(), deadline) {
            self.fail(&what);
        }
    }

    /// Fails the test with `what`, the reports so far and, if the process has ended, its
    /// output.
    fn fail(&mut self, what: impl std::fmt::Display) -> ! {
        let diagnosis = self.diagnose();
        panic!(
            "worker `{}` (pid {}): {what}; {diagnosis}",
            self.role,
            self.pid()
        )
    }

    fn diagnose(&mut self) -> String {
        while let Ok(report) = self.lines.try_recv() {
            self.seen.push(report);
        }
        let mut out = format!("reports: {:?}", self.seen);
        if self.reaped || matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
            for (name, handle) in [
                ("stdout", self.stdout.take()),
                ("stderr", self.stderr.take()),
            ] {
                if let Some(text) = handle.and_then(|h| h.join().ok()) {
                    out.push_str(&format!("\n--- worker {name} ---\n{text}"));
                }
            }
        }
        out
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            // SIGKILL also ends a stopped process.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One test's world: a store URL, a random scope, a ledger file, and the parent's own handle
/// on the store.
struct World {
    url: String,
    scope: String,
    dir: TempDir,
    ledger: PathBuf,
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Runtime,
}

impl World {
    /// A fresh SQLite file when `url` is `None`; else the server at `url`, or `None` (skip)
    /// when it cannot be reached.
    fn new(backend: &str, url: Option<String>) -> Option<World> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url =
            url.unwrap_or_else(|| format!("sqlite:{}", dir.path().join("idem.sqlite").display()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let probe = StorageKey::derive("processes", "probe").expect("key");
        let store = match runtime.block_on(async {
            let store = idempotency::connect(&url).await?;
            store.get(&probe).await?;
            Ok::<_, Error>(store)
        }) {
            Ok(store) => store,
            Err(e) => {
                idem_support::unavailable(backend, e);
                return None;
            }
        };
        let scope = format!("processes-{:016x}", rand::random::<u64>());
        let ledger = dir.path().join("ledger.txt");
        Some(World {
            url,
            scope,
            dir,
            ledger,
            store,
            runtime,
        })
    }

    /// Starts this test binary as a worker in `role`, with extra environment variables.
    fn spawn(&self, role: &str, vars: &[(&str, &str)]) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("IDEM_STORE", &self.url)
            .env("IDEM_SCOPE", &self.scope)
            .env("IDEM_LEDGER", &self.ledger)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
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
            role: role.to_owned(),
            child,
            reaped: false,
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// A one-call worker on `key`, holding its claim as `hold` says (`brief`, `forever`, or a
    /// file path to wait for).
    fn call(&self, key: &str, hold: &str) -> Worker {
        self.spawn("call", &[("IDEM_KEY", key), ("IDEM_HOLD", hold)])
    }

    /// The ledger's lines, split into words.
    fn ledger(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The record of `key` as the store holds it now.
    fn state(&self, key: &str) -> Option<RecordState> {
        let key = StorageKey::derive_for(&Operation::named("processes.held"), &self.scope, key)
            .expect("key");
        self.runtime
            .block_on(self.store.get(&key))
            .expect("get")
            .map(|r| r.state)
    }

    /// Calls `key` from the parent, which must replay: the ledger shows whether the body ran.
    fn replay(&self, key: &str) -> String {
        let before = self.ledger();
        let out = self
            .runtime
            .block_on(held(
                self.store.clone(),
                &self.ledger,
                &self.scope,
                key.to_owned(),
                Hold::Brief,
            ))
            .expect("replay");
        assert_eq!(self.ledger(), before, "a replay must not run the body");
        out
    }
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

fn token_of(state: Option<RecordState>) -> u64 {
    match state {
        Some(RecordState::InFlight { token } | RecordState::Completed { token, .. }) => token.0,
        None => panic!("no record"),
    }
}

// ---- the tests, over a store URL ------------------------------------------------------------

/// `PROCESSES` processes call the same `KEYS` keys `ROUNDS` times each, concurrently: every
/// body runs once per key in all, and every call of a key gets the one value.
fn processes_share_exactly_once(world: World) {
    let end = deadline(20);
    let go = world.dir.path().join("go");
    let go = go.to_str().expect("UTF-8 path");
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|_| world.spawn("hammer", &[("IDEM_GO", go)]))
        .collect();
    for w in &mut workers {
        w.wait_for("ready", end);
    }
    std::fs::write(go, b"go").expect("create the go file");
    let finished: Vec<Finished> = workers.into_iter().map(|w| w.finish(end)).collect();

    let mut ran: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in world.ledger() {
        match &line[..] {
            [run, key, value] if run == "run" => {
                ran.entry(key.clone()).or_default().push(value.clone())
            }
            other => panic!("unexpected ledger line {other:?}"),
        }
    }
    assert_eq!(ran.len(), KEYS, "every key ran");
    for (key, values) in &ran {
        assert_eq!(
            values.len(),
            1,
            "the body of {key} ran {} times: {values:?}",
            values.len()
        );
    }
    for (i, f) in finished.iter().enumerate() {
        assert_eq!(f.all("error"), Vec::<&str>::new(), "worker {i} had errors");
        let values = f.all("value");
        assert_eq!(
            values.len(),
            KEYS * ROUNDS,
            "worker {i} answered every call"
        );
        for kv in values {
            let (key, value) = kv.split_once(' ').expect("key and value");
            assert_eq!(
                ran[key],
                [value],
                "worker {i} got the value of the one run of {key}"
            );
        }
    }
}

/// A worker claims a key with a 1 s lease and is SIGKILLed mid-body; once the lease runs out a
/// new process takes the key over and completes it, once.
fn killed_holder_is_taken_over_after_its_lease(world: World) {
    let end = deadline(20);
    let mut victim = world.call("crash", "forever");
    let victim_pid = victim.wait_for("started", end);
    let victim_token = match world.state("crash") {
        Some(RecordState::InFlight { token }) => token.0,
        other => panic!("the victim holds the key in flight, found {other:?}"),
    };
    let status = victim.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    let survivor = world.call("crash", "brief").finish(end);
    let value = survivor.one("value").to_owned();
    assert_eq!(
        survivor.metrics()["takeovers"],
        1,
        "the survivor took over the expired lease"
    );
    assert_eq!(survivor.metrics()["misses"], 1, "and ran the body");

    let survivor_pid = value
        .split('-')
        .next()
        .expect("pid-prefixed value")
        .to_owned();
    let ledger = world.ledger();
    let starts: Vec<&str> = ledger
        .iter()
        .filter(|l| l[0] == "start")
        .map(|l| l[2].as_str())
        .collect();
    let dones: Vec<&[String]> = ledger
        .iter()
        .filter(|l| l[0] == "done")
        .map(|l| &l[..])
        .collect();
    assert_eq!(
        starts,
        [victim_pid.as_str(), survivor_pid.as_str()],
        "the killed attempt started, then the survivor"
    );
    assert_eq!(dones.len(), 1, "one completion: {ledger:?}");
    assert_eq!(dones[0][2..], [survivor_pid.clone(), value.clone()]);
    assert!(
        token_of(world.state("crash")) > victim_token,
        "the takeover has a newer token"
    );
    assert_eq!(
        world.replay("crash"),
        value,
        "the survivor's result is replayed"
    );
}

/// A worker stopped (SIGSTOP) past its lease loses the key to another process; resumed, it
/// gets `LeaseLost` from completing, and the newer result stands.
fn stopped_holder_is_fenced_off(world: World) {
    let end = deadline(20);
    let resume = world.dir.path().join("resume");
    let mut stalled = world.call("stall", resume.to_str().expect("UTF-8 path"));
    let stalled_pid = stalled.wait_for("started", end);
    // Stop it at once: its first renewal comes only after a third of the lease, so it holds
    // no SQLite lock while stopped.
    stalled.signal(libc::SIGSTOP);
    stalled.wait_stopped(end);
    let stalled_token = token_of(world.state("stall"));

    let taker = world.call("stall", "brief").finish(end);
    let value = taker.one("value").to_owned();
    assert_eq!(
        taker.metrics()["takeovers"],
        1,
        "the stopped worker's lease expired and was taken over"
    );
    let newer_token = token_of(world.state("stall"));
    assert!(newer_token > stalled_token);

    stalled.signal(libc::SIGCONT);
    std::fs::write(&resume, b"resume").expect("create the resume file");
    let stalled = stalled.finish(end);
    println!("the resumed worker reports: {:?}", stalled.reports);
    assert_eq!(
        stalled.one("error"),
        "LeaseLost",
        "the stale holder cannot store its result"
    );
    assert_eq!(stalled.metrics()["leases_lost"], 1);

    match world.state("stall") {
        Some(RecordState::Completed { token, .. }) => {
            assert_eq!(token.0, newer_token, "the newer result stands")
        }
        other => panic!("expected the taker's completed record, found {other:?}"),
    }
    assert_eq!(
        world.replay("stall"),
        value,
        "a replay returns the newer result"
    );
    let dones: Vec<String> = world
        .ledger()
        .iter()
        .filter(|l| l[0] == "done")
        .map(|l| l[2].clone())
        .collect();
    // The stale body did finish (its effect is real); only its result was refused.
    assert_eq!(dones.len(), 2, "{dones:?}");
    assert!(dones.contains(&stalled_pid), "{dones:?}");
}

/// A result stored by one process is replayed by the next, which does not run the body.
fn results_outlive_their_process(world: World) {
    let end = deadline(20);
    let first = world.call("durable", "brief").finish(end);
    let value = first.one("value").to_owned();
    assert_eq!(first.metrics()["misses"], 1);

    let second = world.call("durable", "brief").finish(end);
    assert_eq!(
        second.one("value"),
        value,
        "the new process replays the stored result"
    );
    assert_eq!(
        second.metrics()["misses"],
        0,
        "the body did not run in the new process"
    );
    assert_eq!(second.metrics()["hits"], 1);
    assert_eq!(second.all("started"), Vec::<&str>::new());
    let runs = world.ledger().iter().filter(|l| l[0] == "start").count();
    assert_eq!(runs, 1, "the ledger shows one run");
}

macro_rules! over_store {
    ($backend:ident, $url:expr) => {
        mod $backend {
            #[test]
            fn processes_share_exactly_once() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::processes_share_exactly_once(world);
                }
            }

            #[test]
            fn killed_holder_is_taken_over_after_its_lease() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::killed_holder_is_taken_over_after_its_lease(world);
                }
            }

            #[test]
            fn stopped_holder_is_fenced_off() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::stopped_holder_is_fenced_off(world);
                }
            }

            #[test]
            fn results_outlive_their_process() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::results_outlive_their_process(world);
                }
            }
        }
    };
}

#[cfg(any(feature = "redis", feature = "postgres"))]
fn url_from(var: &str, default: &str) -> Option<String> {
    Some(std::env::var(var).unwrap_or_else(|_| default.to_owned()))
}

over_store!(sqlite, None);
#[cfg(feature = "redis")]
over_store!(
    redis,
    super::url_from("IDEM_REDIS_URL", "redis://127.0.0.1:6379")
);
#[cfg(feature = "postgres")]
over_store!(
    postgres,
    super::url_from(
        "IDEM_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test"
    )
);
/// DynamoDB (a table per test) without `processes_share_exactly_once`: its 4 processes' 1200
/// calls, with waiters polling, need more than the ~100 requests a second the local server
/// (moto, one request at a time) answers, so they miss its 20 s deadline. The exactly-once
/// claim under contention is `conformance_dynamodb.rs`'s racing claims.
#[cfg(feature = "dynamodb")]
mod dynamodb {
    fn world() -> Option<super::World> {
        let table = idem_support::dynamodb::fresh_table("proc");
        super::World::new("dynamodb", Some(idem_support::dynamodb::url_for(&table)))
    }

    #[test]
    fn killed_holder_is_taken_over_after_its_lease() {
        if let Some(world) = world() {
            super::killed_holder_is_taken_over_after_its_lease(world);
        }
    }

    #[test]
    fn stopped_holder_is_fenced_off() {
        if let Some(world) = world() {
            super::stopped_holder_is_fenced_off(world);
        }
    }

    #[test]
    fn results_outlive_their_process() {
        if let Some(world) = world() {
            super::results_outlive_their_process(world);
        }
    }
}
#[cfg(feature = "redis")]
over_store!(
    redis_cluster,
    super::url_from(
        "IDEM_REDIS_CLUSTER_URL",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    )
);
