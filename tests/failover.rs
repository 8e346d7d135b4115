//! Redis Cluster failover under load, counted against a ledger kept outside Redis.
//!
//! Four worker processes (this test binary run again with `--exact worker`, told its part by
//! `IDEM_FAILOVER_WORKER`) call idempotent bodies over many keys while the parent fails a
//! master over: SIGKILL (`master_killed`) and SIGSTOP past `cluster-node-timeout`
//! (`master_paused`), a replica is promoted, the killed node is restarted with the command line
//! of `.ci/redis-cluster` (the paused one resumed), and it rejoins as a replica before the next
//! failover. `no_faults_baseline` runs the same load without faults. Each test runs once with
//! the default setting and once with `RedisOptions::wait_for_replicas(1, 100 ms)`, and prints
//! one table row per setting (`-- --nocapture`).
//!
//! Every call appends to a ledger file outside Redis (`O_APPEND`, one `write` per line): `b`
//! when the call begins, `s` when its body starts (with its fencing token, before anything
//! else), `o` with its outcome. Each key is called once by its owner and once, a little later,
//! by the next worker, so a result lost in a failover shows up as a second body start. Counted
//! per run: keys whose body started twice, results lost (a body started after a call of the key
//! had already returned its result), errors by kind, throughput, and per failover the time to
//! promotion, to the first successful call on the failed shard, and to rejoining.
//!
//! Fencing tokens are checked on every key: a body whose call began after another body of the
//! key had started (in ledger order) must have a larger token. So that the check is not vacuous,
//! a fifth task per worker calls a few "fence" keys on every shard over and over with a body
//! that returns `Err` (which releases the claim, so the next call runs the body again with a new
//! token); every failover must be bridged by a fence key of the failed shard, with a body
//! started before the fault and one whose call began after it, the later one with the larger
//! token.
//!
//! The cluster is `IDEM_REDIS_CLUSTER_URL` (default
//! `redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`, as `.ci/redis-cluster`
//! starts it); its nodes must be on loopback, with pid files this user can read. Unreachable,
//! the tests print why and pass, unless `IDEM_REQUIRE_SERVICES=1`. The number of failovers per
//! mode and setting is `IDEM_FAILOVERS` (default 1), the length of the baseline
//! `IDEM_FAILOVER_BASELINE_SECS` (default 5); `IDEM_FAILOVER_TRACE=1` also writes every store
//! operation to the ledger and shows them in the printed examples of keys whose body ran twice.
//! The cluster is left healthy (every node up, `cluster_state:ok`, every replica in sync) even
//! when a test fails.
#![cfg(all(feature = "redis", unix))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotency::redis::{redis, RedisOptions, DEFAULT_PREFIX};
use idempotency::store::{Claim, FencingToken, RecordState, StoredRecord};
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, RedisStore, StorageKey, Store};

/// The environment variable that makes the `worker` test a worker, with its index.
const ROLE: &str = "IDEM_FAILOVER_WORKER";
/// Marks the lines of a worker's stdout meant for the parent.
const MARK: &str = "@idem ";
/// Worker processes.
const PROCESSES: usize = 4;
/// Call loops per worker (plus one fence loop).
const TASKS: usize = 8;
/// How many keys later a worker calls its neighbour's key again.
const LAG: usize = 16;
/// Fence keys per third of the slot space.
const FENCE_KEYS_PER_THIRD: usize = 4;
const LEASE: Duration = Duration::from_secs(2);
/// Records of a run outlive it by this much, then Redis drops them.
const TTL: Duration = Duration::from_secs(600);
/// A call that has not ended after this long is counted as hung.
const CALL_BOUND: Duration = Duration::from_secs(30);
/// The scope of every key: `StorageKey::derive(SCOPE, key)`.
const SCOPE: &str = "failover";
/// Traffic before the first fault, and after each rejoin before the next one.
const WARMUP: Duration = Duration::from_millis(1500);
const SETTLE: Duration = Duration::from_millis(1500);
/// The bounds of each step of a failover.
const PROMOTION_BOUND: Duration = Duration::from_secs(20);
/// A rejoining node needs a full resync: 5 s of `repl-diskless-sync-delay`, then the data.
const REJOIN_BOUND: Duration = Duration::from_secs(120);
const SLOTS: u16 = 16384;

/// The tests share one cluster and fault it: one at a time.
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setting {
    /// `RedisStore::connect`'s defaults: asynchronous replication, no `WAIT`.
    Default,
    /// `wait_for_replicas(1, 100 ms)`: `WAIT 1 100` after each claim and each completion.
    Wait,
}

impl Setting {
    fn name(self) -> &'static str {
        match self {
            Setting::Default => "default",
            Setting::Wait => "wait",
        }
    }

    fn parse(name: &str) -> Setting {
        match name {
            "default" => Setting::Default,
            "wait" => Setting::Wait,
            other => panic!("unknown setting `{other}`"),
        }
    }

    /// The store's options; every run has a prefix of its own, removed at its end.
    fn options(self, prefix: &str) -> RedisOptions {
        let options = RedisOptions::new().prefix(prefix);
        match self {
            Setting::Default => options,
            Setting::Wait => options.wait_for_replicas(1, Duration::from_millis(100)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// No fault: the same load, for comparison.
    None,
    /// SIGKILL the master, restart it once its replica is promoted.
    Kill,
    /// SIGSTOP the master until its replica is promoted, then SIGCONT.
    Pause,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Kill => "kill",
            Mode::Pause => "pause",
        }
    }
}

// ---- the tests -------------------------------------------------------------------------------

#[test]
fn no_faults_baseline() {
    run_mode(Mode::None);
}

#[test]
fn master_killed() {
    run_mode(Mode::Kill);
}

#[test]
fn master_paused() {
    run_mode(Mode::Pause);
}

fn run_mode(mode: Mode) {
    let _one_at_a_time = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cluster) = Cluster::open() else {
        return;
    };
    let failovers = env_number("IDEM_FAILOVERS", 1).max(1);
    let rows: Vec<Row> = [Setting::Default, Setting::Wait]
        .into_iter()
        .map(|setting| run(&cluster, mode, setting, failovers))
        .collect();
    println!("\n{}", Row::HEADER);
    for row in &rows {
        println!("{}", row.line());
    }
    println!();
    for row in &rows {
        row.check();
    }
}

// ---- the worker side -------------------------------------------------------------------------

/// Runs a worker when started by a test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(index) = std::env::var(ROLE) else {
        return;
    };
    let index: usize = index.parse().expect("a worker index");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(worker_main(index));
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("a worker needs ${name}"))
}

