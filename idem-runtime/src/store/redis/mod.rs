//! `RedisStore`: records shared by many processes and machines through Redis.
//!
//! # Data layout
//!
//! Each storage key (64 hex digits, see [`crate::key`]) owns two Redis keys that share one hash
//! tag, so they live in the same Redis Cluster slot and one Lua script may touch both:
//!
//! | key | type | fields | expires |
//! |---|---|---|---|
//! | `{prefix}:{<hex>}` — the record | hash | `state` (`in_flight` or `completed`), `token` (decimal), `fp` (the raw 32 fingerprint bytes; absent = no fingerprint), `lease_until` (in flight only: the end of the lease, server time in Unix milliseconds, decimal), `claimed_at` (when the key was claimed, server time in Unix milliseconds, decimal; for operators), `record` (the encoded [`crate::record::Record`], completed only), `s:<name>` (the record of the call's step `name`, in flight only; see [`Store::save_step`](crate::store::Store::save_step)), `steps` (`1` once the call saved a step, in flight only) | `PX` = the lease plus [`ABANDONED_CLAIM_RETENTION`] while in flight, `PX` = the ttl once completed |
//! | `{prefix}:{<hex>}:fence` — the fence | hash | `last` (the last token handed out for this key), `open` (`1` while a claim is neither completed nor released) | `PX` = the record's own expiry plus [`FENCE_GRACE`] |
//!
//! (`{prefix}` stands for the prefix as given, `idem` by default; the braces around `<hex>` are
//! literal and form the hash tag.) The user's key never appears in Redis: only its SHA-256.
//!
//! A call's steps live in its record's hash, so they share its expiry, its deletion (`release`,
//! `forget`) and its cluster slot, with no key of their own. A takeover keeps them (the claim
//! script rewrites the claim's fields in place rather than replacing the hash), `complete`
//! drops them (it finds them by the `steps` marker, read with the fields it reads anyway, so a
//! call without steps pays nothing), and a claim of an absent key starts without any.
//!
//! # Atomicity and round trips
//!
//! `claim`, `complete`, `release`, `renew`, `save_step` and `load_steps` are each one Lua script
//! (`EVALSHA`, loaded with `SCRIPT LOAD` only when the server answers `NOSCRIPT`, e.g. after a
//! restart), so each is one atomic step and one round trip. `get` is one `HGETALL`. A replayed call therefore costs one
//! round trip, a first call two (claim, complete).
//!
//! For operators, `forget` is one script too: it deletes the record (a completed one, or one in
//! flight if forced) and keeps the fence, so no later claim of the key gets a token it handed out
//! before, and a forgotten holder stays fenced off. `scan` walks the keyspace with `SCAN ...
//! MATCH <prefix>:{<64 characters>}` (record keys only, not fences), on every master of a
//! cluster in turn, and reads each record it finds with one script (`HGETALL`, `PTTL` and
//! `TIME` at one instant). Records written before `claimed_at` existed are listed without it.
//!
//! # Expiry
//!
//! All times come from the Redis server: leases end at `lease_until`, which the scripts set and
//! compare with `TIME`, records expire by `PEXPIRE`, and fencing tokens are derived from `TIME`.
//! No client clock is involved, so clients with skewed clocks agree.
//!
//! A lease that ended does not end the claim. The claim script takes an in-flight record over
//! once `TIME` has reached its `lease_until`; until some claim does, the record stays, and its
//! holder's `complete`, `renew` (a new `lease_until`) and `release` still work. So an in-flight
//! record is kept `PX` = lease + [`ABANDONED_CLAIM_RETENTION`]: Redis deletes it once it has been
//! abandoned that long. A completed record is kept `PX` = its ttl. Redis deletes expired records
//! itself, so [`Store::purge_expired`](crate::store::Store::purge_expired) has nothing to do and returns 0.
//!
//! In-flight records written by idem before `lease_until` existed carry `PX` = the lease and no
//! `lease_until`: the claim script treats them as live until Redis deletes them at the end of
//! their lease, as those versions did, and a `renew` gives them a `lease_until`. (Processes of
//! such versions, in turn, see a claim of this version as in flight until its `PX` runs out:
//! during a rolling upgrade, a takeover of a crashed claim needs a process of this version.)
//!
//! # Fencing tokens
//!
//! A new claim gets `token = max(last + 1, now_us)`, where `now_us` is the server's `TIME` in
//! microseconds and `last` is the fence's last token. So tokens are
//!
//! - strictly increasing per key, across takeovers and across the record expiring, being
//!   released or deleted: the fence outlives every record of its key (it is given the record's
//!   expiry plus [`FENCE_GRACE`] whenever the record's expiry is set), even if the server's clock
//!   steps back;
//! - increasing across different keys claimed one after another, as long as the server's clock
//!   does not step back (a per-key counter alone would restart at 1 for every key). Only the
//!   per-key order matters for fencing; the cross-key order is a convenience for logs.
//!
//! Once a key has been idle for longer than [`FENCE_GRACE`] after its last record expired, its
//! fence is gone and its next token is `now_us` again, which is still larger unless the server's
//! clock went back by more than that grace in between.
//!
//! The fence's `open` flag tells a takeover (the previous claim's lease ran out) from a fresh
//! claim after a release or a ttl expiry, as the `takeover` flag of [`Claim::Acquired`](crate::store::Claim::Acquired) reports.
//!
//! # Bad data
//!
//! A record hash that idem did not write (no `state`, an unknown state, a token or `lease_until`
//! that is not a number, a fingerprint that is not 32 bytes, a completed record without its
//! bytes) is [`Error::Corrupt`] from `claim` and `get`; nothing panics and the body is not run.
//! A key of another Redis type is an [`Error::Store`] (Redis answers `WRONGTYPE`). Remove the
//! key to recover.
//!
//! # Connections
//!
//! One [`ConnectionManager`]: a multiplexed connection shared by all clones of the store, which
//! reconnects by itself when the connection drops or Redis restarts. Unless the URL chooses a
//! protocol (`?protocol=resp2`), the store speaks RESP3, so that a dropped connection is noticed
//! and replaced at once, even while the store is idle; servers without RESP3 (before Redis 6)
//! are reached over RESP2. Each (re)connection is one attempt, without backoff: while the server
//! is down, calls fail at once with [`Error::Store`] (the body does not run), and a call whose
//! connection was refused is retried once on a fresh connection (refused means it was never
//! sent), so the first call after the server is back succeeds. A command cut off by a dropped
//! connection is not retried, since it may have run: it is an [`Error::Store`], and the next
//! call uses the new connection. Commands time out after [`RESPONSE_TIMEOUT`].
//!
//! # Redis Cluster
//!
//! [`RedisStore::connect_cluster`] (or a `redis+cluster://host:port,host:port` URL) talks to a
//! Redis Cluster through the `redis` crate's async cluster client. Each script touches one
//! record and its fence, which share a hash tag and so a slot: it runs on that slot's master,
//! in one round trip (a hit is one `EVALSHA`, a miss two), and redirections (`MOVED`, `ASK`)
//! and topology changes after a failover are followed by the client. `SCRIPT LOAD` after a
//! `NOSCRIPT` goes to every master. Replication is asynchronous: a claim acknowledged by a
//! master that dies before its replica received it is lost with it (see RELIABILITY.md).
//!
//! # Running Redis for idem
//!
//! - Redis 5 or later (scripts that call `TIME` before writing need effect replication, the
//!   default since Redis 5).
//! - Redis must not evict idem's keys: an evicted in-flight record lets a second caller run the
//!   body, an evicted result runs it again (records carry a TTL, so even the `volatile-*`
//!   policies evict them). [`RedisStore::connect`] reads every node's `maxmemory-policy`
//!   (`CONFIG GET`, or `INFO memory` where `CONFIG` is blocked) and refuses anything but
//!   `noeviction` with [`Error::Config`], unless [`RedisOptions::allow_eviction`] says records
//!   may be lost. The policy is checked again while the store runs, at most once per
//!   [`RedisOptions::eviction_check_interval`] (10 s by default; one `CONFIG GET` per interval
//!   and store, sent by the claim that finds the last check too old): once a node's policy may
//!   evict, new claims fail with the same [`Error::Config`] until it is `noeviction` again.
//!   Under `noeviction` a full Redis refuses writes: a claim then fails at once
//!   with [`Error::StoreFull`] (the body does not run), and a result that cannot be stored is
//!   returned to its caller at once and stored in the background once there is room.
//! - Records live as long as the server's data: without persistence (AOF or RDB) a restart
//!   forgets every stored result, and the next call of each key runs its body again. Fencing
//!   tokens still increase after such a restart, as they follow the server's clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, Value};

