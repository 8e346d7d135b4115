//! Section 5: waking waiters. A holder runs a 200 ms body; [`WAITERS`] calls in another process
//! (this binary again, run with [`WAITER_FLAG`]), started once the holder has claimed, wait for
//! it with `OnConflict::Wait` and must replay its value. The wake-up latency of a waiter is the
//! instant its call returned less the instant the holder's call returned (its result stored),
//! both read from the wall clock of the one machine. Store commands per waiter are counted by
//! the server (`wakeup_count.rs`).
//!
//! Each store runs twice in the same run: as it is (woken by Redis pub/sub, sharded pub/sub on
//! a cluster, PostgreSQL `LISTEN`/`NOTIFY`), and wrapped ([`Polling`]) so that it does not
//! notify: waiters then sleep between claims with pauses growing from 2 to 100 ms, the
//! behaviour before notification.
//!
//! The parent and the waiter process talk in lines: the child says `ready` once its store is
//! connected and warmed up; `round <id> <n>` starts `n` waiters on the key of `<id>`, answered
//! by `done <value>@<ns> ...` (one per waiter, `E@<ns>` for an error); `quit` ends it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use idem_testkit::{Hooks, Intercept};
use idempotency::{Call, Error, ErrorPolicy, OnConflict, StorageKey, Store};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::measure::{within, Res, TTL};
use crate::wakeup_count::{Counter, Counts};

/// Waiters per round.
pub(crate) const WAITERS: usize = 50;
/// Rounds per store and mode, each on a key of its own.
pub(crate) const ROUNDS: usize = 10;
/// The holder's body.
const BODY: Duration = Duration::from_millis(200);
/// How long a waiter waits at most.
const WAIT: Duration = Duration::from_secs(10);
/// Time for work the stores leave in the background (the last waiter's `UNSUBSCRIBE`) before a
/// side reports.
const SETTLE: Duration = Duration::from_millis(50);
/// The argument that makes this binary the waiters' side.
pub(crate) const WAITER_FLAG: &str = "--wakeup-waiter";

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Redis,
    Cluster,
    Postgres,
}

impl Backend {
    fn arg(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Cluster => "cluster",
            Backend::Postgres => "postgres",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Backend::Redis => "Redis",
            Backend::Cluster => "Redis Cluster",
            Backend::Postgres => "PostgreSQL",
        }
    }

    fn parse(s: &str) -> Res<Self> {
        [Backend::Redis, Backend::Cluster, Backend::Postgres]
            .into_iter()
            .find(|b| b.arg() == s)
            .ok_or_else(|| format!("unknown backend {s}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The store as it is: it notifies waiters.
    Notify,
    /// Wrapped in [`Polling`]: the behaviour before notification.
    Poll,
}

impl Mode {
    pub(crate) fn arg(self) -> &'static str {
        match self {
            Mode::Notify => "notify",
            Mode::Poll => "poll",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Notify => "notification",
            Mode::Poll => "polling (as before)",
        }
    }

    fn parse(s: &str) -> Res<Self> {
        [Mode::Notify, Mode::Poll]
            .into_iter()
            .find(|m| m.arg() == s)
            .ok_or_else(|| format!("unknown mode {s}"))
    }
}

/// Where both sides' stores live: the server and the key prefix (Redis) or table (PostgreSQL).
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) backend: Backend,
    pub(crate) url: String,
    pub(crate) name: String,
}

/// A store that does not announce changes: waiting calls poll it with growing pauses, and
/// `wait_for_change` is the plain sleep it was before notification.
struct Polling;

#[async_trait]
impl Hooks for Polling {
    fn notifies_changes(&self, _: &dyn Store) -> bool {
        false
    }

    async fn wait_for_change(&self, _: &dyn Store, _: &StorageKey, max: Duration) {
        tokio::time::sleep(max).await
    }
}

