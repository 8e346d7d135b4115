//! The `Store` trait: one record per storage key, moved through the claim state machine.
//!
//! ```text
//!                                     ┌── claim after lease_until (takeover) ──┐
//!                                     ▼                                        │
//! absent ──claim──▶ in_flight{token, lease_until} ─────────────────────────────┘
//!   ▲  ▲                    │  │
//!   │  │                    │  └──complete(token)──▶ completed{record, expires_at}
//!   │  └────────────────────┘ release(token), or purge once abandoned  │
//!   └─────────────────────────── ttl expired ──────────────────────────┘
//! ```
//!
//! A lease is the time a holder has before *another caller may take over* (a takeover replaces
//! the record with one of a newer token), not the life of its claim: a holder whose lease ran out
//! can still `complete`, `renew` or `release` as long as nobody took over, so a result is never
//! lost while nobody else took over. A claim is abandoned once its lease ended more than
//! [`ABANDONED_CLAIM_RETENTION`] ago, and only then deleted without a takeover.
//!
//! A store is the atomic protocol only: `claim`, `complete`, `release`, `renew`, `get`,
//! `purge_expired`, a call's steps (`save_step`, `load_steps`), an operator's `forget` and `scan`, and a change notification for waiters (`wait_for_change`). Runtimes,
//! spawning, retries and policy belong to the engine, which holds the store as an
//! `Arc<dyn Store>` (see [`IntoStore`]). Every backend passes the same conformance suite, which
//! the `idem-testkit` crate publishes for other people's stores. Stores treat the record bytes
//! as opaque.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
mod inspect;
pub mod local;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
pub(crate) mod steps_blob;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod tls_provider;
mod url;

pub use inspect::{Forgotten, RecordSummary, ScanPage};
pub use url::{is_secret as is_secret_url_param, redact as redact_url, StoreUrl};

/// How long an in-flight record is kept after its lease ended, when nobody took it over.
///
/// A lease only says how long the holder has before another caller may take the key over
/// ([`Store::claim`] reports `takeover: true`); it does not end the holder's claim. Until a
/// takeover, the holder may still [`complete`](Store::complete) (its result lands),
/// [`renew`](Store::renew) (a new lease from now) or [`release`](Store::release), however late,
/// and [`Store::get`] reports the record as in flight. So a body that overran its lease, or a
/// process that stalled, loses nothing unless someone else really took over.
///
/// A claim whose lease ended more than this long ago is taken to be abandoned (its process is
/// gone): [`Store::purge_expired`] deletes it (the Redis store lets the server expire it, at the
/// same moment), after which it counts as absent, also for its holder. Until then it is only a
/// row (or hash) that costs storage.
pub const ABANDONED_CLAIM_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The longest a waiting call sleeps between two claims on a store that
/// [notifies changes](Store::notifies_changes): the bound on the delay a lost notification
/// causes (and on noticing a holder's lease end, which nobody announces).
pub const WAIT_SAFETY_NET: Duration = Duration::from_millis(500);

/// A fencing token: strictly increasing across the claims of a store, so a holder whose lease
/// was taken over can be told apart from the newer holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// What [`Store::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key and must run the body, then `complete` or `release`.
    Acquired {
        /// The caller's fencing token.
        token: FencingToken,
        /// Whether this claim took over an expired lease of another holder (crash recovery).
        takeover: bool,
    },
    /// A completed record with a matching fingerprint: replay it.
    Completed(Bytes),
    /// Another holder's lease is live.
    InFlight,
    /// A live record (in flight or completed) has a different fingerprint.
    KeyReuse,
}

impl Claim {
    /// What a claim finds on a live record (a result within its ttl, or a claim within its
    /// lease), the rule every backend applies: [`Claim::KeyReuse`] if the stored and the given
    /// fingerprints differ (a missing one matches any), else [`Claim::Completed`] with the
    /// record bytes, or [`Claim::InFlight`] while the record has none.
    pub fn on_live_record(
        stored: Option<&Fingerprint>,
        given: Option<&Fingerprint>,
        completed: Option<Bytes>,
    ) -> Claim {
        let reused = matches!((stored, given), (Some(a), Some(b)) if a != b);
        match (reused, completed) {
            (true, _) => Claim::KeyReuse,
            (false, Some(record)) => Claim::Completed(record),
            (false, None) => Claim::InFlight,
        }
    }
}

