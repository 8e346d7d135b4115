//! `MemoryStore`: the default store, for one process, tests and examples.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::Notify;
// tokio's clock, so tests with a paused runtime (`start_paused`) move expiry forward instantly.
use tokio::time::Instant;

use super::{Claim, FencingToken, RecordState, Store, StoredRecord, ABANDONED_CLAIM_RETENTION};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

/// Shards of the expiry index: enough that concurrent claims rarely share a lock.
const EXPIRY_SHARDS: usize = 16;

/// An in-process store: a concurrent hash map, claim as one map-entry operation.
///
/// Cloning gives another handle to the same records. Records do not survive the process; for
/// several processes use the SQLite, Redis or PostgreSQL store.
///
/// Expiry is checked on every read: a completed record past its ttl counts as absent at once,
/// and an in-flight record whose lease ended may be taken over at once, but stays its holder's
/// (to complete, renew or release, and reported by [`Store::get`]) until then, or until
/// [`ABANDONED_CLAIM_RETENTION`] after its lease ended. [`Store::purge_expired`] removes
/// completed records past their ttl and claims abandoned that long; its cost is proportional to
/// the number of records it removes: an index of deadlines (a min-heap per shard) hands it
/// exactly the records whose time has come.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                records: DashMap::with_hasher(foldhash::fast::RandomState::default()),
                expiries: (0..EXPIRY_SHARDS).map(|_| Mutex::default()).collect(),
                last_token: AtomicU64::new(0),
                changed: Notify::new(),
                waiters: AtomicUsize::new(0),
            }),
        }
    }
}

struct Inner {
    /// Keys are shared with the expiry index, so the index costs a pointer per entry. Hashed
    /// with foldhash (randomly seeded per process) rather than SipHash: keys are already
    /// uniform SHA-256 digests, and this map is on every call's path.
    records: DashMap<Arc<StorageKey>, Slot, foldhash::fast::RandomState>,
    /// Purge deadlines of records (the ttl's end, or the lease's end plus
    /// [`ABANDONED_CLAIM_RETENTION`]), possibly stale (a record completed, renewed or taken over
    /// since): purge pops the due ones and removes a record only if it is really due.
    expiries: Vec<Mutex<BinaryHeap<Reverse<Deadline>>>>,
    last_token: AtomicU64,
    changed: Notify,
    /// Callers inside `wait_for_change`: completions notify only when someone waits.
    waiters: AtomicUsize,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    key: Arc<StorageKey>,
}

struct Slot {
    fingerprint: Option<Fingerprint>,
    token: u64,
    state: SlotState,
}

enum SlotState {
    InFlight { lease_until: Instant },
    Completed { expires_at: Instant, record: Bytes },
}

/// When an in-flight record whose lease ends at `lease_until` is abandoned and may be purged;
/// `None` for never (a lease too long to add the retention to).
fn abandoned_at(lease_until: Instant) -> Option<Instant> {
    lease_until.checked_add(ABANDONED_CLAIM_RETENTION)
}

impl Slot {
    /// What a claim reports for this live record.
    fn live_claim(&self, fingerprint: Option<&Fingerprint>) -> Claim {
        let completed = match &self.state {
            SlotState::Completed { record, .. } => Some(record.clone()),
            SlotState::InFlight { .. } => None,
        };
        Claim::on_live_record(self.fingerprint.as_ref(), fingerprint, completed)
    }

