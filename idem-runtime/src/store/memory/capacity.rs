//! The memory store's capacity: its limits (records and bytes), the builder that sets them, and
//! the accounting that refuses a write past them.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

use super::MemoryStore;

/// The default [`max_records`](MemoryStoreBuilder::max_records): 250 000 records.
///
/// At [`ENTRY_OVERHEAD`] plus a 64-byte key per record, that is some 112 MB of bookkeeping
/// for records with small results, within [`DEFAULT_MAX_BYTES`]: enough for a
/// process taking about three new keys a second with the default 24-hour ttl, small enough that the
/// default store cannot take a process in a small container down (an unbounded store did: 2
/// million records took 1 GB, and the process aborted in a hash-table resize).
pub const DEFAULT_MAX_RECORDS: usize = 250_000;

/// The default [`max_bytes`](MemoryStoreBuilder::max_bytes): 128 MiB.
///
/// Room for the default record count with small results, or for a few hundred results of
/// hundreds of kilobytes; well within what a process in a 512 MiB container can spare. A
/// service that keeps more records in memory raises it, or uses a store outside the process.
pub const DEFAULT_MAX_BYTES: usize = 128 << 20;

/// The bytes a record costs beyond its key and its result, as this store counts them: the
/// hash-table bucket with its share of the table's spare room, the shared key's allocation, the
/// record's own allocation, the entry of the expiry index, and the result's allocation.
///
/// Measured with a counting allocator (`benches/memory_footprint.rs`): a million records with
/// 16-byte results took 437 bytes of heap each when the table held the records themselves, so
/// 357 beyond key and result; since it holds them boxed (24-byte buckets), 348 bytes, so 268.
/// Both counts were taken just after the hash table grew, when it is at its emptiest (under
/// half full), so they are close to the most a record costs; 384 covers the larger with the
/// allocator's own headers of the two allocations a record then made (its key and its result),
/// and the smaller with those of the three it makes now.
pub const ENTRY_OVERHEAD: usize = 384;

/// The bytes of a storage key (64 hex digits).
const KEY_BYTES: usize = 64;

/// What a record costs against [`max_bytes`](MemoryStoreBuilder::max_bytes), before its
/// result: its key and [`ENTRY_OVERHEAD`].
pub(super) const ENTRY_BYTES: usize = KEY_BYTES + ENTRY_OVERHEAD;

/// Builds a [`MemoryStore`] with limits of its own.
///
/// ```
/// # use idem_runtime as idempotency;
/// use idempotency::MemoryStore;
/// let store = MemoryStore::builder()
///     .max_records(1_000_000)
///     .max_bytes(1 << 30)
///     .build()
///     .unwrap();
/// assert_eq!(store.max_records(), 1_000_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryStoreBuilder {
    limits: Limits,
}

/// The limits of a store.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) max_records: usize,
    pub(super) max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records the store holds, in flight or completed, expired ones not yet removed
    /// included (they are removed before a claim is refused). Default [`DEFAULT_MAX_RECORDS`].
    pub fn max_records(mut self, n: usize) -> Self {
        self.limits.max_records = n;
        self
    }

    /// The most bytes the store's records take, counted as the key, the result and
    /// [`ENTRY_OVERHEAD`] per record. Default [`DEFAULT_MAX_BYTES`].
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_bytes = bytes;
        self
    }

    /// The store, or [`Error::Config`] for limits that cannot hold a single record.
    pub fn build(self) -> Result<MemoryStore> {
        let Limits {
            max_records,
            max_bytes,
        } = self.limits;
        if max_records == 0 {
            return Err(Error::config(
                "MemoryStore::builder().max_records(0): the store could not hold a single record",
            ));
        }
        if max_bytes < ENTRY_BYTES {
            return Err(Error::config(format!(
                "MemoryStore::builder().max_bytes({max_bytes}): the store could not hold a single record (one takes at least {ENTRY_BYTES} bytes)"
            )));
        }
        Ok(MemoryStore::with_limits(self.limits))
    }
}

/// What the records take now, counted against the limits. Writes reserve before they insert,
/// so the counts never pass the limits, however many writes race.
#[derive(Default)]
pub(super) struct Usage {
    records: AtomicUsize,
    bytes: AtomicUsize,
}

/// Which limit a write ran into.
#[derive(Clone, Copy, Debug)]
pub(super) enum Full {
    Records,
    Bytes,
}

impl Usage {
    pub(super) fn records(&self) -> usize {
        self.records.load(Ordering::Relaxed)
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Reserves room for `records` more records taking `bytes` more bytes, or reserves nothing
    /// and says which limit is in the way.
    pub(super) fn reserve(
        &self,
        limits: &Limits,
        records: usize,
        bytes: usize,
    ) -> std::result::Result<(), Full> {
        if records > 0 {
            self.records
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    n.checked_add(records).filter(|&n| n <= limits.max_records)
                })
                .map_err(|_| Full::Records)?;
        }
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(bytes).filter(|&n| n <= limits.max_bytes)
            });
        if reserved.is_err() {
            self.records.fetch_sub(records, Ordering::AcqRel);
            return Err(Full::Bytes);
        }
        Ok(())
    }

    /// Gives back room for `records` records taking `bytes` bytes.
    pub(super) fn release(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Full {
    /// The error a refused write returns: which limit, and how to make room.
    pub(super) fn error(self, limits: &Limits, usage: &Usage) -> Error {
        let what = match self {
            Full::Records => format!(
                "it holds {} records, its limit (MemoryStore::builder().max_records({}))",
                usage.records(),
                limits.max_records
            ),
            Full::Bytes => format!(
                "its records take {} bytes of its limit (MemoryStore::builder().max_bytes({}))",
                usage.bytes(),
                limits.max_bytes
            ),
        };
        Error::StoreFull {
            backend: "memory",
            source: format!(
                "{what}, and none of them has expired; nothing was evicted: raise the limit, lower the ttls, or forget records"
            )
            .into(),
        }
    }
}
