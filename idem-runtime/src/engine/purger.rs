//! The background purger: removes a store's expired records on a schedule, for stores that keep
//! them until someone purges (SQLite, PostgreSQL), so a service needs no cron job.
//!
//! [`SqliteStore`](crate::SqliteStore) and [`PostgresStore`](crate::PostgresStore) start one
//! by default when they open (see their options' `purger` and `purge_in_background`); any other
//! store gets one from [`Purger::spawn_for`]. Whoever starts it owns it: a [`PurgerHandle`]
//! stops the task when it is dropped (a store that starts its own purger keeps the handle, so
//! the task ends with the store). The task holds the store only by a [`Weak`] reference between
//! passes, so it never keeps a store alive: once the store is dropped, the task ends at its
//! next wake-up.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::Store;

/// The default time between two passes: one minute.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The default most records one step removes: short enough that a step holds no lock or
/// connection for long.
pub const DEFAULT_PURGE_BATCH: u64 = 1000;

/// The default jitter: each pause is the interval ± 10%, so processes started together drift
/// apart instead of purging at the same moment.
pub const DEFAULT_PURGE_JITTER: f64 = 0.1;

/// How to purge a store in the background: every `interval` (± `jitter`), a pass of steps of
/// [`Store::purge_expired_up_to`]`(batch)`, until a step removes fewer than `batch`.
///
/// ```
/// # use idem_runtime as idempotency;
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotency::{MemoryStore, Purger, Store};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> idempotency::Result<()> {
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let purger = Purger::new()
///     .interval(Duration::from_secs(30))
///     .batch(500)
///     .spawn_for(&store)?;
/// // ... the task purges until `purger` or the store is dropped.
/// # drop(purger);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Purger {
    interval: Duration,
    batch: u64,
    jitter: f64,
}

impl Default for Purger {
    fn default() -> Self {
        Purger {
            interval: DEFAULT_PURGE_INTERVAL,
            batch: DEFAULT_PURGE_BATCH,
            jitter: DEFAULT_PURGE_JITTER,
        }
    }
}

impl Purger {
    /// A purger with the defaults: [`DEFAULT_PURGE_INTERVAL`], [`DEFAULT_PURGE_BATCH`],
    /// [`DEFAULT_PURGE_JITTER`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The time between two passes (before jitter); must not be zero.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The most records one step removes; must not be zero.
    pub fn batch(mut self, batch: u64) -> Self {
        self.batch = batch;
        self
    }

    /// How far a pause may stray from the interval, as a fraction of it, in `[0, 1)`: a pause
    /// lasts between `interval × (1 - jitter)` and `interval × (1 + jitter)`.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Starts purging the store behind `store` on the current tokio runtime, holding it only
    /// while a pass runs. The task ends when the returned handle is dropped or stopped, or once
    /// the store is gone (`store` no longer upgrades).
    ///
    /// [`Error::Config`] for a zero interval or batch, a jitter outside `[0, 1)`, or when called
    /// outside a tokio runtime.
    pub fn spawn<S: Store + ?Sized + 'static>(&self, store: Weak<S>) -> Result<PurgerHandle> {
        self.spawn_upgrading(move || store.upgrade())
    }

    /// [`spawn`](Self::spawn) for a store reached through `upgrade`, which gives a handle to it
    /// while it lives and `None` once it is gone: a store whose clones share one inner `Arc`
    /// passes a closure over a [`Weak`] of that `Arc`, so the task never keeps it alive.
    pub(crate) fn spawn_upgrading<T, F>(&self, upgrade: F) -> Result<PurgerHandle>
    where
        T: Store + 'static,
        F: Fn() -> Option<T> + Send + 'static,
    {
        self.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config(
                "Purger::spawn needs a tokio runtime: call it from within one (e.g. in `#[tokio::main]`), or purge from a periodic job (`idem purge`)",
            )
        })?;
        let stats = Arc::new(Stats::default());
        let task = runtime.spawn(run(self.clone(), upgrade, stats.clone()));
        Ok(PurgerHandle { task, stats })
    }

    /// [`spawn`](Self::spawn) for a store held in an `Arc` (`Arc<MemoryStore>`,
    /// `Arc<dyn Store>`, ...): the task keeps only a [`Weak`] reference to it.
    pub fn spawn_for<S: Store + ?Sized + 'static>(&self, store: &Arc<S>) -> Result<PurgerHandle> {
        self.spawn(Arc::downgrade(store))
    }

    fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(Error::config("Purger::interval must be longer than zero"));
        }
        if self.batch == 0 {
            return Err(Error::config("Purger::batch must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(Error::config(format!(
                "Purger::jitter({}) must be a fraction in [0, 1)",
                self.jitter
            )));
        }
        Ok(())
    }
}

/// The pause before the next pass: `interval` scaled by `1 + jitter × (2 × unit - 1)`, where
/// `unit` is a random number in `[0, 1]`; so between `interval × (1 - jitter)` and
/// `interval × (1 + jitter)`. Out-of-range arguments are clamped (`unit` to `[0, 1]`, `jitter`
/// to `[0, 1]`).
pub fn jittered(interval: Duration, jitter: f64, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    interval.mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
}