    /// Whether the record stands in a claim's way: a completed record within its ttl, or an
    /// in-flight one within its lease.
    fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            SlotState::InFlight { lease_until } => *lease_until > now,
            SlotState::Completed { expires_at, .. } => *expires_at > now,
        }
    }

    /// Whether the record still exists for `get`, its holder and purge: a completed record
    /// within its ttl, or an in-flight one not yet abandoned (its lease may have ended).
    fn exists(&self, now: Instant) -> bool {
        match &self.state {
            SlotState::InFlight { lease_until } => {
                abandoned_at(*lease_until).is_none_or(|at| at > now)
            }
            SlotState::Completed { expires_at, .. } => *expires_at > now,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records (live or not yet purged) the store holds.
    pub fn len(&self) -> usize {
        self.inner.records.len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    fn next_token(&self) -> u64 {
        self.inner.last_token.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Indexes when the record of `key` becomes due for purge; `None` is never.
    fn index_deadline(&self, key: &Arc<StorageKey>, at: Option<Instant>) {
        let Some(at) = at else {
            return;
        };
        let shard = key.as_str().as_bytes()[0] as usize % EXPIRY_SHARDS;
        let mut heap = self.inner.expiries[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        heap.push(Reverse(Deadline {
            at,
            key: key.clone(),
        }));
    }

    fn notify_change(&self) {
        if self.inner.waiters.load(Ordering::Acquire) > 0 {
            self.inner.changed.notify_waiters();
        }
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
        let Some(mut entry) = self.inner.records.get_mut(key) else {
            return Err(Error::lease_lost(key));
        };
        let held = entry.token == token.0
            && matches!(entry.state, SlotState::InFlight { .. })
            && entry.exists(now);
        if !held {
            return Err(Error::lease_lost(key));
        }
        let (key, slot) = entry.pair_mut();
        Ok(f(key, slot))
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
        // Look first under a shared lock: hits (the common case of a retry) need no write lock
        // and no key allocation.
        if let Some(slot) = self.inner.records.get(key) {
            if slot.is_live(now) {
                return Ok(slot.live_claim(fingerprint));
            }
        }
        let fresh = |token| Slot {
            fingerprint: fingerprint.copied(),
            token,
            state: SlotState::InFlight {
                lease_until: now + lease,
            },
        };
        let (claim, key) = match self.inner.records.entry(Arc::new(key.clone())) {
            Entry::Vacant(e) => {
                let token = self.next_token();
                let key = e.key().clone();
                e.insert(fresh(token));
                let claim = Claim::Acquired {
                    token: FencingToken(token),
                    takeover: false,
                };
                (claim, key)
            }
            Entry::Occupied(mut e) => {
                let slot = e.get();
                if slot.is_live(now) {
                    // Another caller got here between our look and the entry lock.
                    return Ok(slot.live_claim(fingerprint));
                }
                let takeover = matches!(slot.state, SlotState::InFlight { .. });
                let token = self.next_token();
                let key = e.key().clone();
                e.insert(fresh(token));
                let claim = Claim::Acquired {
                    token: FencingToken(token),
                    takeover,
                };
                (claim, key)
            }
        };
        self.index_deadline(&key, abandoned_at(now + lease));
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let record = Bytes::copy_from_slice(record);
        let expires_at = Instant::now() + ttl;
        let key = self.with_held(key, token, |key, slot| {
            slot.state = SlotState::Completed { expires_at, record };
            key.clone()
        })?;
        self.index_deadline(&key, Some(expires_at));
        self.notify_change();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let now = Instant::now();
        let removed = self.inner.records.remove_if(key, |_, slot| {
            slot.token == token.0
                && matches!(slot.state, SlotState::InFlight { .. })
                && slot.exists(now)
        });
        if removed.is_none() {
            return Err(Error::lease_lost(key));
        }
        self.notify_change();
        Ok(())
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let lease_until = Instant::now() + lease;
        let key = self.with_held(key, token, |key, slot| {
            slot.state = SlotState::InFlight { lease_until };
            key.clone()
        })?;
        self.index_deadline(&key, abandoned_at(lease_until));
        Ok(())
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let now = Instant::now();
        Ok(self
            .inner
            .records
            .get(key)
            .filter(|s| s.exists(now))
            .map(|s| StoredRecord {
                fingerprint: s.fingerprint,
                state: match &s.state {
                    SlotState::InFlight { .. } => RecordState::InFlight {
                        token: FencingToken(s.token),
                    },
                    SlotState::Completed { record, .. } => RecordState::Completed {
                        token: FencingToken(s.token),
                        record: record.clone(),
                    },
                },
            }))
    }

    async fn purge_expired(&self) -> Result<u64> {
        let now = Instant::now();
        let mut removed = 0u64;
        for shard in &self.inner.expiries {
            // Take the due deadlines out under the shard lock, remove records after releasing it.
            let due: Vec<Arc<StorageKey>> = {
                let mut heap = shard.lock().unwrap_or_else(|p| p.into_inner());
                let mut due = Vec::new();
                while heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
                    if let Some(Reverse(d)) = heap.pop() {
                        due.push(d.key);
                    }
                }
                due
            };
            for key in due {
                // A stale deadline (the record was completed, renewed or taken over since) finds
                // a record that still exists and leaves it; its newer deadline is in the index.
                if self
                    .inner
                    .records
                    .remove_if(&*key, |_, slot| !slot.exists(now))
                    .is_some()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
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
