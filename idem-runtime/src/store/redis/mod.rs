//! `RedisStore`: records shared by many processes and machines through Redis.
//!
//! # Data layout
//!
//! Each storage key (64 hex digits, see [`crate::key`]) owns two Redis keys that share one hash
//! tag, so they live in the same Redis Cluster slot and one Lua script may touch both:
//!
//! | key | type | fields | expires |
//! |---|---|---|---|
//! | `{prefix}:{<hex>}` — the record | hash | `state` (`in_flight` or `completed`), `token` (decimal), `fp` (the raw 32 fingerprint bytes; absent = no fingerprint), `lease_until` (in flight only: the end of the lease, server time in Unix milliseconds, decimal), `record` (the encoded [`crate::record::Record`], completed only) | `PX` = the lease plus [`ABANDONED_CLAIM_RETENTION`] while in flight, `PX` = the ttl once completed |
//! | `{prefix}:{<hex>}:fence` — the fence | hash | `last` (the last token handed out for this key), `open` (`1` while a claim is neither completed nor released) | `PX` = the record's own expiry plus [`FENCE_GRACE`] |
//!
//! (`{prefix}` stands for the prefix as given, `idem` by default; the braces around `<hex>` are
//! literal and form the hash tag.) The user's key never appears in Redis: only its SHA-256.
//!
//! # Atomicity and round trips
//!
//! `claim`, `complete`, `release` and `renew` are each one Lua script (`EVALSHA`, loaded with
//! `SCRIPT LOAD` only when the server answers `NOSCRIPT`, e.g. after a restart), so each is one
//! atomic step and one round trip. `get` is one `HGETALL`. A replayed call therefore costs one
//! round trip, a first call two (claim, complete).
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
//! itself, so [`Store::purge_expired`] has nothing to do and returns 0.
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
//! claim after a release or a ttl expiry, as the `takeover` flag of [`Claim::Acquired`] reports.
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
//! The key layout is ready for Redis Cluster (each script touches a single slot), but
//! [`RedisStore`] itself talks to a single server (or a proxy in front of a cluster).
//!
//! # Running Redis for idem
//!
//! - Redis 5 or later (scripts that call `TIME` before writing need effect replication, the
//!   default since Redis 5).
//! - Redis must not evict idem's keys: an evicted in-flight record lets a second caller run the
//!   body, an evicted result runs it again. Use `maxmemory-policy noeviction` (writes then fail
//!   with [`Error::Store`] when memory is full, and the body does not run) or leave room.
//! - Records live as long as the server's data: without persistence (AOF or RDB) a restart
//!   forgets every stored result, and the next call of each key runs its body again. Fencing
//!   tokens still increase after such a restart, as they follow the server's clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    Client, IntoConnectionInfo, ProtocolVersion, RedisError, Script, ScriptInvocation, Value,
};

/// The `redis` crate this store is built on, for building a [`ConnectionManager`] of the
/// matching version to hand to [`RedisStore::from_manager`].
#[doc(no_inline)]
pub use ::redis;

use super::{Claim, FencingToken, Store, StoredRecord, ABANDONED_CLAIM_RETENTION};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

mod reply;
use reply::{parse_claim, parse_record};

/// The key prefix [`RedisStore::connect`] uses.
pub const DEFAULT_PREFIX: &str = "idem";

/// How long a key's fence outlives its record (see the [module docs](self#fencing-tokens)).
pub const FENCE_GRACE: Duration = Duration::from_secs(3600);

/// How long the store waits for Redis to answer one command before failing with
/// [`Error::Store`].
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection attempt may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest expiry given to Redis (100 years); longer leases and ttls are cut to it.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;

const BACKEND: &str = "redis";

/// KEYS: record, fence. ARGV: fingerprint (raw bytes, empty = none), lease ms, record ms (the
/// lease plus the retention), fence ms. Returns `{'acquired', token, takeover}`,
/// `{'completed', record}`, `{'in_flight'}`, `{'reuse'}` or `{'corrupt', reason}`.
///
/// An in-flight record whose `lease_until` has passed is taken over, whatever its fingerprint;
/// one without `lease_until` (written before it existed) is live until its `PX` removes it.
const CLAIM: &str = include_str!("claim.lua");

/// KEYS: record, fence. ARGV: token, record bytes, ttl ms, fence ms. Returns 1, or 0 if the
/// key is not in flight under the token (its lease may have ended).
const COMPLETE: &str = include_str!("complete.lua");

/// KEYS: record, fence. ARGV: token. Returns 1, or 0 if the key is not in flight under the
/// token (its lease may have ended).
const RELEASE: &str = include_str!("release.lua");