/// One line for the parent on stdout.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// The key prefix of a run's records.
fn run_prefix(run: &str) -> String {
    format!("idem-failover-{run}")
}

fn now_us() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since.as_micros()).expect("microseconds fit in u64")
}

/// The ledger: a file opened with `O_APPEND`, one `write` per line, so the lines of all
/// workers interleave whole, in the order they were written.
struct Ledger(File);

impl Ledger {
    fn open(path: &Path) -> Ledger {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open the ledger");
        Ledger(file)
    }

    fn line(&self, line: &str) {
        let written = (&self.0)
            .write(line.as_bytes())
            .expect("append to the ledger");
        assert_eq!(written, line.len(), "one write per ledger line");
    }
}

struct Worker {
    index: usize,
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    run: String,
    stopping: AtomicBool,
}

async fn worker_main(index: usize) {
    let url = var("IDEM_FAILOVER_URL");
    let setting = Setting::parse(&var("IDEM_FAILOVER_SETTING"));
    let go = PathBuf::from(var("IDEM_FAILOVER_GO"));
    let stop = PathBuf::from(var("IDEM_FAILOVER_STOP"));
    let end_us: u64 = var("IDEM_FAILOVER_END_US").parse().expect("an end time");
    let prefix = run_prefix(&var("IDEM_FAILOVER_RUN"));
    let store = RedisStore::connect_with(&url, &setting.options(&prefix))
        .await
        .unwrap_or_else(|e| panic!("worker {index} cannot connect to `{url}`: {e}"));
    let ledger = Arc::new(Ledger::open(Path::new(&var("IDEM_FAILOVER_LEDGER"))));
    let store: Arc<dyn Store> = if std::env::var("IDEM_FAILOVER_TRACE").is_ok_and(|v| v == "1") {
        Arc::new(Traced {
            inner: store,
            ledger: ledger.clone(),
        })
    } else {
        Arc::new(store)
    };
    let worker = Arc::new(Worker {
        index,
        store,
        ledger,
        run: var("IDEM_FAILOVER_RUN"),
        stopping: AtomicBool::new(false),
    });
    report("ready", std::process::id());
    let go_by = Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        assert!(Instant::now() < go_by, "the go file never appeared");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Stop at the stop file, or at the time bound whatever happens to the parent.
    let watcher = {
        let worker = worker.clone();
        tokio::spawn(async move {
            while !stop.exists() && now_us() < end_us {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            worker.stopping.store(true, Ordering::SeqCst);
        })
    };
    let mut loops: Vec<_> = (0..TASKS)
        .map(|task| tokio::spawn(call_loop(worker.clone(), task)))
        .collect();
    loops.push(tokio::spawn(fence_loop(worker.clone())));
    let mut calls = 0;
    for task in loops {
        calls += task.await.expect("a call loop panicked");
    }
    watcher.abort();
    report("done", calls);
}

/// Calls this worker's keys `run:worker:task:j` one after another, and after each, the key of
/// the next worker `LAG` steps back, so that every key is called by two workers.
async fn call_loop(worker: Arc<Worker>, task: usize) -> u64 {
    let next = (worker.index + 1) % PROCESSES;
    let mut calls = 0;
    let mut j = 0;
    while !worker.stopping.load(Ordering::SeqCst) {
        let own = format!("{}:{}:{task}:{j}", worker.run, worker.index);
        call_once(&worker, &own).await;
        calls += 1;
        if j >= LAG {
            let theirs = format!("{}:{next}:{task}:{}", worker.run, j - LAG);
            call_once(&worker, &theirs).await;
            calls += 1;
        }
        j += 1;
    }
    calls
}

/// One call whose body returns its token: `b`, `s` and `o` lines in the ledger.
async fn call_once(worker: &Worker, key: &str) {
    let begin = now_us();
    let w = worker.index;
    worker.ledger.line(&format!("b {key} {w} {begin}\n"));
    let started = AtomicBool::new(false);
    let call = Call::new(StorageKey::derive(SCOPE, key).expect("a valid key"))
        .store(worker.store.clone())
        .lease(LEASE)
        .ttl(TTL)
        .run(ErrorPolicy::never(), async {
            let token = idempotency::context::token()
                .expect("a body has a fencing token")
                .0;
            worker
                .ledger
                .line(&format!("s {key} {token} {w} {}\n", now_us()));
            started.store(true, Ordering::SeqCst);
            Ok::<_, Error>(format!("{w}/{token}"))
        });
    let out = tokio::time::timeout(CALL_BOUND, call).await;
    let (kind, value) = match out {
        Err(_) => ("hang".to_owned(), "-".to_owned()),
        Ok(Ok(value)) if started.load(Ordering::SeqCst) => ("ran".to_owned(), value),
        Ok(Ok(value)) => ("replay".to_owned(), value),
        Ok(Err(e)) => (classify(&e), "-".to_owned()),
    };
    let end = now_us();
    worker
        .ledger
        .line(&format!("o {key} {w} {kind} {value} {begin} {end}\n"));
}

/// With `IDEM_FAILOVER_TRACE=1`, the workers' store: a `RedisStore` that also writes each
/// store operation to the ledger (`x <storage key> <operation> <result> <begin> <end>`), for
/// the examples the parent prints. Off by default: the figures are measured without it.
struct Traced {
    inner: RedisStore,
    ledger: Arc<Ledger>,
}

impl Traced {
    fn log<T>(
        &self,
        key: &StorageKey,
        op: &str,
        begin: u64,
        out: &Result<T, Error>,
        ok: impl Fn(&T) -> String,
    ) {
        let result = match out {
            Ok(value) => ok(value),
            Err(e) => classify(e),
        };
        self.ledger.line(&format!(
            "x {} {op} {result} {begin} {}\n",
            key.as_str(),
            now_us()
        ));
    }
}

#[async_trait::async_trait]
impl Store for Traced {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn durable(&self) -> bool {
        self.inner.durable()
    }

    fn notifies_changes(&self) -> bool {
        self.inner.notifies_changes()
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let begin = now_us();
        let out = self.inner.claim(key, fingerprint, lease).await;
        self.log(key, "claim", begin, &out, |claim| match claim {
            Claim::Acquired { token, takeover } => format!("acquired:{}:{takeover}", token.0),
            Claim::Completed(_) => "completed".to_owned(),
            other => format!("{other:?}"),
        });
        out
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let begin = now_us();
        let out = self.inner.complete(key, token, record, ttl).await;
        self.log(key, &format!("complete:{}", token.0), begin, &out, |()| {
            "ok".to_owned()
        });
        out
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<(), Error> {
        let begin = now_us();
        let out = self.inner.release(key, token).await;
        self.log(key, &format!("release:{}", token.0), begin, &out, |()| {
            "ok".to_owned()
        });
        out
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), Error> {
        let begin = now_us();
        let out = self.inner.renew(key, token, lease).await;
        self.log(key, &format!("renew:{}", token.0), begin, &out, |()| {
            "ok".to_owned()
        });
        out
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>, Error> {
        let begin = now_us();
        let out = self.inner.get(key).await;
        self.log(key, "get", begin, &out, |record| match record {
            None => "none".to_owned(),
            Some(StoredRecord {
                state: RecordState::InFlight { token },
                ..
            }) => format!("in_flight:{}", token.0),
            Some(StoredRecord {
                state: RecordState::Completed { token, .. },
                ..
            }) => format!("completed:{}", token.0),
        });
        out
    }

    async fn purge_expired(&self) -> Result<u64, Error> {
        self.inner.purge_expired().await
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        self.inner.wait_for_change(key, max).await
    }
}

/// What a fence body returns: always `Err`, so that the claim is released and the next call
/// runs the body again, with a new token.
#[derive(Debug)]
enum Fenced {
    Released,
    Idem(Error),
}

impl From<Error> for Fenced {
    fn from(e: Error) -> Self {
        Fenced::Idem(e)
    }
}

/// The fence keys of a run: the first `FENCE_KEYS_PER_THIRD` names in each third of the slot
/// space (one shard each, as `.ci/redis-cluster` lays them out), the same in every worker.
fn fence_keys(run: &str) -> Vec<String> {
    let mut per_third = [0; 3];
    let mut keys = Vec::new();
    for n in 0.. {
        if per_third.iter().all(|&k| k == FENCE_KEYS_PER_THIRD) {
            break;
        }
        let key = format!("{run}:fence:{n}");
        let third = usize::from(slot_of(&key)) * 3 / usize::from(SLOTS);
        if per_third[third] < FENCE_KEYS_PER_THIRD {
            per_third[third] += 1;
            keys.push(key);
        }
    }
    keys
}

/// Calls the fence keys round and round (each worker from another place), without pause.
async fn fence_loop(worker: Arc<Worker>) -> u64 {
    let keys = fence_keys(&worker.run);
    let mut i = worker.index * keys.len() / PROCESSES;
    let mut calls = 0;
    while !worker.stopping.load(Ordering::SeqCst) {
        let key = &keys[i % keys.len()];
        let begin = now_us();
        let w = worker.index;
        worker.ledger.line(&format!("b {key} {w} {begin}\n"));
        let call = Call::new(StorageKey::derive(SCOPE, key).expect("a valid key"))
            .store(worker.store.clone())
            .lease(LEASE)
            .ttl(TTL)
            .run(ErrorPolicy::never(), async {
                let token = idempotency::context::token()
                    .expect("a body has a fencing token")
                    .0;
                worker
                    .ledger
                    .line(&format!("s {key} {token} {w} {}\n", now_us()));
                Err::<String, _>(Fenced::Released)
            });
        let kind = match tokio::time::timeout(CALL_BOUND, call).await {
            Err(_) => "hang".to_owned(),
            Ok(Err(Fenced::Released)) => "released".to_owned(),
            Ok(Err(Fenced::Idem(e))) => classify(&e),
            Ok(Ok(_)) => "unexpected-ok".to_owned(),
        };
        let end = now_us();
        worker
            .ledger
            .line(&format!("o {key} {w} {kind} - {begin} {end}\n"));
        calls += 1;
        i += 1;
    }
    calls
}

/// An error's kind, one word: the variant, and for `Store` what went wrong.
fn classify(e: &Error) -> String {
    let debug = format!("{e:?}");
    let variant = debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_owned();
    if !matches!(e, Error::Store { .. }) {
        return variant;
    }
    let text = e.to_string();
    let why = if text.contains("not replicated") {
        "not-replicated"
    } else if text.contains("CLUSTERDOWN") {
        "clusterdown"
    } else if text.contains("TRYAGAIN") {
        "tryagain"
    } else if text.contains("refused") {
        "refused"
    } else if text.contains("timed out") || text.contains("timeout") {
        "timeout"
    } else if text.contains("closed") || text.contains("reset") || text.contains("broken pipe") {
        "dropped"
    } else {
        "other"
    };
    format!("Store/{why}")
}

/// The Redis Cluster slot of a key's records: CRC16 (XMODEM) of the hash tag, which is the
/// storage key's hex digits.
fn slot_of(key: &str) -> u16 {
    let storage = StorageKey::derive(SCOPE, key).expect("a valid key");
    let mut crc: u16 = 0;
    for &byte in storage.as_str().as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

// ---- the cluster -----------------------------------------------------------------------------

/// A node as `CLUSTER NODES` lists it.
#[derive(Clone, Debug)]
struct NodeLine {
    id: String,
    addr: String,
    flags: Vec<String>,
    master: String,
    link: String,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    fn is_myself(&self) -> bool {
        self.flags.iter().any(|f| f == "myself")
    }

    fn failing(&self) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f[1].split(['@', ',']).next().unwrap_or("").to_owned();
            let slots = f
                .get(8..)
                .unwrap_or(&[])
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => (a.parse().expect("slot"), b.parse().expect("slot")),
                    None => {
                        let a = s.parse().expect("slot");
                        (a, a)
                    }
                })
                .collect();
            NodeLine {
                id: f[0].to_owned(),
                addr,
                flags: f[2].split(',').map(str::to_owned).collect(),
                master: f[3].to_owned(),
                link: f[7].to_owned(),
                slots,
            }
        })
        .collect()
}

