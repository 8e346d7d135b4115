//! What idem counts and times: process-wide counters a user can read with [`counters()`], and,
//! with the `metrics` cargo feature, the same counts and three latency histograms sent through
//! the [`metrics`](https://docs.rs/metrics) facade to whatever recorder the application
//! installed (Prometheus, StatsD, OpenTelemetry, ...).
//!
//! # Through the `metrics` facade (feature `metrics`)
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `idem_events_total` | counter | `event`, `operation`, `backend` | one per event below |
//! | `idem_body_duration_seconds` | histogram | `operation`, `backend` | how long a body ran, from its start to its result (or panic), for bodies that ran to an end |
//! | `idem_store_operation_seconds` | histogram | `op`, `backend` | how long one store operation took, failed ones included |
//! | `idem_wait_seconds` | histogram | `operation`, `backend` | how long a call waited for a key in flight elsewhere (`on_conflict = "wait"`), until it got a result, the key, or gave up |
//! | `idem_purged_records_total` | counter | `backend` | expired records a background [`Purger`](crate::Purger) removed |
//! | `idem_purge_errors_total` | counter | `backend` | purger passes that failed (retried at the next pass) |
//! | `idem_purge_pass_seconds` | histogram | `backend` | how long one purger pass took |
//!
//! `event` of `idem_events_total` (each also a field of [`Counters`]):
//!
//! | `event` | [`Counters`] field | counted when |
//! |---|---|---|
//! | `hit` | `hits` | a call is answered from a stored record (a replay) |
//! | `miss` | `misses` | a call claimed the key and runs the body |
//! | `conflict` | `conflicts` | a call found the key in flight elsewhere (once per call, whether it then fails or waits) |
//! | `key_reuse` | `key_reuses` | a call reused a key with a different fingerprint |
//! | `takeover` | `takeovers` | a claim took over an expired lease (also a `miss`) |
//! | `release` | `releases` | a claim was released (an `Err` not kept, a cancelled call, at least once) |
//! | `lease_lost` | `leases_lost` | a result was refused because the lease had been taken over |
//! | `store_error` | `store_errors` | a store operation failed (every failed attempt of a retried one) |
//! | `unknown_outcome` | `unknown_outcomes` | a started body's outcome is unknown (panic, abandoned, not storable) |
//! | `result_unstored` | `results_unstored` | a result could not be stored while the caller waited; storing goes on in the background |
//! | `finished_detached` | `finished_detached` | a caller stopped waiting while its body went on on a task of its own |
//!
//! Events are not exclusive: a call that waited for a conflict also ends in a `hit` or a
//! `miss`, a `takeover` is a `miss` too, and a `release` follows a `miss`. The hit ratio is
//! `hit / (hit + miss)`.
//!
//! `op` of `idem_store_operation_seconds`: `claim`, `complete`, `release`, `renew`, `get`.
//!
//! Labels, and what is left out on purpose:
//!
//! - `operation`: the function's stable name (`name = "..."`), or its path when it has none;
//!   `unnamed` for a [`Call`](crate::Call) made without an operation (such as the calls of the
//!   HTTP layer). One value per idempotent function: bounded by the code.
//! - `backend`: the store's [`backend`](crate::Store::backend) (`memory`, `sqlite`, `redis`,
//!   `postgres`, ...).
//! - No `scope` label: scopes are per tenant or, in the HTTP layer, per client, so a scope
//!   label would make one series per client, without bound. Keys are never labels either.
//!
//! Descriptions and units are registered the first time idem sends anything; call
//! [`describe`] after installing a recorder if idem may have sent something before it.
//!
//! Without the feature the only cost is the atomic increment of each counter: nothing is timed.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of idem's counters since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
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

/// Something idem counts: one field of [`Counters`], one `event` of `idem_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Hit,
    Miss,
    Conflict,
    KeyReuse,
    Takeover,
    Release,
    LeaseLost,
    StoreError,
    UnknownOutcome,
    ResultUnstored,
    FinishedDetached,
}