/// The store of `target`, wrapped in [`Polling`] for [`Mode::Poll`].
async fn open(target: &Target, mode: Mode) -> Res<Arc<dyn Store>> {
    let (url, name) = (target.url.as_str(), target.name.as_str());
    let store: Arc<dyn Store> = match target.backend {
        #[cfg(feature = "redis")]
        Backend::Redis => Arc::new(
            idempotency::RedisStore::connect_with_prefix(url, name)
                .await
                .map_err(err)?,
        ),
        #[cfg(feature = "redis")]
        Backend::Cluster => {
            let options = idempotency::redis::RedisOptions::new().prefix(name);
            Arc::new(
                idempotency::RedisStore::connect_with(url, &options)
                    .await
                    .map_err(err)?,
            )
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => Arc::new(
            idempotency::PostgresStore::connect_with_table(url, name)
                .await
                .map_err(err)?,
        ),
        #[allow(unreachable_patterns)]
        other => return Err(format!("{} is not built in", other.label())),
    };
    Ok(match mode {
        Mode::Notify => store,
        Mode::Poll => Arc::new(Intercept::with_hooks(store, Polling)),
    })
}

fn key(id: &str) -> StorageKey {
    StorageKey::derive("bench.wakeup", id).expect("a short key")
}

/// Nanoseconds since the Unix epoch: comparable between the two processes of one machine.
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// One call on `key` that, if it must run its body (a holder), returns `value` after `body`.
async fn call(store: &Arc<dyn Store>, key: StorageKey, value: u64, body: Duration) -> Res<u64> {
    Call::new(key)
        .store(store.clone())
        .ttl(TTL)
        .on_conflict(OnConflict::Wait(WAIT))
        .run(ErrorPolicy::never(), async move {
            tokio::time::sleep(body).await;
            Ok::<u64, Error>(value)
        })
        .await
        .map_err(err)
}

/// Opens the connections and prepares the statements the rounds use (a pool grows to as many
/// connections as it gets concurrent calls), and starts the store's subscriber or listener,
/// so that both the timed rounds and the counted ones see a store in its steady state.
async fn warm_up(store: &Arc<dyn Store>, mode: Mode) -> Res<()> {
    let warm = key(&format!("warm-{:016x}", rand::random::<u64>()));
    call(store, warm.clone(), 1, Duration::ZERO).await?;
    let replays = (0..WAITERS).map(|_| call(store, warm.clone(), 2, Duration::ZERO));
    for replayed in futures::future::join_all(replays).await {
        if replayed? != 1 {
            return Err("the warm-up call was not replayed".into());
        }
    }
    let gets = (0..WAITERS).map(|_| store.get(&warm));
    for got in futures::future::join_all(gets).await {
        got.map_err(err)?;
    }
    if mode == Mode::Notify {
        // A key nobody holds: the wait starts the subscriber (listener), looks once, returns.
        let idle = key(&format!("idle-{:016x}", rand::random::<u64>()));
        store.wait_for_change(&idle, Duration::from_secs(5)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

async fn say(out: &mut (impl AsyncWrite + Unpin), line: &str) -> Res<()> {
    out.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(err)?;
    out.flush().await.map_err(err)
}

/// The waiters' side, `<binary> --wakeup-waiter <backend> <mode> <url> <name>`. Exits 1 on an
/// error (printed on stderr).
pub(crate) fn waiter_main(args: &[String]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(waiter_side(args)) {
        eprintln!("bench_report {WAITER_FLAG}: {e}");
        std::process::exit(1);
    }
}

async fn waiter_side(args: &[String]) -> Res<()> {
    let [backend, mode, url, name] = args else {
        return Err(format!(
            "usage: {WAITER_FLAG} <backend> <mode> <url> <name>"
        ));
    };
    let target = Target {
        backend: Backend::parse(backend)?,
        url: url.clone(),
        name: name.clone(),
    };
    let mode = Mode::parse(mode)?;
    let store = within(Duration::from_secs(20), open(&target, mode)).await?;
    within(Duration::from_secs(20), warm_up(&store, mode)).await?;
    let mut out = tokio::io::stdout();
    say(&mut out, "ready").await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(err)? {
        let mut words = line.split_whitespace();
        let (Some("round"), Some(id), Some(n)) = (words.next(), words.next(), words.next()) else {
            break;
        };
        let n: usize = n.parse().map_err(err)?;
        let key = key(id);
        // Each waiter's body, if it ever ran, would return 0: the holder's value is never 0.
        let waiters = (0..n).map(|_| async {
            let got = call(&store, key.clone(), 0, Duration::ZERO).await;
            (got, now_ns())
        });
        let answers = futures::future::join_all(waiters).await;
        tokio::time::sleep(SETTLE).await;
        let mut reply = String::from("done");
        for (got, at) in answers {
            match got {
                Ok(value) => write!(reply, " {value}@{at}"),
                Err(e) => {
                    eprintln!("bench_report {WAITER_FLAG}: a waiter failed: {e}");
                    write!(reply, " E@{at}")
                }
            }
            .map_err(err)?;
        }
        say(&mut out, &reply).await?;
    }
    Ok(())
}

/// What the waiters of a store in one mode saw, and what the server counted.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Wake-up latencies, ms: a waiter's return less the holder's.
    pub(crate) latencies: Vec<f64>,
    /// A waiter's return less the end of the holder's body (before its result was stored),
    /// ms: an upper bound, which a late-scheduled holder cannot make smaller.
    pub(crate) from_body: Vec<f64>,
    /// Each round's median latency, ms.
    pub(crate) round_medians: Vec<f64>,
    /// Waiters that returned another value than the holder's, or an error.
    pub(crate) wrong: usize,
    /// What the server counted, if the run was counted.
    pub(crate) counts: Counts,
}

/// One run: a waiter process for `target` in `mode`, a holder here, [`ROUNDS`] rounds of
/// `waiters` waiters; counted by `counter`, if given, around the rounds or, for a counter that
/// reads only closed connections, around both processes.
pub(crate) async fn run(
    target: &Target,
    mode: Mode,
    waiters: usize,
    mut counter: Option<&mut Counter>,
) -> Res<Outcome> {
    let around_processes = counter.as_ref().is_some_and(|c| c.around_processes());
    let mut begun = None;
    if let (Some(counter), true) = (counter.as_mut(), around_processes) {
        begun = Some(counter.begin().await?);
    }
    let exe = std::env::current_exe().map_err(err)?;
    let mut child = Command::new(exe)
        .arg(WAITER_FLAG)
        .args([target.backend.arg(), mode.arg(), &target.url, &target.name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not start the waiter process: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();

    // The holder never waits, so it needs no wrapping.
    let holder = within(Duration::from_secs(20), open(target, Mode::Notify)).await?;
    let warm = key(&format!("warm-{:016x}", rand::random::<u64>()));
    call(&holder, warm, 1, Duration::ZERO).await?;
    let ready = within(Duration::from_secs(45), next_line(&mut lines)).await?;
    if ready != "ready" {
        return Err(format!("the waiter process said {ready:?}"));
    }
    if let (Some(counter), false) = (counter.as_mut(), around_processes) {
        begun = Some(counter.begin().await?);
    }
    let mut outcome = Outcome::default();
    let run_id = format!("{:016x}", rand::random::<u64>());
    for round in 0..ROUNDS {
        let id = format!("{run_id}-{round}");
        let value = rand::random::<u64>() | 1;
        let (started, holding) = tokio::sync::oneshot::channel();
        let body_end = std::cell::Cell::new(0i128);
        let body_end_at = &body_end;
        let hold = async {
            let store = holder.clone();
            let stored = Call::new(key(&id))
                .store(store)
                .ttl(TTL)
                .run(ErrorPolicy::never(), async move {
                    let _ = started.send(());
                    tokio::time::sleep(BODY).await;
                    body_end_at.set(now_ns());
                    Ok::<u64, Error>(value)
                })
                .await;
            let at = now_ns();
            stored
                .map(|_| at)
                .map_err(|e| format!("the holder's call failed: {e}"))
        };
        let wait = async {
            holding.await.map_err(|_| "the holder's body did not run")?;
            say(&mut stdin, &format!("round {id} {waiters}")).await?;
            within(WAIT + Duration::from_secs(5), next_line(&mut lines)).await
        };
        let (completed, done) = tokio::join!(hold, wait);
        let (completed, done) = (completed?, done?);
        let answers = done.strip_prefix("done").ok_or("no answer")?;
        let mut this_round = Vec::with_capacity(waiters);
        for answer in answers.split_whitespace() {
            let (value_seen, at) = answer.split_once('@').ok_or("a bad answer")?;
            let at: i128 = at.parse().map_err(err)?;
            this_round.push((at - completed) as f64 / 1e6);
            outcome.from_body.push((at - body_end.get()) as f64 / 1e6);
            if value_seen.parse::<u64>() != Ok(value) {
                outcome.wrong += 1;
            }
        }
        if !this_round.is_empty() {
            outcome.round_medians.push(quantile(&mut this_round, 0.5));
        }
        outcome.latencies.extend(this_round);
    }
    if !around_processes {
        if let (Some(counter), Some(begun)) = (counter.as_mut(), begun.take()) {
            outcome.counts = counter.end(begun).await?;
        }
    }
    say(&mut stdin, "quit").await?;
    drop(stdin);
    let status = within(Duration::from_secs(10), async {
        child.wait().await.map_err(err)
    })
    .await?;
    if !status.success() {
        return Err(format!("the waiter process ended with {status}"));
    }
    drop(holder);
    if let (Some(counter), Some(begun)) = (counter, begun) {
        outcome.counts = counter.end(begun).await?;
    }
    Ok(outcome)
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Res<String> {
    lines
        .next_line()
        .await
        .map_err(err)?
        .ok_or_else(|| "the waiter process ended".to_owned())
}

/// The `q` quantile of `v` (sorted here), nearest rank.
pub(crate) fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(f64::NAN)
}
