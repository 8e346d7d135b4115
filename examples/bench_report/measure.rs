//! What the Redis and PostgreSQL parts of section 3 share: the workload through a store given
//! as an argument, the constants, and the rate comparison against a raw client.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) use crate::{fresh_ids, verdict, Report};
pub(crate) use idem_support::workload::{compute, request, BenchError, ChargeRequest, Receipt};

/// How long the section's results are kept: they clean themselves up after the run.
pub(crate) const TTL: Duration = Duration::from_secs(600);
/// Calls per counted measurement.
pub(crate) const CALLS: u64 = 100;
/// Rounds per count (the smallest counts).
pub(crate) const ROUNDS: usize = 3;
/// Pairs of windows (idem, raw) per rate comparison.
pub(crate) const PAIRS: usize = 9;
/// One timed window of a rate measurement.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// Concurrent tasks of the concurrent rate measurements.
pub(crate) const TASKS: usize = 16;
/// The untimed start of each window.
pub(crate) const LEAD_IN: Duration = Duration::from_millis(40);
/// Upper bound on the calls of one task in one window, whatever the clock says.
const MAX_CALLS: u64 = 5_000_000;

pub(crate) type Res<T> = std::result::Result<T, String>;

/// The workload of section 1 through a store given as an argument.
#[idempotency::idempotent(name = "bench.charge", key = req.order_id, store = store, skip(store), ttl = TTL)]
pub(crate) async fn charge<S: idempotency::Store + Clone + 'static>(
    store: &S,
    req: ChargeRequest,
) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

/// One `#[idempotent]` call, its error as text.
pub(crate) async fn call<S: idempotency::Store + Clone + 'static>(
    store: &S,
    order_id: u64,
) -> Res<()> {
    let receipt = charge(store, request(order_id))
        .await
        .map_err(|e| format!("idem call failed: {e}"))?;
    std::hint::black_box(receipt);
    Ok(())
}

/// Indices handed to the measured calls: unique across all measurements of the run, so a
/// call meant to miss never meets an earlier call's record.
static NEXT_INDEX: AtomicU64 = AtomicU64::new(0);

/// Calls per second of `tasks` loops, each calling `f(task, index)` (a fresh index each
/// time): calls that end in the `window` after an untimed lead-in of [`LEAD_IN`], which
/// lets the machine settle on this side's connections and processes (without it, whichever
/// side had just run was up to twice as fast on a loaded 2-core machine). Stops at the first
/// error.
pub(crate) async fn rate<F, Fut>(tasks: usize, window: Duration, f: F) -> Res<f64>
where
    F: Fn(usize, u64) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let counted = Cell::new(0u64);
    let timed_from = Instant::now() + LEAD_IN;
    let deadline = timed_from + window;
    let (counted, f) = (&counted, &f);
    let loops = (0..tasks).map(|task| async move {
        let mut calls = 0u64;
        while Instant::now() < deadline && calls < MAX_CALLS {
            f(task, NEXT_INDEX.fetch_add(1, Ordering::Relaxed)).await?;
            calls += 1;
            if Instant::now() > timed_from {
                counted.set(counted.get() + 1);
            }
        }
        Res::Ok(())
    });
    for result in futures::future::join_all(loops).await {
        result?;
    }
    Ok(counted.get() as f64 / timed_from.elapsed().as_secs_f64())
}