impl Event {
    /// Its counter, its value of the `event` label.
    fn counter(self) -> (&'static AtomicU64, &'static str) {
        let c = &COUNTERS;
        match self {
            Event::Hit => (&c.hits, "hit"),
            Event::Miss => (&c.misses, "miss"),
            Event::Conflict => (&c.conflicts, "conflict"),
            Event::KeyReuse => (&c.key_reuses, "key_reuse"),
            Event::Takeover => (&c.takeovers, "takeover"),
            Event::Release => (&c.releases, "release"),
            Event::LeaseLost => (&c.leases_lost, "lease_lost"),
            Event::StoreError => (&c.store_errors, "store_error"),
            Event::UnknownOutcome => (&c.unknown_outcomes, "unknown_outcome"),
            Event::ResultUnstored => (&c.results_unstored, "result_unstored"),
            Event::FinishedDetached => (&c.finished_detached, "finished_detached"),
        }
    }
}

/// The labels of a call's events: which function, which store. Two static strings, built once
/// per call.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Labels {
    operation: &'static str,
    backend: &'static str,
}

impl Labels {
    /// The labels of a call of `operation` (if it has one) on a store of `backend`.
    pub(crate) fn new(operation: Option<&'static str>, backend: &'static str) -> Self {
        Labels {
            operation: operation.unwrap_or("unnamed"),
            backend,
        }
    }
}

/// A store operation, as the `op` label of `idem_store_operation_seconds`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum StoreOp {
    Claim,
    Complete,
    Release,
    Renew,
    Get,
    SaveStep,
    LoadSteps,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl StoreOp {
    fn label(self) -> &'static str {
        match self {
            StoreOp::Claim => "claim",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Renew => "renew",
            StoreOp::Get => "get",
            StoreOp::SaveStep => "save_step",
            StoreOp::LoadSteps => "load_steps",
        }
    }
}

#[derive(Default)]
struct Atomics {
    hits: AtomicU64,
    misses: AtomicU64,
    conflicts: AtomicU64,
    key_reuses: AtomicU64,
    takeovers: AtomicU64,
    releases: AtomicU64,
    leases_lost: AtomicU64,
    store_errors: AtomicU64,
    unknown_outcomes: AtomicU64,
    results_unstored: AtomicU64,
    finished_detached: AtomicU64,
}