/// The state of a stored record, as [`Store::get`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Claimed, body running, or its holder gone: also after the lease expired, until another
    /// claim takes the key over or the record is purged (see [`ABANDONED_CLAIM_RETENTION`]).
    InFlight {
        /// The holder's token.
        token: FencingToken,
    },
    /// Completed, record bytes kept until the ttl runs out.
    Completed {
        /// The token of the claim that completed it.
        token: FencingToken,
        /// The encoded [`crate::record::Record`].
        record: Bytes,
    },
}

/// A stored record, as [`Store::get`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The fingerprint stored with the claim, if any.
    pub fingerprint: Option<Fingerprint>,
    /// In flight or completed.
    pub state: RecordState,
}

/// A backend that keeps idempotency records: the state machine of design section 3.
///
/// Every method is one atomic step against the backend. Expiry is measured on the store's own
/// clock where it has one. Fingerprints match when either side is `None` or both are equal.
#[async_trait]
pub trait Store: Send + Sync {
    /// A short name for errors and logs: `"memory"`, `"sqlite"`, `"redis"`, `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Whether records outlive the process (and so the build) that wrote them. Durable stores
    /// refuse `#[idempotent]` functions without a stable `name = "..."`: a name taken from the
    /// function's path would change when the function moves, and a live key would run its body
    /// again after the deploy. Default `true`; the memory store says `false`.
    fn durable(&self) -> bool {
        true
    }

    /// Atomically: if no live record exists (none, an in-flight record whose lease expired, or a
    /// completed record past its ttl), create an in-flight record with a new token and a lease of
    /// `lease`; else report what is there.
    ///
    /// Replacing an in-flight record whose lease expired is a takeover (`takeover: true`): its
    /// old token is fenced off from then on. Such a record never counts as key reuse, whatever
    /// its fingerprint. A live in-flight record is [`Claim::InFlight`], or [`Claim::KeyReuse`]
    /// for another fingerprint.
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim>;

    /// Stores `record` as the completed result, kept for `ttl`, if the key is in flight under
    /// exactly `token`, whether or not its lease has expired (nobody took over, so the result
    /// is still this claim's to store). Fails with [`crate::Error::LeaseLost`] and changes
    /// nothing if another token holds the key, the record is completed, or it is absent
    /// (released, purged, or never claimed).
    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()>;

    /// Deletes the in-flight record if it is in flight under exactly `token` (lease expired or
    /// not), so the next call runs at once; else fails with [`crate::Error::LeaseLost`] and
    /// changes nothing, as for [`complete`](Store::complete).
    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()>;

    /// Sets the lease to end `lease` from now if the key is in flight under exactly `token`,
    /// whether or not its lease has expired (an expired one is simply re-established, and the
    /// key is [`Claim::InFlight`] to others again); else fails with [`crate::Error::LeaseLost`]
    /// and changes nothing, as for [`complete`](Store::complete).
    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()>;

    /// The record under `key`, if any: a completed record within its ttl, or an in-flight one,
    /// including one whose lease expired but that nobody took over (it still exists, and its
    /// holder may still complete it). `None` for no record, a completed record past its ttl,
    /// and a claim abandoned for longer than [`ABANDONED_CLAIM_RETENTION`].
    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>>;

    /// Removes expired records and returns how many it removed: completed records past their
    /// ttl, and in-flight records whose lease ended more than [`ABANDONED_CLAIM_RETENTION`]
    /// ago. An in-flight record whose lease ended more recently stays, so its holder can still
    /// complete it. Stores whose server expires records itself (Redis) return 0.
    async fn purge_expired(&self) -> Result<u64>;