/// Calls per second of idem and of the raw client in [`PAIRS`] pairs of back-to-back
/// windows (after a lead-in of each, which opens pooled connections and prepares
/// statements): the median rate of each side, and the median of the pairs' ratios, so a
/// burst of load elsewhere on the machine spoils a pair, not the result.
pub(crate) async fn versus<FI, FutI, FR, FutR>(tasks: usize, idem: FI, raw: FR) -> Res<Versus>
where
    FI: Fn(usize, u64) -> FutI,
    FutI: Future<Output = Res<()>>,
    FR: Fn(usize, u64) -> FutR,
    FutR: Future<Output = Res<()>>,
{
    rate(tasks, Duration::ZERO, &idem).await?;
    rate(tasks, Duration::ZERO, &raw).await?;
    let (mut idems, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        // Alternate which side goes first, so a drift of the machine favours neither.
        let (i, r) = if pair % 2 == 0 {
            let i = rate(tasks, WINDOW, &idem).await?;
            (i, rate(tasks, WINDOW, &raw).await?)
        } else {
            let r = rate(tasks, WINDOW, &raw).await?;
            (rate(tasks, WINDOW, &idem).await?, r)
        };
        idems.push(i);
        raws.push(r);
        ratios.push(i / r);
    }
    Ok(Versus {
        idem: median(idems),
        raw: median(raws),
        ratio: median(ratios),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
pub(crate) struct Versus {
    pub(crate) idem: f64,
    pub(crate) raw: f64,
    /// The median of the pairs' idem / raw.
    pub(crate) ratio: f64,
}

impl Versus {
    /// A row `label: idem/s  raw/s  ratio`, and the fields `<name>_per_sec`,
    /// `<name>_raw_per_sec`, `<name>_vs_raw_ratio`.
    pub(crate) fn report(self, r: &mut Report, label: &str, name: &str) {
        r.row(
            label,
            format!(
                "{:>9.0}/s   raw {:>9.0}/s   ratio {:.2}",
                self.idem, self.raw, self.ratio
            ),
        );
        r.field(&format!("{name}_per_sec"), self.idem);
        r.field(&format!("{name}_raw_per_sec"), self.raw);
        r.field(&format!("{name}_vs_raw_ratio"), self.ratio);
    }
}

/// Whether a measured per-call count is exactly `n`.
pub(crate) fn exactly(count: f64, n: f64) -> bool {
    (count - n).abs() < 1e-9
}

/// Runs `f` under a time limit, turning a timeout into an error.
pub(crate) async fn within<T>(limit: Duration, f: impl Future<Output = Res<T>>) -> Res<T> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(format!("did not finish within {limit:?}")))
}

/// A store's hits and misses per second against the raw client's, by one task and by [`TASKS`].
pub(crate) struct Rates {
    pub(crate) hit_1: Versus,
    pub(crate) hit_n: Versus,
    pub(crate) miss_1: Versus,
    pub(crate) miss_n: Versus,
}

impl Rates {
    /// Rows `<store> hits/s, 1 task vs <hits_vs>` (and misses, and by [`TASKS`] tasks) with the
    /// fields `<name>_hit`, `<name>_hit_<TASKS>_tasks`, `<name>_miss`, ..., then the target:
    /// hits at least 0.8x the raw client's rate, the worse of 1 and [`TASKS`] tasks
    /// (`<name>_vs_raw_ratio`).
    pub(crate) fn report(&self, r: &mut Report, store: &str, name: &str, vs: [&str; 2]) {
        let rows = [
            (self.hit_1, "hits", "hit", 1, vs[0]),
            (self.hit_n, "hits", "hit", TASKS, vs[0]),
            (self.miss_1, "misses", "miss", 1, vs[1]),
            (self.miss_n, "misses", "miss", TASKS, vs[1]),
        ];
        for (rate, what, field, tasks, vs) in rows {
            let (label, field) = match tasks {
                1 => (
                    format!("{store} {what}/s, 1 task vs {vs}"),
                    format!("{name}_{field}"),
                ),
                n => (
                    format!("{store} {what}/s, {n} tasks vs {vs}"),
                    format!("{name}_{field}_{n}_tasks"),
                ),
            };
            rate.report(r, &label, &field);
        }
        let ratio = self.hit_1.ratio.min(self.hit_n.ratio);
        r.field(&format!("{name}_vs_raw_ratio"), ratio);
        r.row(
            &format!("target: {store} hits ≥ 0.8× raw client rate"),
            format!(
                "{}   (worse of 1 and {TASKS} tasks: {ratio:.2})",
                verdict(ratio >= 0.8)
            ),
        );
    }
}
