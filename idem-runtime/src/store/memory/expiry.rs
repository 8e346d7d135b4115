//! The expiry index: exactly one entry per record that can expire, ordered by when it is due,
//! so removing expired records costs in proportion to how many there are, not to the store's
//! size.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::key::StorageKey;

/// Shards of the index: enough that concurrent writes rarely share a lock.
const SHARDS: usize = 16;

/// One shard: the records' deadlines, `(due, token)`, in order, with their keys.
type Shard = BTreeMap<(Instant, u64), Arc<StorageKey>>;

/// Deadlines of the records, sharded by key.
///
/// A record's entry is `(due, token)`: unique, since a token belongs to one claim of one key
/// and a record has one deadline at a time. Whoever changes a record's deadline (claim,
/// complete, renew) replaces its entry while holding the record's map entry, and whoever
/// removes a record removes its entry, so the index holds no stale entries: its memory follows
/// the number of records.
pub(super) struct ExpiryIndex {
    shards: Vec<Mutex<Shard>>,
    /// Which shard the next amortised sweep looks at.
    next: AtomicUsize,
}

/// A due record, taken out of the index: remove it if it still has this deadline and token.
pub(super) struct Due {
    pub(super) at: Instant,
    pub(super) token: u64,
    pub(super) key: Arc<StorageKey>,
}

impl ExpiryIndex {
    pub(super) fn new() -> Self {
        ExpiryIndex {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Shard> {
        // Keys are hex digests: the first digit spreads them evenly over the 16 shards.
        let digit = (key.as_str().as_bytes()[0] as char)
            .to_digit(16)
            .unwrap_or(0) as usize;
        lock(&self.shards[digit % SHARDS])
    }

    /// Records that `key`, under `token`, is due at `due` (`None`: never, nothing to index).
    pub(super) fn insert(&self, key: &Arc<StorageKey>, token: u64, due: Option<Instant>) {
        if let Some(at) = due {
            self.shard(key).insert((at, token), key.clone());
        }
    }

    /// Forgets the deadline `due` of `key` under `token` (absent already: nothing to do).
    pub(super) fn remove(&self, key: &StorageKey, token: u64, due: Option<Instant>) {
        if let Some(at) = due {
            self.shard(key).remove(&(at, token));
        }
    }

    /// Takes out up to `limit` entries due at or before `now`, from every shard in turn.
    pub(super) fn take_due(&self, now: Instant, limit: usize) -> Vec<Due> {
        let mut due = Vec::new();
        for shard in &self.shards {
            if due.len() >= limit {
                break;
            }
            take_from(&mut lock(shard), now, limit - due.len(), &mut due);
        }
        due
    }

    /// Takes out up to `limit` due entries from one shard, the next in a rotation: the cheap
    /// step a write does, so expired records drain as fast as new ones arrive.
    pub(super) fn take_some_due(&self, now: Instant, limit: usize) -> Vec<Due> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut due = Vec::new();
        take_from(&mut lock(&self.shards[i]), now, limit, &mut due);
        due
    }
}

fn take_from(shard: &mut Shard, now: Instant, limit: usize, into: &mut Vec<Due>) {
    for _ in 0..limit {
        match shard.first_key_value() {
            Some((&(at, _), _)) if at <= now => {}
            _ => return,
        }
        if let Some(((at, token), key)) = shard.pop_first() {
            into.push(Due { at, token, key });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