/// The `redis` crate this store is built on, for building a [`ConnectionManager`] of the
/// matching version to hand to [`RedisStore::from_manager`].
#[doc(no_inline)]
pub use ::redis;

use super::ABANDONED_CLAIM_RETENTION;
use crate::error::{Error, Result};
use crate::key::StorageKey;

mod connection;
mod eviction;
mod notify;
mod options;
mod protocol;
mod reply;
mod scan;
mod tls;
use connection::{Connection, Endpoint};
use eviction::EvictionWatch;
use notify::Notifier;
use options::take_flag;
pub use options::RedisOptions;

/// The key prefix [`RedisStore::connect`] uses.
pub const DEFAULT_PREFIX: &str = "idem";

/// How long a key's fence outlives its record (see the [module docs](self#fencing-tokens)).
pub const FENCE_GRACE: Duration = Duration::from_secs(3600);

/// How long the store waits for Redis to answer one command before failing with
/// [`Error::Store`].
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a store checks Redis's `maxmemory-policy` again while it runs, by default (see
/// [`RedisOptions::eviction_check_interval`]).
pub const DEFAULT_EVICTION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The longest expiry given to Redis (100 years); longer leases and ttls are cut to it.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;

const BACKEND: &str = "redis";

/// What the fence's key adds to its record's key.
const FENCE_SUFFIX: &str = ":fence";

