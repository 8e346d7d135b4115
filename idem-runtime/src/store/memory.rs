//! `MemoryStore`: the default store, for one process, tests and examples.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// An in-process store: a concurrent hash map, claim as one map-entry operation.
///
/// Cloning gives another handle to the same records. Records do not survive the process; for
/// several processes use the SQLite, Redis or PostgreSQL store.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    records: DashMap<StorageKey, Slot>,
    last_token: AtomicU64,
    changed: Notify,
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
    fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            SlotState::InFlight { lease_until } => *lease_until > now,
            SlotState::Completed { expires_at, .. } => *expires_at > now,
        }
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

    /// Applies `f` to the slot of `key` if `token` holds it in flight with a live lease.
    fn with_held<T>(
        &self,
        key: &StorageKey,
        token: FencingToken,
        f: impl FnOnce(Entry<'_, StorageKey, Slot>) -> T,
    ) -> Result<T> {
        let now = Instant::now();
        match self.inner.records.entry(key.clone()) {
            Entry::Occupied(e)
                if e.get().token == token.0
                    && matches!(e.get().state, SlotState::InFlight { lease_until } if lease_until > now) =>
            {
                Ok(f(Entry::Occupied(e)))
            }
            _ => Err(Error::LeaseLost),
        }
    }

    fn release_now(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.with_held(key, token, |e| {
            if let Entry::Occupied(e) = e {
                e.remove();
            }
        })?;
        self.inner.changed.notify_waiters();
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
        let fresh = |token| Slot {
            fingerprint: fingerprint.copied(),
            token,
            state: SlotState::InFlight {
                lease_until: now + lease,
            },
        };
        // Look first without the entry's write lock: hits (the common case of a retry) only
        // need a shared lock and no key clone.
        if let Some(slot) = self.inner.records.get(key) {
            if slot.is_live(now) {
                if !fingerprints_match(slot.fingerprint.as_ref(), fingerprint) {
                    return Ok(Claim::KeyReuse);
                }
                if let SlotState::Completed { record, .. } = &slot.state {
                    return Ok(Claim::Completed(record.clone()));
                }
            }
        }
        Ok(match self.inner.records.entry(key.clone()) {
            Entry::Vacant(e) => {
                let token = self.next_token();
                e.insert(fresh(token));
                Claim::Acquired {
                    token: FencingToken(token),
                    takeover: false,
                }
            }
            Entry::Occupied(mut e) => {
                let slot = e.get();
                if slot.is_live(now) {
                    if !fingerprints_match(slot.fingerprint.as_ref(), fingerprint) {
                        Claim::KeyReuse
                    } else {
                        match &slot.state {
                            SlotState::Completed { record, .. } => Claim::Completed(record.clone()),
                            SlotState::InFlight { .. } => Claim::InFlight,
                        }
                    }
                } else {
                    let takeover = matches!(slot.state, SlotState::InFlight { .. });
                    let token = self.next_token();
                    e.insert(fresh(token));
                    Claim::Acquired {
                        token: FencingToken(token),
                        takeover,
                    }
                }
            }
        })
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let record = Bytes::copy_from_slice(record);
        self.with_held(key, token, |e| {
            if let Entry::Occupied(mut e) = e {
                e.get_mut().state = SlotState::Completed {
                    expires_at: Instant::now() + ttl,
                    record,
                };
            }
        })?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.release_now(key, token)
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        self.with_held(key, token, |e| {
            if let Entry::Occupied(mut e) = e {
                e.get_mut().state = SlotState::InFlight {
                    lease_until: Instant::now() + lease,
                };
            }
        })
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
        self.inner.records.retain(|_, slot| {
            let keep = slot.is_live(now);
            removed += u64::from(!keep);
            keep
        });
        Ok(removed)
    }

    fn release_in_background(&self, key: StorageKey, token: FencingToken) {
        // Nothing to await in memory: release synchronously. A lost lease needs no release.
        let _ = self.release_now(&key, token);
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
    }
}