static COUNTERS: Atomics = Atomics {
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

/// Counts `event` of a call with `labels`: the process-wide counter, and (feature `metrics`)
/// `idem_events_total`.
pub(crate) fn count(event: Event, labels: Labels) {
    let (counter, _name) = event.counter();
    counter.fetch_add(1, Relaxed);
    #[cfg(feature = "metrics")]
    {
        describe_once();
        ::metrics::counter!(
            EVENTS,
            "event" => _name,
            "operation" => labels.operation,
            "backend" => labels.backend
        )
        .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = labels;
}

/// Awaits `op`, the store operation `which`, timing it into `idem_store_operation_seconds`
/// (feature `metrics`; without it, `op` itself).
#[cfg(feature = "metrics")]
pub(crate) async fn timed<F: std::future::Future>(
    which: StoreOp,
    labels: Labels,
    op: F,
) -> F::Output {
    let start = Stopwatch::start();
    let out = op.await;
    describe_once();
    ::metrics::histogram!(STORE_OPERATION, "op" => which.label(), "backend" => labels.backend)
        .record(start.elapsed_secs());
    out
}

/// Awaits `op`, the store operation `which`, timing it into `idem_store_operation_seconds`
/// (feature `metrics`; without it, `op` itself).
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn timed<F: std::future::Future>(_which: StoreOp, _labels: Labels, op: F) -> F {
    op
}

/// A running time: a clock reading with feature `metrics`, nothing without it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stopwatch {
    #[cfg(feature = "metrics")]
    start: std::time::Instant,
}

impl Stopwatch {
    /// Starts timing.
    #[inline]
    pub(crate) fn start() -> Self {
        Stopwatch {
            #[cfg(feature = "metrics")]
            start: std::time::Instant::now(),
        }
    }

    #[cfg(feature = "metrics")]
    fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Records the time since [`start`](Self::start) as a body's duration.
    #[inline]
    pub(crate) fn body_ended(self, labels: Labels) {
        #[cfg(feature = "metrics")]
        {
            describe_once();
            ::metrics::histogram!(BODY_DURATION, "operation" => labels.operation, "backend" => labels.backend)
                .record(self.elapsed_secs());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = labels;
    }

    /// Records the time since [`start`](Self::start) as a wait for a key in flight elsewhere.
    #[inline]
    pub(crate) fn wait_ended(self, labels: Labels) {
        #[cfg(feature = "metrics")]
        {
            describe_once();
            ::metrics::histogram!(WAIT, "operation" => labels.operation, "backend" => labels.backend)
                .record(self.elapsed_secs());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = labels;
    }
}

/// Records one pass of a background purger: `removed` records in `secs`, or a failure
/// (feature `metrics`; without it, nothing: the purger keeps its own [`PurgerStats`](crate::PurgerStats)).
pub(crate) fn purge_pass(backend: &'static str, removed: u64, failed: bool, secs: f64) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        ::metrics::counter!(PURGED, "backend" => backend).increment(removed);
        if failed {
            ::metrics::counter!(PURGE_ERRORS, "backend" => backend).increment(1);
        }
        ::metrics::histogram!(PURGE_PASS, "backend" => backend).record(secs);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, removed, failed, secs);
}

#[cfg(feature = "metrics")]
const PURGED: &str = "idem_purged_records_total";
#[cfg(feature = "metrics")]
const PURGE_ERRORS: &str = "idem_purge_errors_total";
#[cfg(feature = "metrics")]
const PURGE_PASS: &str = "idem_purge_pass_seconds";
#[cfg(feature = "metrics")]
const EVENTS: &str = "idem_events_total";
#[cfg(feature = "metrics")]
const BODY_DURATION: &str = "idem_body_duration_seconds";
#[cfg(feature = "metrics")]
const STORE_OPERATION: &str = "idem_store_operation_seconds";
#[cfg(feature = "metrics")]
const WAIT: &str = "idem_wait_seconds";

/// Registers the descriptions and units of idem's metrics (see the [module docs](self)) with
/// the installed recorder. idem does it the first time it sends anything; call it again after
/// installing a recorder if idem may have sent something before.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe() {
    use ::metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        EVENTS,
        Unit::Count,
        "Events of idempotent calls: hit, miss, conflict, key_reuse, takeover, release, lease_lost, store_error, unknown_outcome, result_unstored, finished_detached"
    );
    describe_histogram!(
        BODY_DURATION,
        Unit::Seconds,
        "How long the body of an idempotent call ran"
    );
    describe_histogram!(
        STORE_OPERATION,
        Unit::Seconds,
        "How long one store operation (claim, complete, release, renew, get) took"
    );
    describe_histogram!(
        WAIT,
        Unit::Seconds,
        "How long a call waited for a key in flight elsewhere"
    );
    describe_counter!(
        PURGED,
        Unit::Count,
        "Expired records removed by a background purger"
    );
    describe_counter!(
        PURGE_ERRORS,
        Unit::Count,
        "Background purger passes that failed"
    );
    describe_histogram!(
        PURGE_PASS,
        Unit::Seconds,
        "How long one background purger pass took"
    );
}

#[cfg(feature = "metrics")]
fn describe_once() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(describe);
}

/// Reads idem's process-wide counters.
pub fn counters() -> Counters {
    let c = &COUNTERS;
    Counters {
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