    /// Removes at most about `limit` expired records (as [`purge_expired`](Store::purge_expired)
    /// defines them) and returns how many it removed: one bounded step of a background purger,
    /// short enough not to hold locks or a connection for long. Fewer than `limit` means none
    /// are left for now. The default removes them all at once with `purge_expired`.
    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        let _ = limit;
        self.purge_expired().await
    }

    /// Removes the record under `key`, so the next claim runs the body again, and wakes the
    /// key's waiters.
    ///
    /// A completed record (a stored result, or an unknown outcome) is removed. An in-flight
    /// record (its lease live, or ended and not taken over) is refused with
    /// [`Error::InFlight`] unless `force` is set; a forced removal fences its holder off: the
    /// holder's `complete`, `renew` and `release` fail with [`Error::LeaseLost`] from then on,
    /// also after another caller claimed the key again (tokens are never handed out twice).
    /// No record: [`Forgotten::Absent`].
    ///
    /// The default refuses with [`Error::Config`]: a store written before this method existed
    /// cannot forget. Every built-in store implements it.
    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let _ = (key, force);
        Err(Error::config(format!(
            "the {} store cannot forget records (it does not implement Store::forget)",
            self.backend()
        )))
    }

    /// Lists up to about `limit` records from `cursor` (`None` for the first page): the
    /// records [`get`](Store::get) would return (completed within their ttl, in flight
    /// including claims whose lease ended), in no particular order. A record changed during a
    /// listing may be reported twice or not at all; one that exists throughout is reported.
    ///
    /// For operators (`idem in-flight`, `idem stats`), not for calls: it reads the whole store.
    /// The default refuses with [`Error::Config`]; every built-in store implements it.
    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let _ = (cursor, limit);
        Err(Error::config(format!(
            "the {} store cannot list its records (it does not implement Store::scan)",
            self.backend()
        )))
    }

    /// Whether this store keeps the steps of a call ([`save_step`](Store::save_step) and
    /// [`load_steps`](Store::load_steps)): a step on a store that cannot fails before it runs.
    /// Default `false`, for stores written before steps existed; every built-in store says
    /// `true`.
    fn keeps_steps(&self) -> bool {
        false
    }

    /// Records the completed step `name` of the call in flight under exactly `token` (its lease
    /// perhaps ended, but nobody took over), replacing a step of the same name: the engine's
    /// durable steps (`idempotency::step`). `record` is opaque, like a result.
    ///
    /// A call's steps belong to its record and share its life:
    ///
    /// - a claim that **takes over** an in-flight record (`takeover: true`) keeps its steps, so
    ///   the new holder can [load](Store::load_steps) them; any other claim that acquires the
    ///   key (none there, or a completed record past its ttl) starts with none;
    /// - [`renew`](Store::renew) keeps them (also a renewal of zero, which ends the lease now
    ///   so that the next claim takes over and resumes);
    /// - [`complete`](Store::complete) drops them (the result replaces them), and
    ///   [`release`](Store::release), [`forget`](Store::forget) and the purge of an abandoned
    ///   claim delete them with the record.
    ///
    /// Fails with [`Error::LeaseLost`] and changes nothing if another token holds the key, the
    /// record is completed, or it is absent, as for [`complete`](Store::complete): a holder
    /// that lost its lease cannot record a step. One round trip.
    ///
    /// The default refuses with [`Error::Config`]: a store written before steps existed cannot
    /// keep them (a call's `step` then fails before running, rather than run unrecorded).
    /// Every built-in store implements it.
    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        let _ = (key, token, name, record);
        Err(Error::config(format!(
            "the {} store cannot keep the steps of a call (it does not implement Store::save_step)",
            self.backend()
        )))
    }

    /// The steps recorded for the call in flight under exactly `token` (see
    /// [`save_step`](Store::save_step)), as `(name, record)` pairs in no particular order, one
    /// per name. Fails with [`Error::LeaseLost`] if `token` does not hold the key, as
    /// [`save_step`](Store::save_step) does. One round trip; the engine asks only after a
    /// takeover (a claim that did not take over starts with no steps).
    ///
    /// The default returns none, which is right for a store that cannot
    /// [save](Store::save_step) them.
    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        let _ = (key, token);
        Ok(Vec::new())
    }

    /// Whether [`wait_for_change`](Store::wait_for_change) returns as soon as the record under
    /// the key changes, from any process (Redis pub/sub, PostgreSQL `LISTEN`, an in-process
    /// store). Waiting calls then sleep up to [`WAIT_SAFETY_NET`] between claims instead of
    /// polling with short pauses. Default `false`.
    fn notifies_changes(&self) -> bool {
        false
    }

    /// Waits until the record under `key` may have changed, or `max` has passed. Used by
    /// `on_conflict = "wait"` between claims. The default sleeps `max`; stores that can be told
    /// of changes return sooner.
    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        tokio::time::sleep(max).await
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Store + ?Sized> Store for $ty {
            fn backend(&self) -> &'static str {
                (**self).backend()
            }
            fn durable(&self) -> bool {
                (**self).durable()
            }
            fn notifies_changes(&self) -> bool {
                (**self).notifies_changes()
            }
            fn keeps_steps(&self) -> bool {
                (**self).keeps_steps()
            }
            async fn claim(&self, key: &StorageKey, fingerprint: Option<&Fingerprint>, lease: Duration) -> Result<Claim> {
                (**self).claim(key, fingerprint, lease).await
            }
            async fn complete(&self, key: &StorageKey, token: FencingToken, record: &[u8], ttl: Duration) -> Result<()> {
                (**self).complete(key, token, record, ttl).await
            }
            async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
                (**self).release(key, token).await
            }
            async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
                (**self).renew(key, token, lease).await
            }
            async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
                (**self).get(key).await
            }
            async fn purge_expired(&self) -> Result<u64> {
                (**self).purge_expired().await
            }
            async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
                (**self).purge_expired_up_to(limit).await
            }
            async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
                (**self).forget(key, force).await
            }
            async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
                (**self).scan(cursor, limit).await
            }
            async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
                (**self).wait_for_change(key, max).await
            }
            async fn save_step(&self, key: &StorageKey, token: FencingToken, name: &str, record: &[u8]) -> Result<()> {
                (**self).save_step(key, token, name, record).await
            }
            async fn load_steps(&self, key: &StorageKey, token: FencingToken) -> Result<Vec<(String, Bytes)>> {
                (**self).load_steps(key, token).await
            }
        }
    )*};
}
forward_store!(Arc<S>, Box<S>);