/// KEYS: record, fence. ARGV: fingerprint (raw bytes, empty = none), lease ms, record ms (the
/// lease plus the retention), fence ms. Returns `{'acquired', token, takeover}`,
/// `{'completed', record}`, `{'in_flight'}`, `{'reuse'}` or `{'corrupt', reason}`.
///
/// An in-flight record whose `lease_until` has passed is taken over, whatever its fingerprint,
/// keeping the call's steps; one without `lease_until` (written before it existed) is live
/// until its `PX` removes it.
const CLAIM: &str = include_str!("claim.lua");

/// KEYS: record, fence. ARGV: token, record bytes, ttl ms, fence ms, the publish command.
/// Drops the call's steps. Returns 1, or 0 if the key is not in flight under the token (its
/// lease may have ended).
const COMPLETE: &str = include_str!("complete.lua");

/// KEYS: record, fence. ARGV: token. Returns 1, or 0 if the key is not in flight under the
/// token (its lease may have ended).
const RELEASE: &str = include_str!("release.lua");

/// KEYS: record, fence. ARGV: token, lease ms, record ms, fence ms. Returns 1, or 0 if the key
/// is not in flight under the token (its lease may have ended: it then gets a new one).
const RENEW: &str = include_str!("renew.lua");

/// KEYS: record, fence (unused, passed as by every script). ARGV: token, step name, step record.
/// Sets the step's `s:<name>` field and the `steps` marker. Returns 1, or 0 if the key is not in
/// flight under the token (its lease may have ended).
const SAVE_STEP: &str = include_str!("save_step.lua");

/// KEYS: record, fence (unused). ARGV: token. Returns the steps as a flat array (name, record,
/// name, record...), or 0 if the key is not in flight under the token.
const LOAD_STEPS: &str = include_str!("load_steps.lua");

/// KEYS: record, fence. ARGV: force (`1` or empty), the publish command. Deletes a completed
/// record, or an in-flight one if forced, keeping the fence. Returns `{'absent'}`,
/// `{'refused', token}` (in flight, not forced), `{state, token}` of the record it deleted, or
/// `{'corrupt', reason}`.
const FORGET: &str = include_str!("forget.lua");