/// What a purger has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgerStats {
    /// Passes finished (with or without an error).
    pub passes: u64,
    /// Records removed, over all passes.
    pub removed: u64,
    /// Passes that ended on a store error.
    pub errors: u64,
}

#[derive(Default)]
struct Stats {
    passes: AtomicU64,
    removed: AtomicU64,
    errors: AtomicU64,
    /// Set when the task ended because the store was gone.
    store_gone: AtomicBool,
}

/// The running purger. Dropping it (or [`stop`](Self::stop)) ends the task.
#[derive(Debug)]
pub struct PurgerHandle {
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("passes", &self.passes.load(Ordering::Relaxed))
            .field("removed", &self.removed.load(Ordering::Relaxed))
            .finish()
    }
}

impl PurgerHandle {
    /// What the purger has done so far.
    pub fn stats(&self) -> PurgerStats {
        PurgerStats {
            passes: self.stats.passes.load(Ordering::Acquire),
            removed: self.stats.removed.load(Ordering::Acquire),
            errors: self.stats.errors.load(Ordering::Acquire),
        }
    }

    /// Whether the task has ended: stopped, or its store is gone.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Whether the task ended because its store was dropped.
    pub fn store_gone(&self) -> bool {
        self.stats.store_gone.load(Ordering::Acquire)
    }

    /// Stops the task (a pass under way is cancelled between two awaits; a step of a store is
    /// one atomic statement, so none is left half done).
    pub fn stop(self) {
        // Dropping aborts.
    }
}

impl Drop for PurgerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The task: sleep, pass, until the store is gone (`upgrade` gives `None`).
async fn run<T: Store, F: Fn() -> Option<T>>(purger: Purger, upgrade: F, stats: Arc<Stats>) {
    let random = foldhash::fast::RandomState::default();
    let mut draw = 0u64;
    loop {
        draw += 1;
        // 53 random bits as a fraction in [0, 1).
        let unit = (random.hash_one(draw) >> 11) as f64 / (1u64 << 53) as f64;
        tokio::time::sleep(jittered(purger.interval, purger.jitter, unit)).await;
        let Some(store) = upgrade() else {
            stats.store_gone.store(true, Ordering::Release);
            tracing::debug!(target: "idem", "store dropped; the purger stops");
            return;
        };
        pass(&store, purger.batch, &stats).await;
    }
}

/// One pass: steps of `batch` until a step removes fewer, or fails.
async fn pass<S: Store + ?Sized>(store: &S, batch: u64, stats: &Stats) {
    let started = Instant::now();
    let backend = store.backend();
    let (mut removed, mut steps) = (0u64, 0u64);
    let outcome = loop {
        steps += 1;
        match store.purge_expired_up_to(batch).await {
            Ok(n) => {
                removed += n;
                stats.removed.fetch_add(n, Ordering::AcqRel);
                if n < batch {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
        // A store whose steps never pend must not hold a current-thread runtime.
        tokio::task::yield_now().await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    crate::metrics::purge_pass(backend, removed, outcome.is_err(), elapsed);
    let elapsed_ms = elapsed * 1000.0;
    match outcome {
        Ok(()) if removed > 0 => {
            tracing::info!(target: "idem", backend, removed, steps, elapsed_ms,
            "purged expired records")
        }
        Ok(()) => tracing::debug!(target: "idem", backend, removed, steps, elapsed_ms,
            "purged expired records"),
        Err(error) => {
            stats.errors.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(target: "idem", backend, removed, steps, elapsed_ms, error = %error,
                "purging expired records failed; trying again at the next pass");
        }
    }
    stats.passes.fetch_add(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bounds() {
        let interval = Duration::from_secs(60);
        let (low, high) = (Duration::from_secs(48), Duration::from_secs(72));
        for i in 0..=1000 {
            let unit = f64::from(i) / 1000.0;
            let d = jittered(interval, 0.2, unit);
            assert!(low <= d && d <= high, "unit {unit}: {d:?}");
        }
        assert_eq!(jittered(interval, 0.2, 0.0), low);
        assert_eq!(jittered(interval, 0.2, 1.0), high);
        assert_eq!(jittered(interval, 0.0, 0.9), interval);
        // Out of range: clamped, never negative nor past twice the interval.
        assert_eq!(jittered(interval, 0.2, 7.0), high);
        assert_eq!(jittered(interval, 5.0, 0.0), Duration::ZERO);
        assert_eq!(jittered(interval, f64::NAN, 0.3), interval);
    }

    #[test]
    fn bad_options_and_no_runtime_are_configuration_errors() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::new());
        for (purger, says) in [
            (Purger::new().interval(Duration::ZERO), "interval"),
            (Purger::new().batch(0), "batch"),
            (Purger::new().jitter(1.0), "jitter"),
            (Purger::new().jitter(f64::NAN), "jitter"),
            (Purger::new(), "tokio runtime"),
        ] {
            let err = purger.spawn_for(&store).expect_err("refused");
            assert!(matches!(err, Error::Config { .. }), "{err:?}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
