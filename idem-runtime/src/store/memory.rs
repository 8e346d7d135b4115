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

use super::{Claim, FencingToken, RecordState, Store, StoredRecord};
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
/// Expired records stop counting at once (every read checks the deadline) and are removed by
/// [`Store::purge_expired`], whose cost is proportional to the number of expired records: an
/// index of deadlines (a min-heap per shard) hands it exactly the records whose time has come.
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
    /// Deadlines of records, possibly stale (a record completed or renewed since): purge pops
    /// the due ones and removes a record only if it is really expired.
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

impl Slot {
    fn deadline(&self) -> Instant {
        match &self.state {
            SlotState::InFlight { lease_until } => *lease_until,
            SlotState::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn is_live(&self, now: Instant) -> bool {
        self.deadline() > now
    }
}

fn fingerprints_match(stored: Option<&Fingerprint>, given: Option<&Fingerprint>) -> bool {
    match (stored, given) {
        (Some(a), Some(b)) => a == b,
        _ => true,
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

    fn index_deadline(&self, key: &Arc<StorageKey>, at: Instant) {
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

    /// Applies `f` to the slot of `key` if `token` holds it in flight with a live lease.
    fn with_held<T>(
        &self,
        key: &StorageKey,
        token: FencingToken,
        f: impl FnOnce(&Arc<StorageKey>, &mut Slot) -> T,
    ) -> Result<T> {
        let now = Instant::now();
        let Some(mut entry) = self.inner.records.get_mut(key) else {
            return Err(Error::LeaseLost);
        };
        let held = entry.token == token.0
            && matches!(entry.state, SlotState::InFlight { lease_until } if lease_until > now);
        if !held {
            return Err(Error::LeaseLost);
        }
        let (key, slot) = entry.pair_mut();
        Ok(f(key, slot))
    }

    fn release_now(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let now = Instant::now();
        let removed = self.inner.records.remove_if(key, |_, slot| {
            slot.token == token.0
                && matches!(slot.state, SlotState::InFlight { lease_until } if lease_until > now)
        });
        if removed.is_none() {
            return Err(Error::LeaseLost);
        }
        self.notify_change();
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
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
                if !fingerprints_match(slot.fingerprint.as_ref(), fingerprint) {
                    return Ok(Claim::KeyReuse);
                }
                return Ok(match &slot.state {
                    SlotState::Completed { record, .. } => Claim::Completed(record.clone()),
                    SlotState::InFlight { .. } => Claim::InFlight,
                });
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
                    let claim = if !fingerprints_match(slot.fingerprint.as_ref(), fingerprint) {
                        Claim::KeyReuse
                    } else {
                        match &slot.state {
                            SlotState::Completed { record, .. } => Claim::Completed(record.clone()),
                            SlotState::InFlight { .. } => Claim::InFlight,
                        }
                    };
                    return Ok(claim);
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
        self.index_deadline(&key, now + lease);
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
        self.index_deadline(&key, expires_at);
        self.notify_change();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.release_now(key, token)
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let lease_until = Instant::now() + lease;
        let key = self.with_held(key, token, |key, slot| {
            slot.state = SlotState::InFlight { lease_until };
            key.clone()
        })?;
        self.index_deadline(&key, lease_until);
        Ok(())
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let now = Instant::now();
        Ok(self
            .inner
            .records
            .get(key)
            .filter(|s| s.is_live(now))
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
                // A stale deadline (the record was completed or renewed since) finds a live
                // record and leaves it; its newer deadline is in the index too.
                if self
                    .inner
                    .records
                    .remove_if(&*key, |_, slot| !slot.is_live(now))
                    .is_some()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn release_in_background(&self, key: StorageKey, token: FencingToken) {
        // Nothing to await in memory: release synchronously. A lost lease needs no release.
        let _ = self.release_now(&key, token);
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        self.inner.waiters.fetch_add(1, Ordering::AcqRel);
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
        self.inner.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}
