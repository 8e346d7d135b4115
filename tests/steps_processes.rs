//! Durable steps across OS processes: a worker running a three-step body (`charge`, `email`,
//! `ledger`) is SIGKILLed after its second step completed, or in the middle of it; a second
//! process takes the key over once the lease ran out, replays the completed steps without
//! running them, and runs the rest. Every caller after that gets the same result.
//!
//! Built like `tests/processes.rs`: the workers are this test binary run again with
//! `--exact worker` (the role in `IDEM_WORKER`), they print `@idem <kind> <payload>` lines the
//! parent parses, and every step appends `<step> <key> <pid>` to a ledger file outside the store
//! where its side effect starts (one `O_APPEND` write per line), so the ledger shows every run
//! of a step whatever the store says. Each test runs on SQLite (a fresh file) and, with their
//! features, on Redis (`IDEM_REDIS_URL`), a Redis Cluster (`IDEM_REDIS_CLUSTER_URL`),
//! PostgreSQL (`IDEM_POSTGRES_URL`) and DynamoDB (`IDEM_DYNAMODB_URL`, a table per test), skipped with a message when unreachable unless
//! `IDEM_REQUIRE_SERVICES=1`; every run has a random scope.
#![cfg(all(feature = "sqlite", unix))]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idem_support::process;
use idempotency::{idempotent, step, step_key, Error, StorageKey, Store};
use tempfile::TempDir;

/// The environment variable that makes the `worker` test a worker, and names its role.
const ROLE: &str = "IDEM_WORKER";
/// Marks the lines of stdout that carry a worker's reports.
const MARK: &str = "@idem ";

// ---- the worker side ------------------------------------------------------------------------

/// Runs a worker when started by a test below; a no-op in the parent run.
#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "checkout", "unknown worker role");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let url = env("IDEM_STORE");
        let store = idempotency::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("worker cannot open `{url}`: {e}"));
        let stop = match env("IDEM_STOP").as_str() {
            "none" => Stop::Never,
            "after-email" => Stop::AfterEmail,
            "in-email" => Stop::InEmail,
            other => panic!("unknown IDEM_STOP `{other}`"),
        };
        let ledger = PathBuf::from(env("IDEM_LEDGER"));
        let out = checkout(store, &ledger, &env("IDEM_SCOPE"), env("IDEM_KEY"), stop).await;
        let m = idempotency::counters();
        report(
            "metrics",
            format_args!(
                "misses={} hits={} takeovers={}",
                m.misses, m.hits, m.takeovers
            ),
        );
        match out {
            Ok(value) => report("value", value),
            Err(e) => report(
                "error",
                format_args!("{e:?}").to_string().replace('\n', " "),
            ),
        }
    });
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker needs ${name}"))
}

/// Prints one report line for the parent.
fn report(kind: &str, payload: impl std::fmt::Display) {
    // A leading newline: libtest may have printed `test worker ... ` without one.
    println!("\n{MARK}{kind} {payload}");
}

/// Where the body of [`checkout`] stops for good (the parent kills the process there).
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Never,
    /// Once the `email` step's value is stored, before the `ledger` step.
    AfterEmail,
    /// Inside the `email` step, after its side effect started.
    InEmail,
}

/// Blocks the body until the parent kills the process (a minute is far past any deadline).
async fn stop_here(at: &str) {
    report("stopped", at);
    tokio::time::sleep(Duration::from_secs(60)).await;
    panic!("still alive a minute after stopping {at}");
}

