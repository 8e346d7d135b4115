//! The hash table's key: a record's storage key with its hash, computed once.
//!
//! The table grows by doubling, and each doubling moves every record: near a million records,
//! some 900 000 moves in the claim that finds its shard of the table full (the shards fill
//! evenly, so they all double within a few claims). Two things made each move slow: it hashed
//! the key again, which meant following the key's pointer to memory out of the cache, and
//! each bucket held the whole record (120 bytes). Claims and completions over the 100k records
//! in which the table doubled ran at about half the rate of those over the first 100k
//! (`bench_report scale`). Here a bucket holds the key's hash, a pointer to the key (shared
//! with the expiry index) and a pointer to the record: 24 bytes, and a move reads and writes
//! one of them and nothing else.
//!
//! Lookups by a borrowed [`StorageKey`] allocate nothing: they go through [`Probe`], a key and
//! its hash on the stack, seen as `dyn Lookup`, the form the table's key borrows as.

use std::borrow::Borrow;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use crate::key::StorageKey;

/// Hashes storage keys for the table: foldhash, seeded at random per store (keys are SHA-256
/// digests, but a client that grinds keys must not be able to aim them at one bucket).
#[derive(Clone, Default)]
pub(super) struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    /// The lookup form of `key`, its hash computed.
    pub(super) fn probe<'k>(&self, key: &'k StorageKey) -> Probe<'k> {
        Probe {
            hash: self.0.hash_one(key),
            key,
        }
    }
}

/// The table's hasher: its keys hash to their stored hash, so growing the table reads no key.
pub(super) type StoredHash = BuildHasherDefault<PassThrough>;

/// A hasher that returns the `u64` written to it: [`MapKey`] and [`Probe`] write their stored
/// hash, and nothing else is hashed with it.
#[derive(Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached (the table's keys write one u64); mixes the bytes in, should it be.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A record's key in the table: the storage key, shared with the expiry index, and its hash.
#[derive(Clone)]
pub(super) struct MapKey {
    hash: u64,
    key: Arc<StorageKey>,
}

impl MapKey {
    /// The table's key for `probe`'s key: the key copied to the heap, the hash kept.
    pub(super) fn new(probe: &Probe<'_>) -> Self {
        MapKey {
            hash: probe.hash,
            key: Arc::new(probe.key.clone()),
        }
    }

    /// The storage key, shared.
    pub(super) fn key(&self) -> &Arc<StorageKey> {
        &self.key
    }
}

/// A storage key and its hash, borrowed: how the table is searched.
#[derive(Clone, Copy)]
pub(super) struct Probe<'k> {
    hash: u64,
    key: &'k StorageKey,
}

impl<'k> Probe<'k> {
    /// The form the table's lookups take.
    pub(super) fn lookup(&self) -> &(dyn Lookup + 'k) {
        self
    }
}

/// What [`MapKey`] and [`Probe`] share, so one borrows as the other: a hash and a key.
pub(super) trait Lookup {
    fn hash(&self) -> u64;
    fn key(&self) -> &StorageKey;
}

impl Lookup for MapKey {
    fn hash(&self) -> u64 {
        self.hash
    }
    fn key(&self) -> &StorageKey {
        &self.key
    }
}

impl Lookup for Probe<'_> {
    fn hash(&self) -> u64 {
        self.hash
    }
    fn key(&self) -> &StorageKey {
        self.key
    }
}

impl<'k> Borrow<dyn Lookup + 'k> for MapKey {
    fn borrow(&self) -> &(dyn Lookup + 'k) {
        self
    }
}

// Hash and equality agree between the owned and the borrowed form, as `Borrow` requires: the
// stored hash, then the key (hashes differ for different keys but may, rarely, coincide).
impl Hash for dyn Lookup + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(Lookup::hash(self));
    }
}

impl PartialEq for dyn Lookup + '_ {
    fn eq(&self, other: &Self) -> bool {
        Lookup::hash(self) == Lookup::hash(other) && Lookup::key(self) == Lookup::key(other)
    }
}

impl Eq for dyn Lookup + '_ {}

impl Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for MapKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl Eq for MapKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_and_borrowed_forms_hash_and_compare_alike() {
        let hasher = KeyHasher::default();
        let (a, b) = (
            StorageKey::derive("table-tests", "a").unwrap(),
            StorageKey::derive("table-tests", "b").unwrap(),
        );
        let owned = MapKey::new(&hasher.probe(&a));
        let table = StoredHash::default();
        assert_eq!(
            table.hash_one(&owned),
            table.hash_one(hasher.probe(&a).lookup())
        );
        let borrowed: &dyn Lookup = owned.borrow();
        assert!(borrowed == hasher.probe(&a).lookup());
        assert!(borrowed != hasher.probe(&b).lookup());
        // A hash that coincides does not make two keys equal.
        let forged = Probe {
            hash: hasher.probe(&a).hash,
            key: &b,
        };
        assert!(borrowed != forged.lookup());
    }

    /// The bucket a doubling moves: hash, key pointer, record pointer.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_bucket_is_24_bytes() {
        use super::super::slot::Slot;
        assert_eq!(std::mem::size_of::<(MapKey, Box<Slot>)>(), 24);
    }
}