/// KEYS: record. Returns `{HGETALL, PTTL, server time in ms}`, read at one instant.
const INSPECT: &str = include_str!("inspect.lua");

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    renew: Script,
    save_step: Script,
    load_steps: Script,
    forget: Script,
    inspect: Script,
}

/// A store in Redis, shared by every process that connects to the same server and prefix.
///
/// Cloning gives another handle to the same connection and records. See the
/// [module docs](self) for the data layout, fencing tokens and expiry.
///
/// ```no_run
/// # use idem_runtime as idempotency;
/// # async fn f() -> idempotency::Result<()> {
/// use idempotency::RedisStore;
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// idempotency::install(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    con: Connection,
    /// Wakes waiters when a key they wait for changes (`None` on a connection the user built:
    /// its waiters poll).
    notifier: Option<Arc<Notifier>>,
    /// The command the scripts publish changes with (`""`: none).
    publish: &'static str,
    /// `WAIT replicas timeout` after claims and completions ([`RedisOptions::wait_for_replicas`]).
    wait_for_replicas: Option<(u32, Duration)>,
    /// Checks the eviction policy again while the store runs
    /// ([`RedisOptions::eviction_check_interval`]; `None`: eviction allowed, not checked, or a
    /// connection the user built).
    eviction: Option<Arc<EvictionWatch>>,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn store_error(e: impl Into<crate::error::BoxError>) -> Error {
    Error::store(BACKEND, e)
}

fn redis_error(e: RedisError) -> Error {
    // `OOM command not allowed when used memory > 'maxmemory'`, also from inside a script.
    let oom = e.code() == Some("OOM")
        || e.detail()
            .is_some_and(|d| d.contains("OOM command not allowed"));
    if oom {
        return Error::StoreFull {
            backend: BACKEND,
            source: Box::new(e),
        };
    }
    store_error(e)
}

/// `d` in whole milliseconds, rounded up (so a lease of 0.5 ms is not 0) and cut to
/// [`MAX_MILLIS`].
fn millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).min(MAX_MILLIS)
}

/// The fence's expiry for a record that expires in `ms`.
fn fence_millis(ms: u64) -> u64 {
    ms + millis(FENCE_GRACE)
}

/// The expiry of an in-flight record with a lease of `lease_ms`: it is kept for
/// [`ABANDONED_CLAIM_RETENTION`] after its lease, so that its holder can still complete it.
fn in_flight_millis(lease_ms: u64) -> u64 {
    lease_ms + millis(ABANDONED_CLAIM_RETENTION)
}