/// What `Call::store` (and `store = EXPR` of the attribute) accepts: a reference to a store
/// that is cheap to clone (every built-in store is a handle to shared state), an `Arc` of any
/// store (`Arc<S>` or `Arc<dyn Store>`), or a built-in store by value. A call keeps the store as
/// an `Arc<dyn Store>`, so the work that outlives its caller (renewal, storing a result after
/// the caller left) can hold it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a store a call can hold",
    label = "expected `&S` with `S: Store + Clone`, an `Arc` of a store, or a built-in store",
    note = "a call keeps its store so that work outliving the caller can use it: pass an `Arc` of the store, or derive `Clone` for a handle-like store and pass a reference"
)]
pub trait IntoStore {
    /// The store, shared.
    fn into_store(self) -> Arc<dyn Store>;
}

impl<S: Store + Clone + 'static> IntoStore for &S {
    fn into_store(self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

impl<S: Store + 'static> IntoStore for Arc<S> {
    fn into_store(self) -> Arc<dyn Store> {
        self
    }
}

impl IntoStore for Arc<dyn Store> {
    fn into_store(self) -> Arc<dyn Store> {
        self
    }
}

macro_rules! built_in_into_store {
    ($($(#[$cfg:meta])* $ty:ty),*) => {$(
        $(#[$cfg])*
        impl IntoStore for $ty {
            fn into_store(self) -> Arc<dyn Store> {
                Arc::new(self)
            }
        }
    )*};
}
built_in_into_store!(
    memory::MemoryStore,
    local::LocalCache,
    #[cfg(feature = "sqlite")]
    sqlite::SqliteStore,
    #[cfg(feature = "redis")]
    redis::RedisStore,
    #[cfg(feature = "postgres")]
    postgres::PostgresStore,
    #[cfg(feature = "dynamodb")]
    dynamodb::DynamoDbStore
);

/// The bytes idem writes for a completed call whose `Ok` value is the JSON `payload` of a type
/// named `type_name`, stored under `token`, with a fixed fingerprint (`[1; 32]`): for the tests
/// of a store, which must keep record bytes exactly as given (a call replays them). What the
/// bytes hold is idem's business, not a store's: a store never reads them.
pub fn completed_record(token: FencingToken, payload: &str, type_name: &str) -> Vec<u8> {
    crate::record::Record {
        outcome: crate::record::Outcome::Ok,
        fingerprint: Some(Fingerprint([1; 32])),
        token: token.0,
        completed_at_ms: 0,
        ttl_ms: 60_000,
        type_name,
        operation: "",
        result_version: 0,
        payload: payload.as_bytes(),
    }
    .encode()
}

static DEFAULT_STORE: RwLock<Option<Arc<dyn Store>>> = RwLock::new(None);

/// Sets the process-wide store used by `#[idempotent]` functions without a `store = ...`
/// argument, and returns the one it replaces. Call it once at start-up, before the first call.
pub fn install(store: impl IntoStore) -> Option<Arc<dyn Store>> {
    let store = store.into_store();
    let mut slot = DEFAULT_STORE.write().unwrap_or_else(|p| p.into_inner());
    slot.replace(store)
}

/// The process-wide store: the one given to [`install`], else an in-memory store created on
/// first use.
///
/// The in-memory fallback deduplicates within this process only. In a build that enables a
/// durable store's feature (`sqlite`, `redis`, `postgres`), its first use logs one warning
/// (target `idem`) saying so and what to do: a service that meant to share records across
/// processes and forgot to [`install`] its store would otherwise run every body once per
/// process, silently.
pub fn default_store() -> Arc<dyn Store> {
    if let Some(s) = DEFAULT_STORE
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        return s.clone();
    }
    let mut slot = DEFAULT_STORE.write().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| {
        if cfg!(any(
            feature = "sqlite",
            feature = "redis",
            feature = "postgres",
            feature = "dynamodb"
        )) {
            tracing::warn!(target: "idem",
                "no store installed: using a memory store, which deduplicates calls within this process only; call idempotency::install(store) at start-up (e.g. with idempotency::connect(\"redis://...\")), or give the function `store = ...`");
        }
        Arc::new(memory::MemoryStore::new())
    })
    .clone()
}

