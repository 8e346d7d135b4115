//! `MemoryStore`: the default store, for one process, tests and examples.
//!
//! - `slot`: one record and when it is live, exists, and is due;
//! - `expiry`: the index of when records are due, which removing expired ones walks;
//! - `capacity`: the limits, their builder and the accounting that enforces them;
//! - `scan`: listing the records a page at a time;
//! - `table`: the hash table's key, which keeps its hash so that growing the table stays cheap.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::Notify;
// tokio's clock, so tests with a paused runtime (`start_paused`) move expiry forward instantly.
use tokio::time::Instant;

#[cfg(doc)]
use super::ABANDONED_CLAIM_RETENTION;
use super::{Claim, FencingToken, Forgotten, ScanPage, Store, StoredRecord};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

mod capacity;
mod expiry;
mod scan;
mod slot;
mod table;

pub use capacity::{MemoryStoreBuilder, DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, ENTRY_OVERHEAD};

use capacity::{Full, Limits, Usage, ENTRY_BYTES};
use expiry::ExpiryIndex;
use slot::{Slot, SlotState};
use table::{KeyHasher, MapKey, Probe, StoredHash};

/// How many due records a claim removes on its way: more than one, so expired records drain
/// faster than new ones arrive, and few enough to cost a write next to nothing.
const SWEEP_PER_WRITE: usize = 4;

/// The fewest removals after which the store checks whether its hash table should shrink.
const SHRINK_CHECK_AFTER: usize = 4096;

/// An in-process store: a concurrent hash map, claim as one map-entry operation.
///
/// Cloning gives another handle to the same records. Records do not survive the process; for
/// several processes use the SQLite, Redis or PostgreSQL store.
///
/// # Bounded
///
/// The store holds at most [`max_records`](MemoryStoreBuilder::max_records) records taking at
/// most [`max_bytes`](MemoryStoreBuilder::max_bytes) bytes (each record counted as its 64-byte
/// key, its result and [`ENTRY_OVERHEAD`]); [`MemoryStore::new`] uses [`DEFAULT_MAX_RECORDS`]
/// and [`DEFAULT_MAX_BYTES`], so the default store cannot grow until the process dies. A claim
/// of a new key that would pass a limit first removes the expired records, then, if there is
/// still no room, fails closed with [`Error::StoreFull`]: the body does not run. A `complete`
/// whose result does not fit fails the same way (the engine returns the result to its caller
/// and keeps trying to store it in the background).
///
/// The store never evicts a live record to make room, the way an LRU cache (`moka`, `lru`)
/// would: a live claim or result evicted is a key whose next call runs its body again, the
/// double execution idempotency exists to prevent. A full store refuses new work instead.
///
/// # Expiry
///
/// Expiry is checked on every read: a completed record past its ttl counts as absent at once,
/// and an in-flight record whose lease ended may be taken over at once, but stays its holder's
/// (to complete, renew or release, and reported by [`Store::get`]) until then, or until
/// [`ABANDONED_CLAIM_RETENTION`] after its lease ended. Such records are removed without a
/// purge call or a task of the store's own: an index of deadlines hands out exactly the
/// records whose time has come, every claim of a new key removes a few of them (so they drain
/// faster than new keys arrive), and a write that finds the store full removes all of them.
/// [`Store::purge_expired`] removes them all at once. Once many records are gone, the hash
/// table shrinks, giving the memory back.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_limits(Limits::default())
    }
}

struct Inner {
    /// Keys are shared with the expiry index, so the index costs a pointer per entry, and keep
    /// their hash (foldhash, seeded per store: `key_hasher`), and records are boxed, so that the
    /// table's doubling moves 24-byte buckets and reads nothing else (`table`).
    records: DashMap<MapKey, Box<Slot>, StoredHash>,
    /// Hashes the keys of `records`, once per operation.
    key_hasher: KeyHasher,
    /// When each record is due for removal: exactly one entry per record with a deadline.
    expiries: ExpiryIndex,
    limits: Limits,
    usage: Usage,
    /// Records removed since the hash table was last checked for shrinking.
    removed_since_check: AtomicUsize,
    last_token: AtomicU64,
    changed: Notify,
    /// Callers inside `wait_for_change`: completions notify only when someone waits.
    waiters: AtomicUsize,
}