impl RedisStore {
    /// Connects to the Redis server at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` for TLS where the `redis` crate was built with TLS), with the key prefix
    /// [`DEFAULT_PREFIX`]. A `redis+cluster://host:port,host:port,...` URL connects to a Redis
    /// Cluster (see [`connect_cluster`](Self::connect_cluster)). `?allow_eviction=true` in the
    /// URL is [`RedisOptions::allow_eviction`].
    ///
    /// Refuses ([`Error::Config`]) a server whose `maxmemory-policy` may evict idem's keys.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &RedisOptions::default()).await
    }

    /// [`connect`](Self::connect), keeping records under `prefix` (see the
    /// [module docs](self#data-layout)). Stores with different prefixes never share records.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self> {
        Self::connect_with(url, &RedisOptions::default().prefix(prefix)).await
    }

    /// [`connect`](Self::connect) with `options`.
    pub async fn connect_with(url: &str, options: &RedisOptions) -> Result<Self> {
        let (url, allow_eviction) = take_flag(url, "allow_eviction");
        let options = &RedisOptions {
            allow_eviction: options.allow_eviction || allow_eviction,
            ..options.clone()
        };
        if let Some(nodes) = connection::cluster_nodes(&url) {
            return Self::connect_cluster_with(&nodes, options).await;
        }
        check_prefix(&options.prefix)?;
        let (con, endpoint) = connection::single(&url, options, RESPONSE_TIMEOUT).await?;
        Self::checked(con, Some(endpoint), options).await
    }

    /// Connects to a Redis Cluster through any of its `nodes` (`redis://host:port` URLs; the
    /// client discovers the rest), with the key prefix [`DEFAULT_PREFIX`]. Every record and its
    /// fence share one hash slot, so each script runs on one node, in one round trip;
    /// redirections (`MOVED`, `ASK`) and failovers are followed by the `redis` crate's cluster
    /// client. `idempotency::connect("redis+cluster://h1:p1,h2:p2,...")` does the same.
    pub async fn connect_cluster(nodes: &[impl AsRef<str>]) -> Result<Self> {
        Self::connect_cluster_with(nodes, &RedisOptions::default()).await
    }

    /// [`connect_cluster`](Self::connect_cluster) with `options`.
    pub async fn connect_cluster_with(
        nodes: &[impl AsRef<str>],
        options: &RedisOptions,
    ) -> Result<Self> {
        check_prefix(&options.prefix)?;
        if nodes.is_empty() {
            return Err(Error::config(
                "a Redis Cluster needs at least one node URL to connect through",
            ));
        }
        let nodes: Vec<String> = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
        let (con, endpoint) = connection::cluster(&nodes, options, RESPONSE_TIMEOUT).await?;
        Self::checked(con, Some(endpoint), options).await
    }

    /// The store on `con`, once every node's `maxmemory-policy` is known not to evict (unless
    /// the options allow it).
    async fn checked(
        con: Connection,
        endpoint: Option<Endpoint>,
        options: &RedisOptions,
    ) -> Result<Self> {
        if !options.allow_eviction {
            let policies = connection::eviction_policies(&con)
                .await
                .map_err(redis_error)?;
            if let Some((node, policy)) = eviction::first_evicting(&policies) {
                return Err(eviction::evicting_policy(node, policy));
            }
        }
        let mut store = Self::with_connection(con, endpoint, &options.prefix);
        store.wait_for_replicas = options.wait_for_replicas;
        if !options.allow_eviction {
            store.eviction = Some(Arc::new(EvictionWatch::new(
                options.eviction_check_interval,
            )));
        }
        Ok(store)
    }

    /// A store on a connection you configured yourself (timeouts, retries, TLS), keeping records
    /// under `prefix`. Prefer RESP3 (`?protocol=resp3`): with it the manager replaces a dropped
    /// connection at once instead of on the next failed command.
    pub fn from_manager(con: ConnectionManager, prefix: &str) -> Result<Self> {
        check_prefix(prefix)?;
        Ok(Self::with_connection(Connection::Single(con), None, prefix))
    }

    fn with_connection(con: Connection, endpoint: Option<Endpoint>, prefix: &str) -> Self {
        RedisStore {
            con,
            publish: notify::publish_command(endpoint.as_ref()),
            notifier: endpoint.map(|e| Arc::new(Notifier::new(e))),
            wait_for_replicas: None,
            eviction: None,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts {
                claim: Script::new(CLAIM),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
                save_step: Script::new(SAVE_STEP),
                load_steps: Script::new(LOAD_STEPS),
                forget: Script::new(FORGET),
                inspect: Script::new(INSPECT),
            }),
        }
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.con, Connection::Cluster(_))
    }

    /// The key prefix of this store's records.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store's connection, for sending other commands on it (it is multiplexed: cloning is
    /// cheap and shares the one connection; on a cluster, each command goes to the node of its
    /// first key).
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.con.clone())
    }

    /// The Redis key of the record hash of `key`: `{prefix}:{<hex>}`. For inspection and
    /// operations; its fence is this key followed by `:fence`.
    pub fn record_key(&self, key: &StorageKey) -> String {
        let mut record = String::with_capacity(self.prefix.len() + key.as_str().len() + 3);
        self.push_record_key(&mut record, key);
        record
    }

    /// Appends the record key of `key` to `out` (see [`record_key`](Self::record_key)).
    fn push_record_key(&self, out: &mut String, key: &StorageKey) {
        out.push_str(&self.prefix);
        out.push_str(":{");
        out.push_str(key.as_str());
        out.push('}');
    }

    /// `EVALSHA <script> 2 <record> <fence>` for `key`, with room for `args` more arguments of
    /// `arg_bytes` bytes in all: written straight into the command's buffer (the `redis` crate's
    /// `ScriptInvocation` copies every key and argument into a vector of its own first, then
    /// into the command).
    fn script_cmd(&self, script: &Script, key: &StorageKey, args: usize, arg_bytes: usize) -> Cmd {
        let (hash, hex) = (script.get_hash(), key.as_str());
        let record = KeyArg {
            prefix: &self.prefix,
            hex,
            suffix: "",
        };
        let fence = KeyArg {
            suffix: FENCE_SUFFIX,
            ..record
        };
        let bytes = 7 + hash.len() + 1 + record.len() + fence.len() + arg_bytes;
        let mut cmd = Cmd::with_capacity(5 + args, bytes);
        cmd.arg("EVALSHA").arg(hash).arg(2).arg(record).arg(fence);
        cmd
    }

    /// Runs a script's `EVALSHA` (`cmd`), retrying once if the connection was refused: then the
    /// command was never sent, and the manager has just started a new connection attempt, which
    /// succeeds if the server is back (e.g. after a restart). A server that does not know the
    /// script (`NOSCRIPT`: restarted, or flushed) is sent it (`SCRIPT LOAD`, to every master of
    /// a cluster), and the command again.
    async fn eval(&self, script: &Script, cmd: &Cmd) -> Result<Value> {
        let mut con = self.con.clone();
        match cmd.query_async(&mut con).await {
            Ok(reply) => Ok(reply),
            // Boxed: rare steps, kept out of the state of every call's future.
            Err(e) => Box::pin(self.eval_again(script, cmd, con, e)).await,
        }
        .map_err(redis_error)
    }

    /// [`eval`](Self::eval) after its first attempt failed with `error`.
    async fn eval_again(
        &self,
        script: &Script,
        cmd: &Cmd,
        mut con: Connection,
        error: RedisError,
    ) -> redis::RedisResult<Value> {
        let no_script = |e: &RedisError| e.kind() == ErrorKind::Server(ServerErrorKind::NoScript);
        let loaded_and_sent = |mut con: Connection| async move {
            script.load_async(&mut con).await?;
            cmd.query_async(&mut con).await
        };
        if no_script(&error) {
            return match loaded_and_sent(con.clone()).await {
                Err(e) if e.is_connection_refusal() => loaded_and_sent(con).await,
                reply => reply,
            };
        }
        if !error.is_connection_refusal() {
            return Err(error);
        }
        match cmd.query_async(&mut con).await {
            Err(e) if no_script(&e) => loaded_and_sent(con).await,
            reply => reply,
        }
    }

    /// `Ok` if a claim may go on: no evicting `maxmemory-policy` seen by the last check of the
    /// store's [`EvictionWatch`], which this call makes first if one is due (at most once per
    /// [`RedisOptions::eviction_check_interval`], by one caller).
    async fn check_eviction(&self) -> Result<()> {
        match &self.eviction {
            Some(watch) => watch.check(&self.con).await,
            None => Ok(()),
        }
    }

    /// Whether the last write on `key`'s master reached the replicas the options ask for
    /// (always, without [`RedisOptions::wait_for_replicas`]): `Err` says how many did.
    async fn replicated(&self, key: &StorageKey) -> Result<(), String> {
        let Some((replicas, timeout)) = self.wait_for_replicas else {
            return Ok(());
        };
        match connection::wait_replicas(&self.con, &self.record_key(key), replicas, timeout).await {
            Ok(acked) if acked >= u64::from(replicas) => Ok(()),
            Ok(acked) => Err(format!(
                "{acked} of {replicas} replicas acknowledged the write within {timeout:?}"
            )),
            Err(e) => Err(format!("WAIT failed: {e}")),
        }
    }

    /// Runs a check-and-change script that answers 1 (done) or 0 (the token does not hold the
    /// key, which is [`Error::LeaseLost`]): `cmd` is its `EVALSHA` from
    /// [`script_cmd`](Self::script_cmd), its arguments after the token added.
    async fn held(&self, script: &Script, key: &StorageKey, cmd: &Cmd) -> Result<()> {
        match self.eval(script, cmd).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(Error::lease_lost(key)),
            other => Err(store_error(format!(
                "unexpected reply from a store script: {other:?}"
            ))),
        }
    }
}