/// KEYS: record, fence. ARGV: token, lease ms, record ms, fence ms. Returns 1, or 0 if the key
/// is not in flight under the token (its lease may have ended: it then gets a new one).
const RENEW: &str = include_str!("renew.lua");

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    renew: Script,
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
    con: ConnectionManager,
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
    /// [`DEFAULT_PREFIX`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_prefix(url, DEFAULT_PREFIX).await
    }

    /// Connects to the Redis server at `url`, keeping records under `prefix` (see the
    /// [module docs](self#data-layout)). Stores with different prefixes never share records.
    /// The prefix must be non-empty and must not contain `{` or `}`, which would change the
    /// keys' hash tag.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self> {
        check_prefix(prefix)?;
        let mut info = url.into_connection_info().map_err(redis_error)?;
        let chose_protocol = url.contains("protocol=");
        let with_protocol = |info: redis::ConnectionInfo, protocol| {
            let settings = info.redis_settings().clone().set_protocol(protocol);
            info.set_redis_settings(settings)
        };
        if !chose_protocol {
            info = with_protocol(info, ProtocolVersion::RESP3);
        }
        let con = match manager(info.clone()).await {
            Ok(con) => con,
            // A server that answers but refuses RESP3 (`HELLO`, before Redis 6): use RESP2.
            Err(e) if !chose_protocol && !e.is_io_error() => {
                manager(with_protocol(info, ProtocolVersion::RESP2))
                    .await
                    .map_err(redis_error)?
            }
            Err(e) => return Err(redis_error(e)),
        };
        Self::from_manager(con, prefix)
    }

    /// A store on a connection you configured yourself (timeouts, retries, TLS), keeping records
    /// under `prefix`. Prefer RESP3 (`?protocol=resp3`): with it the manager replaces a dropped
    /// connection at once instead of on the next failed command.
    pub fn from_manager(con: ConnectionManager, prefix: &str) -> Result<Self> {
        check_prefix(prefix)?;
        Ok(RedisStore {
            con,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts {
                claim: Script::new(CLAIM),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
            }),
        })
    }

    /// The key prefix of this store's records.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store's connection, for sending other commands on it (it is multiplexed: cloning is
    /// cheap and shares the one connection).
    pub fn connection_manager(&self) -> ConnectionManager {
        self.con.clone()
    }

    /// The Redis key of the record hash of `key`: `{prefix}:{<hex>}`. For inspection and
    /// operations; its fence is this key followed by `:fence`.
    pub fn record_key(&self, key: &StorageKey) -> String {
        format!("{}:{{{}}}", self.prefix, key.as_str())
    }

    /// Runs a script, retrying once if the connection was refused: then the command was never
    /// sent, and the manager has just started a new connection attempt, which succeeds if the
    /// server is back (e.g. after a restart).
    async fn eval(&self, invocation: &ScriptInvocation<'_>) -> Result<Value> {
        let mut con = self.con.clone();
        match invocation.invoke_async(&mut con).await {
            Err(e) if e.is_connection_refusal() => invocation.invoke_async(&mut con).await,
            reply => reply,
        }
        .map_err(redis_error)
    }

    fn keys(&self, key: &StorageKey) -> (String, String) {
        let record = self.record_key(key);
        let fence = format!("{record}:fence");
        (record, fence)
    }

    /// Runs a check-and-change script that answers 1 (done) or 0 (the token does not hold the
    /// key, which is [`Error::LeaseLost`]).
    async fn held(
        &self,
        script: &Script,
        key: &StorageKey,
        token: FencingToken,
        args: &[&[u8]],
    ) -> Result<()> {
        let (record, fence) = self.keys(key);
        let mut invocation = script.key(record);
        invocation.key(fence).arg(token.0);
        for a in args {
            invocation.arg(*a);
        }
        match self.eval(&invocation).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(Error::LeaseLost),
            other => Err(store_error(format!(
                "unexpected reply from a store script: {other:?}"
            ))),
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

async fn manager(info: redis::ConnectionInfo) -> Result<ConnectionManager, RedisError> {
    // One connection attempt per (re)connect, no backoff: the redis crate's backoff starts at a
    // second and would hold every call during an outage for seconds before it fails. Instead a
    // refused connection fails the call at once, and the store's single retry on refusal (see
    // `RedisStore::eval`) picks up a server that has come back.
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    Client::open(info)?
        .get_connection_manager_with_config(config)
        .await
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let (record, fence) = self.keys(key);
        let lease = millis(lease);
        let record_ms = in_flight_millis(lease);
        let fp: &[u8] = fingerprint.map_or(&[], |f| &f.0);
        let mut invocation = self.scripts.claim.key(record);
        invocation
            .key(fence)
            .arg(fp)
            .arg(lease)
            .arg(record_ms)
            .arg(fence_millis(record_ms));
        parse_claim(self.eval(&invocation).await?)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let ttl = millis(ttl);
        let (ttl_arg, fence_arg) = (ttl.to_string(), fence_millis(ttl).to_string());
        self.held(
            &self.scripts.complete,
            key,
            token,
            &[record, ttl_arg.as_bytes(), fence_arg.as_bytes()],
        )
        .await
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.held(&self.scripts.release, key, token, &[]).await
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let lease = millis(lease);
        let record_ms = in_flight_millis(lease);
        let (lease_arg, record_arg, fence_arg) = (
            lease.to_string(),
            record_ms.to_string(),
            fence_millis(record_ms).to_string(),
        );
        self.held(
            &self.scripts.renew,
            key,
            token,
            &[
                lease_arg.as_bytes(),
                record_arg.as_bytes(),
                fence_arg.as_bytes(),
            ],
        )
        .await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.record_key(key));
        let mut con = self.con.clone();
        // Retried once on a refused connection, as in `eval`.
        let reply = match cmd.query_async::<Value>(&mut con).await {
            Err(e) if e.is_connection_refusal() => cmd.query_async(&mut con).await,
            reply => reply,
        };
        parse_record(reply.map_err(redis_error)?)
    }

    /// Returns 0: Redis expires records itself (`PEXPIRE`: completed ones at the end of their
    /// ttl, in-flight ones [`ABANDONED_CLAIM_RETENTION`] after their lease), so nothing is left
    /// to purge.
    async fn purge_expired(&self) -> Result<u64> {
        Ok(0)
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