impl MemoryStore {
    /// An empty store with the default limits ([`DEFAULT_MAX_RECORDS`], [`DEFAULT_MAX_BYTES`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder for a store with limits of its own.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    fn with_limits(limits: Limits) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                records: DashMap::with_hasher(StoredHash::default()),
                key_hasher: KeyHasher::default(),
                expiries: ExpiryIndex::new(),
                limits,
                usage: Usage::default(),
                removed_since_check: AtomicUsize::new(0),
                last_token: AtomicU64::new(0),
                changed: Notify::new(),
                waiters: AtomicUsize::new(0),
            }),
        }
    }

    /// How many records (live or not yet removed) the store holds.
    pub fn len(&self) -> usize {
        self.inner.records.len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    /// The bytes the store's records take, as counted against
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes): per record its key, its result and
    /// [`ENTRY_OVERHEAD`].
    pub fn bytes(&self) -> usize {
        self.inner.usage.bytes()
    }

    /// The records the hash table has room for before it grows: it follows [`len`](Self::len)
    /// down once many records are removed.
    pub fn capacity(&self) -> usize {
        self.inner.records.capacity()
    }

    /// The store's record limit.
    pub fn max_records(&self) -> usize {
        self.inner.limits.max_records
    }

    /// The store's byte limit.
    pub fn max_bytes(&self) -> usize {
        self.inner.limits.max_bytes
    }

    fn next_token(&self) -> u64 {
        self.inner.last_token.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn notify_change(&self) {
        if self.inner.waiters.load(Ordering::Acquire) > 0 {
            self.inner.changed.notify_waiters();
        }
    }

    fn full(&self, full: Full) -> Error {
        full.error(&self.inner.limits, &self.inner.usage)
    }

    /// `key` with its hash, to look it up in the table.
    fn probe<'k>(&self, key: &'k StorageKey) -> Probe<'k> {
        self.inner.key_hasher.probe(key)
    }

    /// Accounts for a record taken out of the map (its index entry is removed here too).
    fn removed(&self, key: &StorageKey, slot: &Slot) {
        self.inner.expiries.remove(key, slot.token, slot.due);
        self.inner.usage.release(1, ENTRY_BYTES + slot.record_len());
    }

    /// Removes up to `limit` due records (`all`: from every shard of the index; else from the
    /// next shard in turn) and returns how many it removed. Holds no lock of the map while it
    /// holds one of the index.
    fn sweep(&self, now: Instant, limit: usize, all: bool) -> u64 {
        let due = if all {
            self.inner.expiries.take_due(now, limit)
        } else {
            self.inner.expiries.take_some_due(now, limit)
        };
        let mut removed = 0u64;
        for d in due {
            // The entry was the record's own deadline when taken; a record changed since has a
            // new one in the index, and stays.
            let probe = self.probe(&d.key);
            let gone = self.inner.records.remove_if(probe.lookup(), |_, slot| {
                slot.token == d.token && slot.due == Some(d.at) && !slot.exists(now)
            });
            if let Some((_, slot)) = gone {
                self.inner.usage.release(1, ENTRY_BYTES + slot.record_len());
                removed += 1;
            }
        }
        if removed > 0 {
            self.after_removals(removed as usize);
        }
        removed
    }

    /// Gives memory back once many records are gone: shrinks the hash table when it is
    /// mostly empty. Checked only every [`SHRINK_CHECK_AFTER`] removals (or as many as the
    /// store holds), so the check costs nothing per call.
    fn after_removals(&self, n: usize) {
        let removed = self
            .inner
            .removed_since_check
            .fetch_add(n, Ordering::AcqRel)
            + n;
        let len = self.inner.records.len();
        if removed < SHRINK_CHECK_AFTER.max(len) {
            return;
        }
        self.inner.removed_since_check.store(0, Ordering::Release);
        if self.inner.records.capacity() > 4 * len.max(SHRINK_CHECK_AFTER / 4) {
            self.inner.records.shrink_to_fit();
        }
    }

    /// One attempt at a claim; `Err(full)` when a new record does not fit.
    fn try_claim(
        &self,
        key: &Probe<'_>,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
        now: Instant,
    ) -> std::result::Result<Claim, Full> {
        let (inner, limits) = (&self.inner, &self.inner.limits);
        match inner.records.entry(MapKey::new(key)) {
            Entry::Vacant(e) => {
                inner.usage.reserve(limits, 1, ENTRY_BYTES)?;
                let token = self.next_token();
                let slot = Slot::in_flight(fingerprint, token, now + lease);
                inner.expiries.insert(e.key().key(), token, slot.due);
                e.insert(Box::new(slot));
                Ok(Claim::Acquired {
                    token: FencingToken(token),
                    takeover: false,
                })
            }
            Entry::Occupied(mut e) => {
                let old = e.get();
                if old.is_live(now) {
                    // Another caller got here between our look and the entry lock.
                    return Ok(old.live_claim(fingerprint));
                }
                let takeover = old.in_flight_now();
                inner.expiries.remove(e.key().key(), old.token, old.due);
                // A takeover keeps the call's steps (their bytes stay accounted for); anything
                // else starts afresh.
                let steps = e.get_mut().take_steps();
                inner.usage.release(0, e.get().record_len());
                let token = self.next_token();
                let mut slot = Slot::in_flight(fingerprint, token, now + lease);
                slot.put_steps(steps);
                inner.expiries.insert(e.key().key(), token, slot.due);
                **e.get_mut() = slot;
                Ok(Claim::Acquired {
                    token: FencingToken(token),
                    takeover,
                })
            }
        }
    }

    /// One attempt at a completion: `Ok(Err(full))` when the result does not fit.
    fn try_complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &Bytes,
        expires_at: Instant,
    ) -> Result<std::result::Result<(), Full>> {
        let inner = &self.inner;
        self.with_held(key, token, |key, slot| {
            inner.usage.reserve(&inner.limits, 0, record.len())?;
            // The result replaces the call's steps.
            inner.usage.release(0, slot.record_len());
            inner.expiries.remove(key, slot.token, slot.due);
            slot.state = SlotState::Completed {
                expires_at,
                record: record.clone(),
            };
            slot.due = Some(expires_at);
            inner.expiries.insert(key, slot.token, slot.due);
            Ok(())
        })
    }

    /// One attempt at saving a step: `Ok(Err(full))` when it does not fit.
    fn try_save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<std::result::Result<(), Full>> {
        let inner = &self.inner;
        self.with_held(key, token, |_, slot| {
            inner
                .usage
                .reserve(&inner.limits, 0, slot::step_len(name, record))?;
            let mut steps = slot.take_steps().unwrap_or_default();
            let record = Bytes::copy_from_slice(record);
            match steps.iter_mut().find(|(n, _)| &**n == name) {
                Some((_, old)) => {
                    inner.usage.release(0, slot::step_len(name, old));
                    *old = record;
                }
                None => steps.push((name.into(), record)),
            }
            slot.put_steps(Some(steps));
            Ok(())
        })
    }

    /// Applies `f` to the slot of `key` if it is in flight under `token`, lease expired or not
    /// (but not abandoned).
    fn with_held<T>(
        &self,
        key: &StorageKey,
        token: FencingToken,
        f: impl FnOnce(&Arc<StorageKey>, &mut Slot) -> T,
    ) -> Result<T> {
        let now = Instant::now();
        let probe = self.probe(key);
        let Some(mut entry) = self.inner.records.get_mut(probe.lookup()) else {
            return Err(Error::lease_lost(key));
        };
        let held = entry.token == token.0 && entry.in_flight_now() && entry.exists(now);
        if !held {
            return Err(Error::lease_lost(key));
        }
        let (key, slot) = entry.pair_mut();
        Ok(f(key.key(), slot))
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn durable(&self) -> bool {
        false
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let now = Instant::now();
        let probe = self.probe(key);
        // Look first under a shared lock: hits (the common case of a retry) need no write lock
        // and no key allocation.
        if let Some(slot) = self.inner.records.get(probe.lookup()) {
            if slot.is_live(now) {
                return Ok(slot.live_claim(fingerprint));
            }
        }
        self.sweep(now, SWEEP_PER_WRITE, false);
        match self.try_claim(&probe, fingerprint, lease, now) {
            Ok(claim) => Ok(claim),
            Err(_) => {
                // Full: make room from the expired records, never from live ones.
                self.sweep(now, usize::MAX, true);
                self.try_claim(&probe, fingerprint, lease, now)
                    .map_err(|full| self.full(full))
            }
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let now = Instant::now();
        let record = Bytes::copy_from_slice(record);
        let expires_at = now + ttl;
        if let Err(full) = self.try_complete(key, token, &record, expires_at)? {
            self.sweep(now, usize::MAX, true);
            if self.try_complete(key, token, &record, expires_at)?.is_err() {
                return Err(self.full(full));
            }
        }
        self.notify_change();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let now = Instant::now();
        let probe = self.probe(key);
        let removed = self.inner.records.remove_if(probe.lookup(), |_, slot| {
            slot.token == token.0 && slot.in_flight_now() && slot.exists(now)
        });
        let Some((key, slot)) = removed else {
            return Err(Error::lease_lost(key));
        };
        self.removed(key.key(), &slot);
        self.after_removals(1);
        self.notify_change();
        Ok(())
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let lease_until = Instant::now() + lease;
        let expiries = &self.inner.expiries;
        self.with_held(key, token, |key, slot| {
            expiries.remove(key, slot.token, slot.due);
            let steps = slot.take_steps();
            *slot = Slot::in_flight(slot.fingerprint.as_ref(), slot.token, lease_until);
            slot.put_steps(steps);
            expiries.insert(key, slot.token, slot.due);
        })
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let now = Instant::now();
        Ok(self
            .inner
            .records
            .get(self.probe(key).lookup())
            .filter(|s| s.exists(now))
            .map(|s| s.stored()))
    }

    async fn purge_expired(&self) -> Result<u64> {
        Ok(self.sweep(Instant::now(), usize::MAX, true))
    }

    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(self.sweep(Instant::now(), limit, true))
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        if let Err(full) = self.try_save_step(key, token, name, record)? {
            self.sweep(Instant::now(), usize::MAX, true);
            if self.try_save_step(key, token, name, record)?.is_err() {
                return Err(self.full(full));
            }
        }
        Ok(())
    }

    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        self.with_held(key, token, |_, slot| slot.steps())
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let now = Instant::now();
        let mut outcome = Forgotten::Absent;
        let mut refused = false;
        let probe = self.probe(key);
        let removed = self.inner.records.remove_if(probe.lookup(), |_, slot| {
            let token = FencingToken(slot.token);
            if !slot.exists(now) {
                // Expired already: gone for every reader; take it out all the same.
                return true;
            }
            if slot.in_flight_now() {
                refused = !force;
                outcome = Forgotten::InFlight { token };
                force
            } else {
                outcome = Forgotten::Completed { token };
                true
            }
        });
        if refused {
            return Err(Error::InFlight {
                key: Some(key.clone()),
            });
        }
        if let Some((key, slot)) = removed {
            self.removed(key.key(), &slot);
            self.after_removals(1);
            self.notify_change();
        }
        Ok(outcome)
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let after = scan::resume_after(cursor)?;
        let mut pager = scan::Pager::new(after.as_ref(), limit, Instant::now());
        for entry in self.inner.records.iter() {
            pager.offer(entry.key().key(), entry.value());
        }
        Ok(pager.finish())
    }

    /// Every change to an in-process store is made in this process, so waiters are told of
    /// each one.
    fn notifies_changes(&self) -> bool {
        true
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        self.inner.waiters.fetch_add(1, Ordering::AcqRel);
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
        self.inner.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RecordState, ABANDONED_CLAIM_RETENTION};

    fn key(k: &str) -> StorageKey {
        StorageKey::derive("memory-tests", k).unwrap()
    }

    async fn acquire(store: &MemoryStore, k: &StorageKey, lease: Duration) -> FencingToken {
        match store.claim(k, None, lease).await.unwrap() {
            Claim::Acquired { token, .. } => token,
            other => panic!("expected to acquire, got {other:?}"),
        }
    }

    /// On tokio's paused clock: a claim whose lease ended stays its holder's for
    /// ABANDONED_CLAIM_RETENTION, then is gone for everyone and purged; a renew after the lease
    /// ended moves its purge deadline (the stale one in the index leaves it alone).
    #[tokio::test(start_paused = true)]
    async fn claims_are_kept_until_abandoned() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(10);
        let (gone, kept, renewed) = (key("gone"), key("kept"), key("renewed"));
        let t_gone = acquire(&store, &gone, lease).await;
        let t_kept = acquire(&store, &kept, lease).await;
        let t_renewed = acquire(&store, &renewed, lease).await;

        tokio::time::advance(Duration::from_secs(20)).await;
        store.renew(&renewed, t_renewed, lease).await.unwrap();
        // Just before `gone` and `kept` are abandoned: all three are still there.
        tokio::time::advance(ABANDONED_CLAIM_RETENTION - Duration::from_secs(11)).await;
        assert_eq!(store.purge_expired().await.unwrap(), 0);
        for (k, t) in [(&gone, t_gone), (&kept, t_kept), (&renewed, t_renewed)] {
            assert_eq!(
                store.get(k).await.unwrap().unwrap().state,
                RecordState::InFlight { token: t }
            );
        }
        store.complete(&kept, t_kept, b"late", LONG).await.unwrap();

        // Past the retention of `gone` (but not of `renewed`, whose renewed lease ends 20 s later).
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.get(&gone).await.unwrap(), None);
        assert!(matches!(
            store.complete(&gone, t_gone, b"too late", LONG).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            store.renew(&gone, t_gone, lease).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            store.release(&gone, t_gone).await,
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(store.purge_expired().await.unwrap(), 1, "only `gone`");
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.get(&renewed).await.unwrap().unwrap().state,
            RecordState::InFlight { token: t_renewed }
        );

        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(store.purge_expired().await.unwrap(), 1, "now `renewed`");
        assert_eq!(
            store.claim(&kept, None, LONG).await.unwrap(),
            Claim::Completed(Bytes::from_static(b"late"))
        );
    }

    const LONG: Duration = Duration::from_secs(365 * 24 * 3600);
}