/// Opens a store from a URL, for configuration by environment variable (`IDEM_STORE`):
///
/// - `memory`: a [`MemoryStore`](memory::MemoryStore), inside this process only;
/// - `sqlite:PATH`, `sqlite://PATH` (`PATH` relative or absolute), `sqlite:///abs/path`, or
///   `sqlite::memory:` (feature `sqlite`); the path is percent-decoded, and the query may hold
///   only `mode=rwc` (the default: the file is created if missing) or `mode=rw` (it must
///   exist, checked just before opening). `mode=ro` and any other parameter are refused;
/// - `redis://...`, `rediss://...` (TLS), `redis+unix:///path/to/redis.sock` or
///   `unix:///path/to/redis.sock`, `redis+cluster://host:port,host:port,...` or
///   `rediss+cluster://...` (feature `redis`; see `RedisStore::connect`);
/// - `postgres://...`, `postgresql://...`, or a `key=value` connection string such as
///   `host=127.0.0.1 user=app dbname=app` (feature `postgres`; see `PostgresStore::connect`);
/// - `dynamodb://TABLE?region=...&endpoint=...` (feature `dynamodb`; see
///   `DynamoDbStore::connect`).
///
/// [`StoreUrl`] reads a URL the same way without opening it. An empty URL, an unknown scheme,
/// a scheme whose feature this build lacks, and a SQLite URL it cannot honour are
/// [`crate::Error::Config`] (not retryable), saying what is accepted; the URL in the message
/// has its credentials hidden.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    let Some(target) = StoreUrl::parse(url)? else {
        return Err(url::not_a_store(url));
    };
    match target {
        StoreUrl::Memory => Ok(Arc::new(memory::MemoryStore::new())),
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite { path, create } => {
            if !create && !path.is_file() {
                return Err(Error::config(format!(
                    "no SQLite database at `{}` (store URL `{}`): `mode=rw` opens only an existing file",
                    path.display(),
                    url::redact(url)
                )));
            }
            Ok(Arc::new(sqlite::SqliteStore::open(path).await?))
        }
        #[cfg(feature = "redis")]
        StoreUrl::Redis => Ok(Arc::new(redis::RedisStore::connect(url).await?)),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres => Ok(Arc::new(postgres::PostgresStore::connect(url).await?)),
        #[cfg(feature = "dynamodb")]
        StoreUrl::DynamoDb => Ok(Arc::new(dynamodb::DynamoDbStore::connect(url).await?)),
        #[allow(unreachable_patterns)]
        other => Err(Error::config(format!(
            "store URL `{}` needs the `{}` feature of idempotency, which this build lacks",
            url::redact(url),
            other.feature().unwrap_or("?"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_is_a_configuration_error_not_retryable() {
        let err = connect("mysql://localhost").await.err().expect("refused");
        assert!(matches!(err, crate::Error::Config { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("mysql://localhost"), "{err}");
    }
}