/// A record's key (`{prefix}:{<hex>}`), or its fence's (with [`FENCE_SUFFIX`]), written as a
/// command's argument without a `String` of its own.
#[derive(Clone, Copy)]
struct KeyArg<'a> {
    prefix: &'a str,
    hex: &'a str,
    suffix: &'static str,
}

impl KeyArg<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.hex.len() + self.suffix.len() + 3
    }
}

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        for part in [self.prefix, ":{", self.hex, "}", self.suffix] {
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(Error::config(format!(
            "Redis key prefix `{prefix}` must be non-empty and free of `{{` and `}}`"
        )));
    }
    Ok(())
}

/// A [`RedisStore`]'s connection to its server or cluster: send commands with
/// `redis::cmd(..).query_async(&mut con)` as on any `redis` async connection.
#[derive(Clone)]
pub struct RedisConnection(Connection);

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up_and_are_capped() {
        assert_eq!(millis(Duration::ZERO), 0);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(300)), 300);
        assert_eq!(millis(Duration::from_micros(300_001)), 301);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
        assert_eq!(fence_millis(300), 300 + 3_600_000);
        assert_eq!(in_flight_millis(300), 300 + 86_400_000);
    }

    /// Stores on the test server and cluster (`IDEM_REDIS_URL`, `IDEM_REDIS_CLUSTER_URL`, with
    /// the defaults of `idem-support`); one that cannot be reached is a failure under
    /// `IDEM_REQUIRE_SERVICES=1`, else a printed skip.
    async fn test_stores() -> Vec<RedisStore> {
        let required = std::env::var("IDEM_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        let mut stores = Vec::new();
        for (var, default) in [
            ("IDEM_REDIS_URL", "redis://127.0.0.1:6379"),
            (
                "IDEM_REDIS_CLUSTER_URL",
                "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
            ),
        ] {
            let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
            let options = RedisOptions::new().allow_eviction(true);
            match RedisStore::connect_with(&url, &options).await {
                Ok(store) => stores.push(store),
                Err(e) if required => panic!("{url} ({var}) is required but unavailable: {e}"),
                Err(e) => eprintln!("SKIPPED: {url} ({var}) unavailable: {e}"),
            }
        }
        stores
    }

    #[tokio::test]
    async fn a_script_the_server_does_not_know_is_loaded_and_sent_again() {
        for store in test_stores().await {
            // A script no server has seen: its first EVALSHA answers NOSCRIPT.
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let script = Script::new(&format!(
                "return {{KEYS[1], KEYS[2], ARGV[1], '{nonce}-{}'}}",
                std::process::id()
            ));
            let key = StorageKey::from_hex(&"ab".repeat(32)).unwrap();
            let mut cmd = store.script_cmd(&script, &key, 1, 2);
            cmd.arg(7u64);
            for _ in 0..2 {
                let reply = store.eval(&script, &cmd).await.unwrap();
                let record = store.record_key(&key);
                let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
                assert_eq!(
                    reply,
                    Value::Array(vec![
                        bulk(&record),
                        bulk(&format!("{record}:fence")),
                        bulk("7"),
                        bulk(&format!("{nonce}-{}", std::process::id())),
                    ]),
                    "{}",
                    store.is_cluster()
                );
            }
        }
    }

    /// A key no other test (or run) uses.
    fn fresh_key() -> StorageKey {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        StorageKey::from_hex(&format!("{nanos:032x}{pid:016x}{n:016x}")).unwrap()
    }

    /// The record hash of `key`, field by field.
    async fn fields(store: &RedisStore, key: &StorageKey) -> Vec<(String, Vec<u8>)> {
        let mut fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(store.record_key(key))
            .query_async(&mut store.connection())
            .await
            .unwrap();
        fields.sort();
        fields
    }

    fn names(fields: &[(String, Vec<u8>)]) -> Vec<&str> {
        fields.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The layout of a call's steps: `s:<name>` fields and the `steps` marker in the record's
    /// own hash; a renewal of zero ends the lease now and keeps the hash for the retention; a
    /// takeover keeps the steps and drops a fingerprint the new claim lacks; the completion
    /// drops every step (more than one `HDEL` slice of them) and the marker.
    #[tokio::test]
    async fn steps_live_in_the_record_hash_until_the_completion() {
        use crate::fingerprint::Fingerprint;
        use crate::store::{Claim, FencingToken, Store};
        const STEPS: usize = 1_200;
        for store in test_stores().await {
            let cluster = store.is_cluster();
            let key = fresh_key();
            let record_key = store.record_key(&key);
            let lease = Duration::from_secs(60);
            let Claim::Acquired { token, .. } = store
                .claim(&key, Some(&Fingerprint([3; 32])), lease)
                .await
                .unwrap()
            else {
                panic!("a fresh key is acquired");
            };
            store.save_step(&key, token, "a", b"\x00one").await.unwrap();
            for i in 0..STEPS {
                let name = format!("n{i}");
                store.save_step(&key, token, &name, b"r").await.unwrap();
            }
            let hash = fields(&store, &key).await;
            assert!(
                hash.contains(&("s:a".into(), b"\x00one".to_vec())),
                "{cluster}"
            );
            assert!(hash.contains(&("steps".into(), b"1".to_vec())), "{cluster}");
            assert_eq!(hash.len(), 5 + 2 + STEPS, "{:?}", &names(&hash)[..8]);

            // A renewal of zero: the lease ends now, the hash stays for the retention.
            store.renew(&key, token, Duration::ZERO).await.unwrap();
            let mut con = store.connection();
            let (lease_until, pttl): (u64, i64) = redis::pipe()
                .cmd("HGET")
                .arg(&record_key)
                .arg("lease_until")
                .cmd("PTTL")
                .arg(&record_key)
                .query_async(&mut con)
                .await
                .unwrap();
            let (secs, micros): (u64, u64) =
                redis::cmd("TIME").query_async(&mut con).await.unwrap();
            let now_ms = secs * 1000 + micros / 1000;
            assert!(
                lease_until <= now_ms && lease_until + 5_000 > now_ms,
                "{lease_until} vs {now_ms}"
            );
            let retention = millis(ABANDONED_CLAIM_RETENTION) as i64;
            assert!(
                pttl <= retention && pttl > retention - 5_000,
                "{pttl} vs {retention}"
            );

            // A takeover without a fingerprint: the steps stay, the old fingerprint goes.
            let taken = loop {
                match store.claim(&key, None, lease).await.unwrap() {
                    Claim::Acquired { token, takeover } => {
                        assert!(takeover);
                        break token;
                    }
                    Claim::InFlight => tokio::time::sleep(Duration::from_millis(5)).await,
                    other => panic!("{other:?}"),
                }
            };
            assert!(taken > token);
            let hash = fields(&store, &key).await;
            assert!(!names(&hash).contains(&"fp"), "{cluster}");
            assert!(hash.contains(&("token".into(), taken.0.to_string().into_bytes())));
            assert_eq!(
                store.load_steps(&key, taken).await.unwrap().len(),
                STEPS + 1
            );
            assert!(matches!(
                store.load_steps(&key, FencingToken(token.0)).await,
                Err(Error::LeaseLost { .. })
            ));

            // The completion leaves the result alone.
            store.complete(&key, taken, b"result", lease).await.unwrap();
            let hash = fields(&store, &key).await;
            assert_eq!(
                names(&hash),
                ["claimed_at", "record", "state", "token"],
                "{cluster}"
            );
            let stored = store.get(&key).await.unwrap().unwrap();
            assert_eq!(stored.fingerprint, None);

            let _: () = redis::cmd("DEL")
                .arg(&record_key)
                .arg(format!("{record_key}{FENCE_SUFFIX}"))
                .query_async(&mut store.connection())
                .await
                .unwrap();
        }
    }

    #[test]
    fn prefixes_keep_the_hash_tag_intact() {
        assert!(check_prefix("idem").is_ok());
        assert!(check_prefix("app:idem-v1").is_ok());
        for bad in ["", "a{b", "}", "{x}"] {
            assert!(
                matches!(check_prefix(bad), Err(Error::Config { .. })),
                "{bad:?}"
            );
        }
    }
}
