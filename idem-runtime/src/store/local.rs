//! A local cache tier in front of any store: completed records kept in this process's memory,
//! so that a replay costs no round trip.
//!
//! ```
//! # use idem_runtime as idempotency;
//! # async fn demo() -> idempotency::Result<()> {
//! use idempotency::{LocalCache, MemoryStore};
//! // In front of Redis or PostgreSQL in a real service: `LocalCache::new(RedisStore::connect(url).await?)`.
//! let store = LocalCache::new(MemoryStore::new());
//! idempotency::install(store);
//! # Ok(()) }
//! ```
//!
//! What it keeps, and for how long:
//!
//! - only **completed** records (a stored result or a kept error) that this process claimed,
//!   found or wrote itself; never a claim in flight (every claim of a key not held here goes to
//!   the store, so at most once is the store's, exactly as without the tier) and never a record
//!   of an unknown outcome (an operator may resolve it at any time);
//! - an entry never outlives its record: it expires with the record's ttl (for a record read
//!   from the store, by the ttl and completion time written in it, on the writer's clock: a
//!   writer whose clock runs ahead of this process's lengthens it by that much, within the
//!   next bound);
//! - nor the **local bound**, [`LocalCacheBuilder::max_age`] (default
//!   [`DEFAULT_LOCAL_MAX_AGE`], 30 s): a record removed from the store by another process
//!   (`idem forget`, a purge) still replays here until its entry is that old. Forgetting
//!   through this store removes the entry at once;
//! - at most [`LocalCacheBuilder::max_entries`] entries (default 10 000), or, if set,
//!   [`LocalCacheBuilder::max_bytes`] of record bytes; the least useful are evicted first (moka's
//!   TinyLFU).
//!
//! A local hit is checked as a store hit is: the fingerprint of the call must match the
//! record's ([`Claim::KeyReuse`] otherwise), and the engine decodes and type-checks the record
//! as it would one read from the store. Everything but `claim`, `complete` and `forget` goes
//! straight to the store.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::record::{Outcome, Record};

use super::{Claim, FencingToken, Forgotten, IntoStore, ScanPage, Store, StoredRecord};

/// How long an entry of a [`LocalCache`] replays at most, by default: a record forgotten in
/// the store by another process stops replaying here within this.
pub const DEFAULT_LOCAL_MAX_AGE: Duration = Duration::from_secs(30);

/// How many entries a [`LocalCache`] keeps at most, by default.
pub const DEFAULT_LOCAL_MAX_ENTRIES: u64 = 10_000;

/// A store with a local cache tier in front of it: see the [module docs](self). Cheap to clone
/// (clones share the cache and the store).
#[derive(Clone)]
pub struct LocalCache {
    inner: Arc<dyn Store>,
    cache: moka::sync::Cache<StorageKey, Arc<Entry>>,
    max_age: Duration,
}

/// A completed record kept locally.
struct Entry {
    record: Bytes,
    fingerprint: Option<Fingerprint>,
    /// When it stops replaying here: its record's expiry or the local bound, the earlier.
    until: Instant,
}

/// Expires each entry at its own `until`.
struct UntilExpiry;

impl moka::Expiry<StorageKey, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &StorageKey,
        entry: &Arc<Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.until.saturating_duration_since(created_at))
    }
}

/// Configures a [`LocalCache`]: [`LocalCache::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `build(store)`"]
pub struct LocalCacheBuilder {
    max_entries: u64,
    max_bytes: Option<u64>,
    max_age: Duration,
}

impl Default for LocalCacheBuilder {
    fn default() -> Self {
        LocalCacheBuilder {
            max_entries: DEFAULT_LOCAL_MAX_ENTRIES,
            max_bytes: None,
            max_age: DEFAULT_LOCAL_MAX_AGE,
        }
    }
}

impl LocalCacheBuilder {
    /// Keeps at most this many records (default [`DEFAULT_LOCAL_MAX_ENTRIES`]); ignored once
    /// [`max_bytes`](Self::max_bytes) is set.
    pub fn max_entries(mut self, entries: u64) -> Self {
        self.max_entries = entries;
        self
    }

