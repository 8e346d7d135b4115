//! Process-wide counters a user can read, and the `tracing` events that go with them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of idem's counters since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Calls answered by replaying a stored result.
    pub hits: u64,
    /// Calls that claimed the key and ran the body.
    pub misses: u64,
    /// Calls that found the key in flight elsewhere (rejected or waited).
    pub conflicts: u64,
    /// Calls refused because the key was reused with a different fingerprint.
    pub key_reuses: u64,
    /// Claims that took over an expired lease.
    pub takeovers: u64,
    /// Claims released after an error, panic or cancellation.
    pub releases: u64,
    /// Completions refused because the lease had been taken over.
    pub leases_lost: u64,
    /// Store operations that failed.
    pub store_errors: u64,
    /// Started bodies whose outcome is unknown (panic, abandoned, a result that could not be
    /// kept), recorded under the at-most-once policy or released under at-least-once.
    pub unknown_outcomes: u64,
    /// Results that could not be stored while the caller waited (the store was unreachable);
    /// storing goes on in the background.
    pub results_unstored: u64,
    /// Calls whose caller stopped waiting while the call went on on a task of its own (a
    /// detached body, or an HTTP handler whose client left): the body runs to its end and its
    /// outcome is stored as if the caller were still there.
    pub finished_detached: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub conflicts: AtomicU64,
    pub key_reuses: AtomicU64,
    pub takeovers: AtomicU64,
    pub releases: AtomicU64,
    pub leases_lost: AtomicU64,
    pub store_errors: AtomicU64,
    pub unknown_outcomes: AtomicU64,
    pub results_unstored: AtomicU64,
    pub finished_detached: AtomicU64,
}

pub(crate) static COUNTERS: Counters = Counters {
    hits: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
    key_reuses: AtomicU64::new(0),
    takeovers: AtomicU64::new(0),
    releases: AtomicU64::new(0),
    leases_lost: AtomicU64::new(0),
    store_errors: AtomicU64::new(0),
    unknown_outcomes: AtomicU64::new(0),
    results_unstored: AtomicU64::new(0),
    finished_detached: AtomicU64::new(0),
};

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Reads idem's process-wide counters.
pub fn metrics() -> Metrics {
    let c = &COUNTERS;
    Metrics {
        hits: c.hits.load(Relaxed),
        misses: c.misses.load(Relaxed),
        conflicts: c.conflicts.load(Relaxed),
        key_reuses: c.key_reuses.load(Relaxed),
        takeovers: c.takeovers.load(Relaxed),
        releases: c.releases.load(Relaxed),
        leases_lost: c.leases_lost.load(Relaxed),
        store_errors: c.store_errors.load(Relaxed),
        unknown_outcomes: c.unknown_outcomes.load(Relaxed),
        results_unstored: c.results_unstored.load(Relaxed),
        finished_detached: c.finished_detached.load(Relaxed),
    }
}