/// One field of `CLUSTER INFO` / `INFO` text.
fn info_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// What is needed to restart a node as `.ci/redis-cluster` started it.
#[derive(Clone, Debug)]
struct Node {
    addr: String,
    port: String,
    bind: Vec<String>,
    dir: String,
    pidfile: String,
    logfile: String,
    config_file: String,
    node_timeout: String,
    save: String,
    appendonly: String,
}

impl Node {
    fn pid(&self) -> Result<libc::pid_t, String> {
        let text = std::fs::read_to_string(&self.pidfile)
            .map_err(|e| format!("cannot read {}: {e}", self.pidfile))?;
        text.trim()
            .parse()
            .map_err(|e| format!("{}: not a pid: {e}", self.pidfile))
    }

    /// The arguments of `.ci/redis-cluster`'s `redis-server` command, with this node's values.
    fn command_line(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["--daemonize".into(), "yes".into(), "--bind".into()];
        args.extend(self.bind.iter().cloned());
        let options: [(&str, &str); 9] = [
            ("--port", &self.port),
            ("--dir", &self.dir),
            ("--cluster-enabled", "yes"),
            ("--cluster-config-file", &self.config_file),
            ("--cluster-node-timeout", &self.node_timeout),
            ("--save", &self.save),
            ("--appendonly", &self.appendonly),
            ("--logfile", &self.logfile),
            ("--pidfile", &self.pidfile),
        ];
        for (name, value) in options {
            args.push(name.to_owned());
            args.push(value.to_owned());
        }
        args
    }
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

fn signal(pid: libc::pid_t, signal: libc::c_int) -> Result<(), String> {
    // SAFETY: kill(2) with a pid read from a redis-server pid file, checked to be redis-server.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// The cluster under test, and how to reach, fault and restart each of its nodes.
struct Cluster {
    url: String,
    nodes: Vec<Node>,
    /// Masters that serve slots, when healthy.
    masters: usize,
}

/// A connection to one node (never to a paused one: it would not answer).
fn connect(addr: &str) -> Result<redis::Connection, String> {
    let client = redis::Client::open(format!("redis://{addr}")).map_err(|e| e.to_string())?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|e| format!("{addr}: {e}"))?;
    con.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| con.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(con)
}

/// Sends one command to one node.
fn query<T: redis::FromRedisValue>(addr: &str, args: &[&str]) -> Result<T, String> {
    let mut con = connect(addr)?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut con)
        .map_err(|e| format!("{addr} {}: {e}", args.join(" ")))
}