/// Three steps, each appending `<step> <key> <pid>` to the ledger where its effect starts. The
/// result names the process that ran each step: `ch_<pid>_<random>/email-<pid>/ledger-<pid>`.
#[idempotent(name = "steps_processes.checkout", key = key, scope = scope, store = store.clone(), skip(store, ledger, scope, stop), lease = "1s", on_conflict = "wait", wait = "15s")]
async fn checkout(
    store: Arc<dyn Store>,
    ledger: &Path,
    scope: &str,
    key: String,
    stop: Stop,
) -> Result<String, Error> {
    let pid = std::process::id();
    report("stepkey", step_key("charge")?);
    let charge: String = step("charge", async {
        idem_support::append_line(ledger, &format!("charge {key} {pid}\n"));
        Ok::<_, Error>(format!("ch_{pid}_{:08x}", rand::random::<u32>()))
    })
    .await?;
    let email: u32 = step("email", async {
        idem_support::append_line(ledger, &format!("email {key} {pid}\n"));
        if stop == Stop::InEmail {
            stop_here("in-email").await;
        }
        Ok::<_, Error>(pid)
    })
    .await?;
    if stop == Stop::AfterEmail {
        stop_here("after-email").await;
    }
    let entry: u32 = step("ledger", async {
        idem_support::append_line(ledger, &format!("ledger {key} {pid}\n"));
        Ok::<_, Error>(pid)
    })
    .await?;
    Ok(format!("{charge}/email-{email}/ledger-{entry}"))
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

/// What a worker reported before it exited.
struct Finished {
    reports: Vec<process::Report>,
}

impl Finished {
    fn one(&self, kind: &str) -> &str {
        let all: Vec<&str> = self
            .reports
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, p)| p.as_str())
            .collect();
        match all[..] {
            [one] => one,
            _ => panic!(
                "expected one `{kind}` report, got {all:?} in {:?}",
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
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next report of `kind` (reports of other kinds are kept).
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

/// One test's world: a store URL, a random scope, a ledger file, and the parent's own handle
/// on the store.
struct World {
    url: String,
    scope: String,
    ledger: PathBuf,
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Runtime,
    _dir: TempDir,
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
        let probe = StorageKey::derive("steps_processes", "probe").expect("key");
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
        Some(World {
            url,
            scope: format!("steps-processes-{:016x}", rand::random::<u64>()),
            ledger: dir.path().join("ledger.txt"),
            store,
            runtime,
            _dir: dir,
        })
    }

    /// Starts this test binary as a worker calling [`checkout`] on `key`, stopping as `stop`
    /// says (`none`, `after-email`, `in-email`).
    fn checkout(&self, key: &str, stop: &str) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(ROLE, "checkout")
            .env("IDEM_STORE", &self.url)
            .env("IDEM_SCOPE", &self.scope)
            .env("IDEM_LEDGER", &self.ledger)
            .env("IDEM_KEY", key)
            .env("IDEM_STOP", stop)
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
            child,
            reaped: false,
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// The pids that started `step` on `key`, in the ledger's order.
    fn runs(&self, step: &str, key: &str) -> Vec<String> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|l| l[..2] == [step, key])
            .map(|l| l[2].to_owned())
            .collect()
    }

    /// Calls `key` from the parent, which must replay: the ledger shows whether a step ran.
    fn replay(&self, key: &str) -> String {
        let before = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        let out = self
            .runtime
            .block_on(checkout(
                self.store.clone(),
                &self.ledger,
                &self.scope,
                key.to_owned(),
                Stop::Never,
            ))
            .expect("replay");
        let after = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        assert_eq!(after, before, "a replay runs no step");
        out
    }
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

// ---- the tests, over a store URL ------------------------------------------------------------

/// Kills a worker stopped at `stop` (`after-email` or `in-email`), lets a second worker take
/// the key over, and checks what ran where: returns the victim's pid, the survivor's pid and
/// the final result.
fn kill_and_resume(world: &World, key: &str, stop: &str) -> (String, String, String) {
    let end = deadline(30);
    let mut victim = world.checkout(key, stop);
    let victim_pid = victim.pid().to_string();
    let victim_step_key = victim.wait_for("stepkey", end);
    assert_eq!(victim.wait_for("stopped", end), stop);
    let status = victim.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the victim died of SIGKILL"
    );

    // The survivor starts while the victim's lease may still run (up to 1 s): it waits it
    // out, then takes the key over.
    let survivor = world.checkout(key, "none");
    let survivor_pid = survivor.pid().to_string();
    let survivor = survivor.finish(end);
    let value = survivor.one("value").to_owned();
    assert_eq!(
        survivor.metrics()["takeovers"],
        1,
        "the survivor took over the killed worker's claim: {:?}",
        survivor.reports
    );
    assert_eq!(
        survivor.one("stepkey"),
        victim_step_key,
        "step_key is the same in both runs of the call"
    );
    assert_eq!(victim_step_key.len(), 64);
    assert!(
        value.starts_with(&format!("ch_{victim_pid}_")),
        "the charge is the victim's, replayed: {value} (victim {victim_pid})"
    );
    assert!(
        value.ends_with(&format!("/ledger-{survivor_pid}")),
        "the ledger step ran in the survivor: {value} (survivor {survivor_pid})"
    );
    assert_eq!(
        world.runs("charge", key),
        [victim_pid.as_str()],
        "charge ran once, in the victim"
    );
    assert_eq!(
        world.runs("ledger", key),
        [survivor_pid.as_str()],
        "ledger ran once, in the survivor"
    );

    assert_eq!(
        world.replay(key),
        value,
        "a later caller replays the survivor's result"
    );
    let again = world.checkout(key, "none").finish(end);
    assert_eq!(again.one("value"), value, "so does a later process");
    assert_eq!(again.metrics()["hits"], 1);
    (victim_pid, survivor_pid, value)
}

/// Killed after the `email` step's value was stored: the survivor replays `charge` and
/// `email` and runs only `ledger`.
fn killed_after_a_step_completed(world: World) {
    let key = "after-email";
    let (victim, _survivor, value) = kill_and_resume(&world, key, "after-email");
    assert_eq!(
        world.runs("email", key),
        [victim.as_str()],
        "email ran once, in the victim"
    );
    assert!(
        value.contains(&format!("/email-{victim}/")),
        "the email step's value is the victim's, replayed: {value}"
    );
}

/// Killed in the middle of the `email` step: the survivor replays `charge`, runs `email` again
/// (it never completed) and `ledger` once.
fn killed_in_the_middle_of_a_step(world: World) {
    let key = "in-email";
    let (victim, survivor, value) = kill_and_resume(&world, key, "in-email");
    assert_eq!(
        world.runs("email", key),
        [victim, survivor.clone()],
        "email started in the victim, and ran again in the survivor"
    );
    assert!(
        value.contains(&format!("/email-{survivor}/")),
        "the email step's value is the survivor's: {value}"
    );
}

macro_rules! over_store {
    ($backend:ident, $url:expr) => {
        mod $backend {
            #[test]
            fn killed_after_a_step_completed() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::killed_after_a_step_completed(world);
                }
            }

            #[test]
            fn killed_in_the_middle_of_a_step() {
                if let Some(world) = super::World::new(stringify!($backend), $url) {
                    super::killed_in_the_middle_of_a_step(world);
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
#[cfg(feature = "dynamodb")]
over_store!(
    dynamodb,
    Some(idem_support::dynamodb::url_for(
        &idem_support::dynamodb::fresh_table("steps")
    ))
);
#[cfg(feature = "redis")]
over_store!(
    redis_cluster,
    super::url_from(
        "IDEM_REDIS_CLUSTER_URL",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    )
);