    /// Keeps at most this many bytes of records (each counted with its key), instead of a
    /// number of entries.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// The local bound: an entry replays for at most this long after it was cached, whatever
    /// its record's ttl (default [`DEFAULT_LOCAL_MAX_AGE`]). A record removed from the store by
    /// another process stops replaying here within it. `Duration::ZERO` keeps nothing.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The cache in front of `store`.
    pub fn build(self, store: impl IntoStore) -> LocalCache {
        let builder = moka::sync::Cache::builder().expire_after(UntilExpiry);
        let cache = match self.max_bytes {
            Some(bytes) => builder
                .weigher(|_: &StorageKey, e: &Arc<Entry>| {
                    u32::try_from(e.record.len() + std::mem::size_of::<StorageKey>())
                        .unwrap_or(u32::MAX)
                })
                .max_capacity(bytes)
                .build(),
            None => builder.max_capacity(self.max_entries).build(),
        };
        LocalCache {
            inner: store.into_store(),
            cache,
            max_age: self.max_age,
        }
    }
}

impl LocalCache {
    /// `store` with a local cache tier of the default bounds in front of it.
    pub fn new(store: impl IntoStore) -> Self {
        LocalCache::builder().build(store)
    }

    /// Configures the bounds: `LocalCache::builder().max_age(..).build(store)`.
    pub fn builder() -> LocalCacheBuilder {
        LocalCacheBuilder::default()
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// How many records are cached now (approximately: evictions run lazily).
    pub fn cached(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Keeps `record` for `key` if it is a completed result, until `record_until` (its
    /// record's expiry) or the local bound, the earlier.
    fn keep(&self, key: &StorageKey, record: Bytes, record_until: Option<Instant>) {
        if self.max_age.is_zero() {
            return;
        }
        let Ok(decoded) = Record::decode(&record) else {
            return;
        };
        if decoded.outcome == Outcome::Unknown {
            return;
        }
        let now = Instant::now();
        let record_until = record_until.unwrap_or_else(|| {
            let expires_ms = decoded.completed_at_ms.saturating_add(decoded.ttl_ms);
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now + Duration::from_millis(expires_ms.saturating_sub(now_ms))
        });
        let until = record_until.min(now + self.max_age);
        if until <= now {
            return;
        }
        let fingerprint = decoded.fingerprint;
        self.cache.insert(
            key.clone(),
            Arc::new(Entry {
                record,
                fingerprint,
                until,
            }),
        );
    }
}

#[async_trait]
impl Store for LocalCache {
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
    ) -> Result<Claim> {
        if let Some(entry) = self.cache.get(key) {
            if entry.until > Instant::now() {
                return Ok(Claim::on_live_record(
                    entry.fingerprint.as_ref(),
                    fingerprint,
                    Some(entry.record.clone()),
                ));
            }
        }
        let claim = self.inner.claim(key, fingerprint, lease).await?;
        if let Claim::Completed(record) = &claim {
            self.keep(key, record.clone(), None);
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let sent = Instant::now();
        self.inner.complete(key, token, record, ttl).await?;
        self.keep(key, Bytes::copy_from_slice(record), Some(sent + ttl));
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.inner.release(key, token).await
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        self.inner.renew(key, token, lease).await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        self.inner.get(key).await
    }

    async fn purge_expired(&self) -> Result<u64> {
        self.inner.purge_expired().await
    }

    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        self.inner.purge_expired_up_to(limit).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        self.cache.invalidate(key);
        let forgotten = self.inner.forget(key, force).await;
        // A replay cached while the store forgot is dropped too.
        self.cache.invalidate(key);
        forgotten
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        self.inner.scan(cursor, limit).await
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        self.inner.wait_for_change(key, max).await
    }

    fn keeps_steps(&self) -> bool {
        self.inner.keeps_steps()
    }

    /// A call's steps are never cached here: they belong to a call in flight.
    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        self.inner.save_step(key, token, name, record).await
    }

    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        self.inner.load_steps(key, token).await
    }
}