fn config(addr: &str, name: &str) -> Result<String, String> {
    let pair: Vec<String> = query(addr, &["CONFIG", "GET", name])?;
    pair.get(1)
        .cloned()
        .ok_or_else(|| format!("{addr}: no config `{name}`"))
}

impl Cluster {
    /// The cluster at `IDEM_REDIS_CLUSTER_URL`, or `None` (with the reason printed; a failure
    /// under `IDEM_REQUIRE_SERVICES=1`) when it cannot be reached or controlled from here.
    fn open() -> Option<Cluster> {
        let url = std::env::var("IDEM_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".to_owned()
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let probe = runtime.block_on(async {
            let store = RedisStore::connect(&url).await?;
            if !store.is_cluster() {
                return Err(Error::config("not a redis+cluster:// URL"));
            }
            store
                .get(&StorageKey::derive(SCOPE, "probe").expect("key"))
                .await?;
            Ok::<_, Error>(())
        });
        if let Err(e) = probe {
            idem_support::unavailable(&format!("the Redis Cluster at {url}"), e);
            return None;
        }
        match Cluster::control(&url) {
            Ok(cluster) => Some(cluster),
            Err(e) => {
                idem_support::unavailable(
                    &format!("control of the Redis Cluster at {url} (local nodes, pid files)"),
                    e,
                );
                None
            }
        }
    }

    fn control(url: &str) -> Result<Cluster, String> {
        let hosts = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .ok_or("no scheme")?;
        let hosts = hosts.split(['/', '?']).next().unwrap_or("");
        let hosts = hosts.rsplit_once('@').map_or(hosts, |(_, h)| h);
        let seeds: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
        let text = seeds
            .iter()
            .find_map(|seed| query::<String>(seed, &["CLUSTER", "NODES"]).ok())
            .ok_or("no seed node answers CLUSTER NODES")?;
        let lines = parse_nodes(&text);
        let mut nodes = Vec::new();
        for line in &lines {
            let (host, port) = line
                .addr
                .rsplit_once(':')
                .ok_or_else(|| format!("address `{}`", line.addr))?;
            if !matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]") {
                return Err(format!(
                    "node {} is not on loopback: this test only faults local nodes",
                    line.addr
                ));
            }
            let addr = line.addr.as_str();
            let node = Node {
                addr: addr.to_owned(),
                port: port.to_owned(),
                bind: config(addr, "bind")?
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                dir: config(addr, "dir")?,
                pidfile: config(addr, "pidfile")?,
                logfile: config(addr, "logfile")?,
                config_file: config(addr, "cluster-config-file")?,
                node_timeout: config(addr, "cluster-node-timeout")?,
                save: config(addr, "save")?,
                appendonly: config(addr, "appendonly")?,
            };
            let pid = node.pid()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !alive(pid) || !String::from_utf8_lossy(&cmdline).contains("redis-server") {
                return Err(format!(
                    "pid {pid} of {} is not a live redis-server of this machine",
                    node.addr
                ));
            }
            nodes.push(node);
        }
        let masters = lines
            .iter()
            .filter(|l| l.is_master() && !l.slots.is_empty())
            .count();
        if masters < 2 || nodes.len() < 2 * masters {
            return Err(format!(
                "{masters} masters and {} nodes: failovers need a replica per master",
                nodes.len()
            ));
        }
        let cluster = Cluster {
            url: url.to_owned(),
            nodes,
            masters,
        };
        // The slot computation must agree with the server's.
        let key = "slot-check";
        let record = format!(
            "{DEFAULT_PREFIX}:{{{}}}",
            StorageKey::derive(SCOPE, key).expect("key").as_str()
        );
        let slot: u16 = query(&cluster.nodes[0].addr, &["CLUSTER", "KEYSLOT", &record])?;
        assert_eq!(slot_of(key), slot, "CRC16 slot of {record}");
        Ok(cluster)
    }

    /// The node list as seen by the first node that answers, other than `except`.
    fn view(&self, except: Option<&str>) -> Result<(String, Vec<NodeLine>), String> {
        let mut last = String::from("no node to ask");
        for node in self
            .nodes
            .iter()
            .filter(|n| Some(n.addr.as_str()) != except)
        {
            match query::<String>(&node.addr, &["CLUSTER", "NODES"]) {
                Ok(text) => return Ok((node.addr.clone(), parse_nodes(&text))),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Healthy: every node up and in `cluster_state:ok`, all slots served, every node knows
    /// every other one as connected and not failing, `masters` masters serve slots, and every
    /// replica's link to its master is up.
    fn health(&self) -> Result<(), String> {
        let n = self.nodes.len();
        let mut masters = 0;
        let mut replicas: HashMap<String, usize> = HashMap::new();
        for node in &self.nodes {
            let addr = node.addr.as_str();
            let info: String = query(addr, &["CLUSTER", "INFO"])?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("{addr}: cluster_state not ok"));
            }
            let number = |name| info_field(&info, name).and_then(|v| v.parse::<usize>().ok());
            if number("cluster_known_nodes") != Some(n) {
                return Err(format!("{addr}: does not know {n} nodes"));
            }
            if number("cluster_slots_ok") != Some(usize::from(SLOTS)) {
                return Err(format!("{addr}: not every slot is ok"));
            }
            let lines = parse_nodes(&query::<String>(addr, &["CLUSTER", "NODES"])?);
            if let Some(bad) = lines.iter().find(|l| l.failing() || l.link != "connected") {
                return Err(format!("{addr} sees {} as {:?}", bad.addr, bad.flags));
            }
            let me = lines
                .iter()
                .find(|l| l.is_myself())
                .ok_or_else(|| format!("{addr}: no `myself` line"))?;
            if me.is_master() {
                if !me.slots.is_empty() {
                    masters += 1;
                }
            } else {
                let replication: String = query(addr, &["INFO", "replication"])?;
                if info_field(&replication, "master_link_status") != Some("up") {
                    return Err(format!("{addr}: replica link to its master not up"));
                }
                *replicas.entry(me.master.clone()).or_default() += 1;
            }
        }
        if masters != self.masters || replicas.len() != self.masters {
            return Err(format!(
                "{masters} masters serve slots and {} have replicas; expected {}",
                replicas.len(),
                self.masters
            ));
        }
        Ok(())
    }

    fn wait_healthy(&self, bound: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            match self.health() {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() > bound => {
                    return Err(format!("not healthy after {bound:?}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn node(&self, addr: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.addr == addr)
            .expect("a known node")
    }

    /// Waits until a node other than `victim` is master of the victim's first slot, as a
    /// node other than the victim sees it, in `cluster_state:ok`; returns the new master.
    fn wait_promoted(&self, victim: &NodeLine) -> Result<String, String> {
        let start = Instant::now();
        let slot = victim.slots[0].0;
        loop {
            if let Ok((observer, lines)) = self.view(Some(&victim.addr)) {
                let promoted = lines
                    .iter()
                    .find(|l| l.is_master() && l.id != victim.id && l.owns(slot));
                let ok = query::<String>(&observer, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info_field(&info, "cluster_state") == Some("ok"));
                if let (Some(promoted), true) = (promoted, ok) {
                    return Ok(promoted.addr.clone());
                }
            }
            if start.elapsed() > PROMOTION_BOUND {
                return Err(format!(
                    "no replica of {} promoted within {PROMOTION_BOUND:?}",
                    victim.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the keys under `prefix` from every master (and so from their replicas); returns
    /// how many.
    fn remove_keys(&self, prefix: &str) -> Result<u64, String> {
        let (_, lines) = self.view(None)?;
        let mut removed = 0;
        for master in lines
            .iter()
            .filter(|l| l.is_master() && !l.slots.is_empty())
        {
            let mut con = connect(&master.addr)?;
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}:*"))
                    .arg("COUNT")
                    .arg(10_000)
                    .query(&mut con)
                    .map_err(|e| format!("{} SCAN: {e}", master.addr))?;
                // One key per UNLINK: the keys of a node are in many slots.
                if !keys.is_empty() {
                    let mut unlink = redis::pipe();
                    for key in &keys {
                        unlink.cmd("UNLINK").arg(key).ignore();
                    }
                    unlink
                        .query::<()>(&mut con)
                        .map_err(|e| format!("{} UNLINK: {e}", master.addr))?;
                }
                removed += keys.len() as u64;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// SIGKILLs the node and waits until it is gone.
    fn kill(&self, node: &Node) -> Result<(), String> {
        let pid = node.pid()?;
        signal(pid, libc::SIGKILL)?;
        let start = Instant::now();
        while alive(pid) {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(format!(
                    "{} (pid {pid}) still alive after SIGKILL",
                    node.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts the node again with `.ci/redis-cluster`'s command line (same port, dir and
    /// `nodes.conf`): it rejoins as a replica of the promoted node.
    fn restart(&self, node: &Node) -> Result<(), String> {
        let status = Command::new("redis-server")
            .args(node.command_line())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("redis-server: {e}"))?;
        if !status.success() {
            return Err(format!(
                "redis-server for {} exited with {status}",
                node.addr
            ));
        }
        let start = Instant::now();
        while query::<String>(&node.addr, &["PING"]).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("{} does not answer after its restart", node.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Undoes a fault left in place (a stopped or killed node) and waits for the cluster to be
/// healthy, also when the test fails half-way.
struct Restore<'a> {
    cluster: &'a Cluster,
    stopped: Option<libc::pid_t>,
    killed: Option<Node>,
}

impl Restore<'_> {
    fn heal(&mut self) -> Result<(), String> {
        if let Some(pid) = self.stopped.take() {
            signal(pid, libc::SIGCONT)?;
        }
        if let Some(node) = self.killed.take() {
            if query::<String>(&node.addr, &["PING"]).is_err() {
                self.cluster.restart(&node)?;
            }
        }
        self.cluster.wait_healthy(REJOIN_BOUND).map(drop)
    }
}

/// Removes a run's records from the cluster at its end, also when the test fails.
struct RemoveKeys<'a> {
    cluster: &'a Cluster,
    prefix: String,
}

impl Drop for RemoveKeys<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.remove_keys(&self.prefix) {
            eprintln!(
                "WARNING: could not remove the keys under `{}`: {e}",
                self.prefix
            );
        }
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if self.stopped.is_some() || self.killed.is_some() {
            if let Err(e) = self.heal() {
                eprintln!("WARNING: could not restore the Redis Cluster: {e}");
            }
        }
    }
}

// ---- one run ---------------------------------------------------------------------------------

/// A worker process: killed and reaped on drop unless it ended, so a failing test leaves no
/// process behind.
struct Process {
    index: usize,
    child: Child,
    reaped: bool,
    reports: Receiver<(String, String)>,
    stderr: Option<JoinHandle<String>>,
}

impl Process {
    fn spawn(index: usize, vars: &[(&str, String)]) -> Process {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(ROLE, index.to_string())
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let (tx, reports) = mpsc::channel();
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
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Process {
            index,
            child,
            reaped: false,
            reports,
            stderr: Some(stderr),
        }
    }

    fn wait_for(&mut self, kind: &str, bound: Duration) -> Result<String, String> {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok((k, payload)) if k == kind => return Ok(payload),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("worker {}: no `{kind}` in time", self.index))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    self.reaped = true;
                    let stderr = self.stderr.take().and_then(|h| h.join().ok());
                    return Err(format!(
                        "worker {} ended ({status:?}) without `{kind}`: {}",
                        self.index,
                        stderr.unwrap_or_default()
                    ));
                }
            }
        }
    }

    /// Waits for the worker's `done` and its exit; returns how many calls it made.
    fn finish(mut self, bound: Duration) -> Result<u64, String> {
        let calls = self.wait_for("done", bound)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait().expect("try_wait") {
                Some(status) => break status,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                None => return Err(format!("worker {} did not exit", self.index)),
            }
        };
        self.reaped = true;
        if !status.success() {
            return Err(format!("worker {} exited with {status}", self.index));
        }
        calls
            .trim()
            .parse()
            .map_err(|e| format!("`done {calls}`: {e}"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One failover, as the parent saw it.
struct Fault {
    victim: String,
    promoted: String,
    slots: Vec<(u16, u16)>,
    at_us: u64,
    promotion: Duration,
    rejoined: Duration,
    /// From the fault to the end of the first successful call on the failed shard that began
    /// after the fault (from the ledger): any result (a replay needs only a read), and a new
    /// body run (a claim, a write, and with `wait` its replication).
    recovered: Option<Duration>,
    recovered_write: Option<Duration>,
    /// Fence keys of the failed shard with a body started before the fault and one whose call
    /// began after it.
    bridged: usize,
}

impl Fault {
    fn covers(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// Fails the master of shard `n % masters` over: SIGKILL and restart, or SIGSTOP and SIGCONT.
fn failover(
    cluster: &Cluster,
    restore: &mut Restore<'_>,
    mode: Mode,
    n: usize,
) -> Result<Fault, String> {
    let (_, lines) = cluster.view(None)?;
    let mut masters: Vec<&NodeLine> = lines
        .iter()
        .filter(|l| l.is_master() && !l.slots.is_empty())
        .collect();
    masters.sort_by_key(|l| l.slots[0].0);
    let victim = masters[n % masters.len()].clone();
    let node = cluster.node(&victim.addr).clone();
    let pid = node.pid()?;
    let start = Instant::now();
    let at_us = now_us();
    match mode {
        Mode::Kill => {
            restore.killed = Some(node.clone());
            cluster.kill(&node)?;
        }
        Mode::Pause => {
            restore.stopped = Some(pid);
            signal(pid, libc::SIGSTOP)?;
        }
        Mode::None => unreachable!("no faults in the baseline"),
    }
    let promoted = cluster.wait_promoted(&victim)?;
    let promotion = start.elapsed();
    restore.heal()?;
    let rejoined = start.elapsed();
    Ok(Fault {
        victim: victim.addr,
        promoted,
        slots: victim.slots,
        at_us,
        promotion,
        rejoined,
        recovered: None,
        recovered_write: None,
        bridged: 0,
    })
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("${name} is not a number"))
        })
        .unwrap_or(default)
}

fn run(cluster: &Cluster, mode: Mode, setting: Setting, failovers: u64) -> Row {
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(30)) {
        panic!("the Redis Cluster is not healthy before the run: {e}");
    }
    let failovers = if mode == Mode::None { 0 } else { failovers };
    let dir = tempfile::tempdir().expect("temporary directory");
    let ledger = dir.path().join("ledger");
    let (go, stop) = (dir.path().join("go"), dir.path().join("stop"));
    // A backstop for the workers: every step below is bounded well within it.
    let bound = Duration::from_secs(120 + 160 * failovers);
    let run_id = format!("{:016x}", rand::random::<u64>());
    let vars = [
        ("IDEM_FAILOVER_URL", cluster.url.clone()),
        ("IDEM_FAILOVER_SETTING", setting.name().to_owned()),
        ("IDEM_FAILOVER_RUN", run_id.clone()),
        ("IDEM_FAILOVER_LEDGER", ledger.display().to_string()),
        ("IDEM_FAILOVER_GO", go.display().to_string()),
        ("IDEM_FAILOVER_STOP", stop.display().to_string()),
        (
            "IDEM_FAILOVER_END_US",
            (now_us() + bound.as_micros() as u64).to_string(),
        ),
    ];
    let mut problems = Vec::new();
    // Dropped in reverse order: the workers end, the cluster heals, the records go.
    let _remove_keys = RemoveKeys {
        cluster,
        prefix: run_prefix(&run_id),
    };
    let mut restore = Restore {
        cluster,
        stopped: None,
        killed: None,
    };
    let mut workers: Vec<Process> = (0..PROCESSES).map(|i| Process::spawn(i, &vars)).collect();
    for w in &mut workers {
        if let Err(e) = w.wait_for("ready", Duration::from_secs(30)) {
            panic!("{e}");
        }
    }
    std::fs::write(&go, b"go").expect("create the go file");
    let go_us = now_us();
    std::thread::sleep(WARMUP);
    let mut faults = Vec::new();
    if mode == Mode::None {
        let secs = env_number("IDEM_FAILOVER_BASELINE_SECS", 5);
        std::thread::sleep(Duration::from_secs(secs));
    }
    for n in 0..failovers as usize {
        match failover(cluster, &mut restore, mode, n) {
            Ok(fault) => faults.push(fault),
            Err(e) => {
                problems.push(format!("failover {}: {e}", n + 1));
                break;
            }
        }
        std::thread::sleep(SETTLE);
    }
    std::fs::write(&stop, b"stop").expect("create the stop file");
    let stop_us = now_us();
    let mut reported = 0;
    for w in workers {
        match w.finish(CALL_BOUND + Duration::from_secs(30)) {
            Ok(calls) => reported += calls,
            Err(e) => problems.push(e),
        }
    }
    if let Err(e) = restore.heal() {
        problems.push(format!("the cluster did not heal: {e}"));
    }
    let analysis = analyse(&ledger, &mut faults);
    if analysis.calls + analysis.fence_calls != reported {
        problems.push(format!(
            "the workers made {reported} calls, the ledger has {} outcomes",
            analysis.calls + analysis.fence_calls
        ));
    }
    let row = Row {
        mode,
        setting,
        secs: (stop_us - go_us) as f64 / 1e6,
        analysis,
        faults,
        problems,
    };
    for (i, f) in row.faults.iter().enumerate() {
        println!(
            "{} {} failover {}: master {} (slots {:?}) → {} promoted after {} ms; on its slots the first result after {}, the first new body after {}; rejoined, cluster healthy after {} ms; {} fence keys bridged it",
            mode.name(),
            setting.name(),
            i + 1,
            f.victim,
            f.slots,
            f.promoted,
            f.promotion.as_millis(),
            f.recovered
                .map_or("none".to_owned(), |d| format!("{} ms", d.as_millis())),
            f.recovered_write
                .map_or("none".to_owned(), |d| format!("{} ms", d.as_millis())),
            f.rejoined.as_millis(),
            f.bridged,
        );
    }
    for example in &row.analysis.examples {
        println!(
            "{} {} body ran twice: {example}",
            mode.name(),
            setting.name()
        );
    }
    row
}

// ---- the ledger's account --------------------------------------------------------------------

struct Start {
    idx: usize,
    token: u64,
    /// The ledger index of the `b` line of the call this body belongs to.
    begin_idx: usize,
    begin_us: u64,
    at_us: u64,
}

#[derive(Default)]
struct KeyLog {
    calls: u32,
    starts: Vec<Start>,
    /// The ledger index of the first outcome that returned a result (ran or replayed).
    first_result: Option<usize>,
    values: Vec<String>,
    /// The ledger indexes of the key's lines.
    lines: Vec<usize>,
}

#[derive(Default)]
struct Analysis {
    calls: u64,
    outcomes: BTreeMap<String, u64>,
    keys: u64,
    keys_called_twice: u64,
    bodies: u64,
    keys_run_twice: u64,
    extra_bodies: u64,
    lost: u64,
    fence_calls: u64,
    fence_bodies: u64,
    fence_outcomes: BTreeMap<String, u64>,
    /// Pairs of body starts of one key where the second call began after the first body
    /// started: the second token must be larger.
    token_pairs: u64,
    /// Pairs of overlapping calls whose bodies started in the ledger in the other order than
    /// their tokens (allowed: neither call could see the other).
    overlapping_inversions: u64,
    /// The ledger lines of a few keys whose body ran twice, times relative to the fault.
    examples: Vec<String>,
    problems: Vec<String>,
}

fn analyse(path: &Path, faults: &mut [Fault]) -> Analysis {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut keys: HashMap<&str, KeyLog> = HashMap::new();
    let mut open: HashMap<(&str, &str), (usize, u64)> = HashMap::new();
    // Calls that returned a result: key, begin, end, whether the body ran in that call.
    let mut results: Vec<(&str, u64, u64, bool)> = Vec::new();
    let mut a = Analysis::default();
    let number = |s: &str| -> u64 { s.parse().expect("a number in the ledger") };
    let lines: Vec<&str> = text.lines().collect();
    // The lines of the traced store (`IDEM_FAILOVER_TRACE=1`) by storage key.
    let mut traced: HashMap<&str, Vec<usize>> = HashMap::new();
    for (idx, &line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        let fence = f.get(1).is_some_and(|k| k.contains(":fence:"));
        match f[..] {
            ["x", hex, ..] => {
                traced.entry(hex).or_default().push(idx);
                continue;
            }
            [_, key, ..] => keys.entry(key).or_default().lines.push(idx),
            _ => {}
        }
        match f[..] {
            ["b", key, worker, us] => {
                if open.insert((key, worker), (idx, number(us))).is_some() {
                    a.problems
                        .push(format!("{key}: worker {worker} began a call twice at once"));
                }
                keys.entry(key).or_default().calls += 1;
            }
            ["s", key, token, worker, us] => {
                let Some(&(begin_idx, begin_us)) = open.get(&(key, worker)) else {
                    a.problems
                        .push(format!("{key}: a body started outside a call of {worker}"));
                    continue;
                };
                keys.entry(key).or_default().starts.push(Start {
                    idx,
                    token: number(token),
                    begin_idx,
                    begin_us,
                    at_us: number(us),
                });
            }
            ["o", key, worker, kind, value, begin, end] => {
                if open.remove(&(key, worker)).is_none() {
                    a.problems
                        .push(format!("{key}: an outcome without a call of {worker}"));
                }
                let counts = if fence {
                    a.fence_calls += 1;
                    &mut a.fence_outcomes
                } else {
                    a.calls += 1;
                    &mut a.outcomes
                };
                *counts.entry(kind.to_owned()).or_default() += 1;
                if matches!(kind, "ran" | "replay") {
                    let log = keys.entry(key).or_default();
                    log.first_result.get_or_insert(idx);
                    log.values.push(value.to_owned());
                    results.push((key, number(begin), number(end), kind == "ran"));
                }
            }
            _ => a.problems.push(format!("unexpected ledger line `{line}`")),
        }
    }
    for ((key, worker), _) in open {
        a.problems
            .push(format!("{key}: the call of worker {worker} never ended"));
    }
    for (key, log) in &keys {
        let fence = key.contains(":fence:");
        check_tokens(key, &log.starts, &mut a);
        if fence {
            a.fence_bodies += log.starts.len() as u64;
            continue;
        }
        a.keys += 1;
        a.bodies += log.starts.len() as u64;
        if log.calls >= 2 {
            a.keys_called_twice += 1;
        }
        if log.starts.len() > 1 {
            a.keys_run_twice += 1;
            a.extra_bodies += log.starts.len() as u64 - 1;
        }
        if let Some(first) = log.first_result {
            if log.starts.iter().any(|s| s.idx > first) {
                a.lost += 1;
            }
        }
        let tokens: HashSet<u64> = log.starts.iter().map(|s| s.token).collect();
        for value in &log.values {
            let token = value.split_once('/').and_then(|(_, t)| t.parse().ok());
            if !token.is_some_and(|t| tokens.contains(&t)) {
                a.problems.push(format!(
                    "{key}: a call got `{value}`, which no body of it made"
                ));
            }
        }
    }
    // The slot of each result's key, worked out once (a SHA-256 and a CRC16 each).
    let slots: Vec<u16> = if faults.is_empty() {
        Vec::new()
    } else {
        results.iter().map(|&(key, ..)| slot_of(key)).collect()
    };
    for fault in faults.iter_mut() {
        let after: Vec<(u64, bool)> = results
            .iter()
            .zip(&slots)
            .filter(|&(&(_, begin, _, _), &slot)| begin >= fault.at_us && fault.covers(slot))
            .map(|(&(_, _, end, ran), _)| (end - fault.at_us, ran))
            .collect();
        fault.recovered = after
            .iter()
            .map(|&(us, _)| us)
            .min()
            .map(Duration::from_micros);
        fault.recovered_write = after
            .iter()
            .filter(|&&(_, ran)| ran)
            .map(|&(us, _)| us)
            .min()
            .map(Duration::from_micros);
        for (key, log) in keys.iter().filter(|(k, _)| k.contains(":fence:")) {
            if !fault.covers(slot_of(key)) {
                continue;
            }
            let before = log
                .starts
                .iter()
                .filter(|s| s.at_us < fault.at_us)
                .map(|s| s.token)
                .max();
            let after = log.starts.iter().find(|s| s.begin_us > fault.at_us);
            if let (Some(before), Some(after)) = (before, after) {
                fault.bridged += 1;
                if after.token <= before {
                    a.problems.push(format!(
                        "{key}: token {} after the failover of {} is not above {before} before it",
                        after.token, fault.victim
                    ));
                }
            }
        }
    }
    let mut twice: Vec<(&str, &KeyLog)> = keys
        .iter()
        .filter(|(k, log)| !k.contains(":fence:") && log.starts.len() > 1)
        .map(|(k, log)| (*k, log))
        .collect();
    twice.sort_by_key(|(_, log)| log.starts[0].idx);
    for (key, log) in twice.iter().take(3) {
        let first = log.starts[0].at_us;
        let Some(fault) = faults
            .iter()
            .rev()
            .find(|f| f.at_us <= first)
            .or(faults.first())
        else {
            break;
        };
        let mut example = format!(
            "key {key} (times in ms from the fault of {}):",
            fault.victim
        );
        let hex = StorageKey::derive(SCOPE, key).expect("a valid key");
        let mut shown = log.lines.clone();
        shown.extend(traced.get(hex.as_str()).into_iter().flatten());
        shown.sort_unstable();
        for idx in shown {
            // The times: the last field of `b` and `s` lines, the last two of `o` lines.
            let words: Vec<&str> = lines[idx].split(' ').collect();
            let times = if matches!(words[0], "o" | "x") { 2 } else { 1 };
            let words: Vec<String> = words
                .iter()
                .enumerate()
                .map(|(i, w)| match w.parse::<i64>() {
                    _ if i == 1 && words[0] == "x" => "(store)".to_owned(),
                    Ok(us) if i + times >= words.len() => {
                        format!("{:+.1}", (us - fault.at_us as i64) as f64 / 1000.0)
                    }
                    _ => (*w).to_owned(),
                })
                .collect();
            let _ = write!(example, "\n    {}", words.join(" "));
        }
        a.examples.push(example);
    }
    a
}

/// Every body start whose call began after another body of the key had started (in ledger
/// order) has a larger token than every such body; no two bodies share a token.
fn check_tokens(key: &str, starts: &[Start], a: &mut Analysis) {
    let mut max_before: Vec<u64> = Vec::with_capacity(starts.len());
    let mut seen = HashSet::new();
    for (i, s) in starts.iter().enumerate() {
        if !seen.insert(s.token) {
            a.problems
                .push(format!("{key}: two bodies started with token {}", s.token));
        }
        // The starts before this call began: a prefix of `starts`, which is in ledger order.
        let earlier = starts[..i].partition_point(|x| x.idx < s.begin_idx);
        if earlier > 0 {
            a.token_pairs += earlier as u64;
            if s.token <= max_before[earlier - 1] {
                a.problems.push(format!(
                    "{key}: token {} of a call that began after a body with token {} started",
                    s.token,
                    max_before[earlier - 1]
                ));
            }
        }
        a.overlapping_inversions += starts[earlier..i]
            .iter()
            .filter(|x| x.token > s.token)
            .count() as u64;
        max_before.push(max_before.last().map_or(s.token, |&m| m.max(s.token)));
    }
}

// ---- the report ------------------------------------------------------------------------------

struct Row {
    mode: Mode,
    setting: Setting,
    secs: f64,
    analysis: Analysis,
    faults: Vec<Fault>,
    problems: Vec<String>,
}

fn spread(mut values: Vec<u128>) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    values.sort_unstable();
    format!(
        "{} / {} / {}",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1]
    )
}

fn counts(map: &BTreeMap<String, u64>, leave_out: &[&str]) -> String {
    let mut out = String::new();
    for (kind, n) in map.iter().filter(|(k, _)| !leave_out.contains(&k.as_str())) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "{kind} {n}");
    }
    if out.is_empty() {
        out.push('0');
    }
    out
}

impl Row {
    const HEADER: &'static str = "| fault | setting | failovers | calls | calls/s | keys called twice | keys whose body ran twice | per 10k calls | per failover | results lost | errors returned | promotion ms (min / median / max) | first result on the failed shard ms | first new body there ms | rejoined ms | fence bodies, token pairs checked, failovers bridged |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    fn line(&self) -> String {
        let a = &self.analysis;
        let ms = |f: fn(&Fault) -> Option<Duration>| {
            spread(
                self.faults
                    .iter()
                    .filter_map(f)
                    .map(|d| d.as_millis())
                    .collect(),
            )
        };
        let per_10k = a.extra_bodies as f64 * 10_000.0 / (a.calls.max(1)) as f64;
        let per_failover = if self.faults.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", a.extra_bodies as f64 / self.faults.len() as f64)
        };
        let bridged = self.faults.iter().filter(|f| f.bridged > 0).count();
        format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} ({} extra bodies) | {:.2} | {} | {} | {} | {} | {} | {} | {} | {}, {}, {}/{} |",
            self.mode.name(),
            self.setting.name(),
            self.faults.len(),
            a.calls,
            a.calls as f64 / self.secs,
            a.keys_called_twice,
            a.keys_run_twice,
            a.extra_bodies,
            per_10k,
            per_failover,
            a.lost,
            counts(&a.outcomes, &["ran", "replay"]),
            ms(|f| Some(f.promotion)),
            ms(|f| f.recovered),
            ms(|f| f.recovered_write),
            ms(|f| Some(f.rejoined)),
            a.fence_bodies,
            a.token_pairs,
            bridged,
            self.faults.len(),
        )
    }

    fn check(&self) {
        let a = &self.analysis;
        let which = format!("{} / {}", self.mode.name(), self.setting.name());
        assert!(
            self.problems.is_empty() && a.problems.is_empty(),
            "{which}: {:#?}",
            self.problems
                .iter()
                .chain(a.problems.iter().take(20))
                .collect::<Vec<_>>()
        );
        // Every call ended, in one of the outcomes a failover may explain.
        let allowed = |kind: &str| {
            matches!(
                kind,
                "ran" | "replay" | "released" | "InFlight" | "LeaseLost" | "OutcomeUnknown"
            ) || kind.starts_with("Store/")
        };
        for (kind, n) in a.outcomes.iter().chain(&a.fence_outcomes) {
            assert!(allowed(kind), "{which}: {n} calls ended with `{kind}`");
        }
        assert!(a.calls > 0, "{which}: no calls were made");
        assert!(a.token_pairs > 0, "{which}: no fencing token was compared");
        for f in &self.faults {
            assert!(
                f.bridged > 0,
                "{which}: no fence key of {}'s shard ran a body both before and after its failover",
                f.victim
            );
            assert!(
                f.recovered.is_some(),
                "{which}: no call on {}'s slots succeeded after its failover",
                f.victim
            );
        }
        if self.mode == Mode::None {
            assert_eq!(
                a.extra_bodies, 0,
                "{which}: bodies ran twice without a fault"
            );
        }
        // With faults, duplicates are measured and reported, not ruled out: a failover loses the
        // writes its replica had not received (see RELIABILITY.md).
    }
}
