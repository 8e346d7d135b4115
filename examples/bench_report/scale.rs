//! Section 4: the memory store at scale.
//!
//! - First requests while the store fills from 0 to 1M records: `#[idempotent]` calls of fresh
//!   keys, their rate over each 100k, and the last 100k's rate against the first 100k's (it must
//!   stay flat: at least [`FLATNESS_TARGET`]). Rates are per second of this thread's CPU time, so
//!   that other processes on the machine do not count; the time includes the kernel's, where the
//!   page faults of a growing table are.
//! - Resident memory per record at 1M records, filled with the store's claim and complete alone
//!   (whose rate over each 100k is reported too: the store without the engine around it).
//! - `purge_expired` against expired and live records. The records to purge expire only once the
//!   fill is done (tokio's clock stands still during it, then moves past their ttl): no claim
//!   of the fill finds one due and sweeps it, so the purge removes them all, which is checked.

use std::hint::black_box;
use std::time::{Duration, Instant};

use idem_support::workload::{compute, request, unbounded_memory_store, BenchError};
use idem_support::workload::{ChargeRequest, Receipt};
use idempotency::store::Claim;
use idempotency::{Fingerprint, MemoryStore, StorageKey, Store};

use crate::{verdict, Report};

/// Records the store holds at the end of a fill.
const RECORDS: u64 = 1_000_000;
/// Records per window of a fill's rate.
const WINDOW: u64 = 100_000;
/// The last window's first-request rate against the first window's: at least this.
const FLATNESS_TARGET: f64 = 0.9;
/// How long the fills' records (and the purge rows' live ones) are kept: longer than the run.
const LONG_TTL: Duration = Duration::from_secs(3600);
/// The ttl of the records the purge rows remove.
const SHORT_TTL: Duration = Duration::from_millis(1);

/// The workload of section 1 on a store given as an argument.
#[idempotency::idempotent(name = "bench.scale", key = req.order_id, store = store, skip(store), ttl = LONG_TTL)]
async fn charge(store: &MemoryStore, req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The CPU time this thread has used, user and kernel.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write; the clock id is a constant.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    assert!(ok, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A record of the workload's size: the envelope around a ~200-byte receipt.
fn sample_record(token: u64) -> Vec<u8> {
    let payload = serde_json::to_vec(&compute(&request(token))).unwrap();
    idem_runtime::record::Record {
        outcome: idem_runtime::record::Outcome::Ok,
        fingerprint: Some(Fingerprint([7; 32])),
        token,
        completed_at_ms: 0,
        ttl_ms: 86_400_000,
        type_name: std::any::type_name::<Receipt>(),
        operation: "",
        result_version: 0,
        payload: &payload,
    }
    .encode()
}

/// Claims and completes `n` fresh keys from `from`, each completed with `ttl`.
async fn fill(store: &MemoryStore, from: u64, n: u64, ttl: Duration) {
    let fp = Fingerprint([7; 32]);
    for i in from..from + n {
        let key = StorageKey::derive("bench", &i).unwrap();
        let Claim::Acquired { token, .. } = store
            .claim(&key, Some(&fp), Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("fresh key")
        };
        store
            .complete(&key, token, &sample_record(token.0), ttl)
            .await
            .unwrap();
    }
}

/// Calls per CPU second of each window of [`WINDOW`] calls of `window(from)`, which makes the
/// calls `from..from + WINDOW`, up to [`RECORDS`].
async fn windows<F, Fut>(mut window: F) -> Vec<f64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut rates = Vec::new();
    for w in 0..RECORDS / WINDOW {
        let start = thread_cpu_time();
        window(w * WINDOW).await;
        rates.push(WINDOW as f64 / (thread_cpu_time() - start).as_secs_f64());
    }
    rates
}

/// `139k 141k ...`: rates in thousands per second.
fn thousands(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{:.0}k", r / 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) async fn section(r: &mut Report) {
    r.section("4. scale: memory store");
    // First, on a heap that has not held a million records yet: a heap that has holds free
    // chunks of every size, and the allocator's coalescing of them (glibc's `unlink_chunk`)
    // then costs the fill's last 100k some 10 %, which is no part of the store's rate.
    first_requests(r).await;
    // The free pages of the heap go back to the kernel, so that the next fill's resident
    // memory grows by what it takes.
    // SAFETY: malloc_trim only hands free memory of glibc's heap back to the kernel.
    unsafe { libc::malloc_trim(0) };
    memory_per_record(r).await;
    purge(r).await;
}

/// First requests through `#[idempotent]` while the store fills to [`RECORDS`].
async fn first_requests(r: &mut Report) {
    // Warm up on a store of its own: the fill's store starts empty.
    let warm = unbounded_memory_store();
    for id in 0..1000 {
        black_box(charge(&warm, request(id)).await.unwrap());
    }
    drop(warm);
    let store = unbounded_memory_store();
    let started = Instant::now();
    let rates = windows(|from| {
        let store = &store;
        async move {
            for id in from..from + WINDOW {
                black_box(charge(store, request(id)).await.unwrap());
            }
        }
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(store.len() as u64, RECORDS, "every call a first request");
    drop(store);
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    r.row(
        "first requests/s (#[idempotent]) by 100k records, 0 to 1M",
        thousands(&rates),
    );
    r.row(
        "first-request rate, last 100k / first 100k",
        format!(
            "{:>9.2}     ({first:.0}/s, then {last:.0}/s per CPU second; {secs:.1} s)",
            last / first
        ),
    );
    r.row(
        &format!("target: last 100k's rate ≥ {FLATNESS_TARGET} x the first's"),
        verdict(last / first >= FLATNESS_TARGET),
    );
    r.field("memory_first_rate_first_window", first);
    r.field("memory_first_rate_last_window", last);
    r.field("memory_first_rate_flatness", last / first);
}

/// Resident memory per record at [`RECORDS`] records, filled by the store's claim and complete.
async fn memory_per_record(r: &mut Report) {
    let store = unbounded_memory_store();
    let before = rss_bytes();
    let start = Instant::now();
    let rates = windows(|from| fill(&store, from, WINDOW, LONG_TTL)).await;
    let fill_secs = start.elapsed().as_secs_f64();
    let per_record = (rss_bytes().saturating_sub(before)) as f64 / RECORDS as f64;
    drop(store);
    let record_len = sample_record(1).len();
    r.row(
        "resident memory per record at 1M records",
        format!(
            "{per_record:>9.0} B   (record bytes {record_len}, {:.1}x)",
            per_record / record_len as f64
        ),
    );
    r.row(
        "filling 1M records (claim + complete)",
        format!("{:>9.2} s", fill_secs),
    );
    let flatness = rates[rates.len() - 1] / rates[0];
    r.row(
        "claim + complete/s by 100k records (the store alone)",
        format!("{}   last / first {flatness:.2}", thousands(&rates)),
    );
    r.field("memory_bytes_per_record", per_record);
    r.field("memory_record_payload_bytes", record_len as f64);
    r.field("memory_store_fill_flatness", flatness);
}

/// `purge_expired` against expired and live records: its time should follow the expired.
async fn purge(r: &mut Report) {
    let mut rows = Vec::new();
    for (expired, live) in [(10_000u64, 0u64), (10_000, 200_000), (100_000, 200_000)] {
        let store = unbounded_memory_store();
        // The store reads tokio's clock: stopped, no record of the fill is due before the fill
        // is done, so no claim of the fill sweeps one; then it moves past their ttl.
        tokio::time::pause();
        fill(&store, 0, live, LONG_TTL).await;
        fill(&store, live, expired, SHORT_TTL).await;
        tokio::time::advance(SHORT_TTL + Duration::from_millis(1)).await;
        tokio::time::resume();
        assert_eq!(store.len() as u64, live + expired, "nothing swept before");
        let start = Instant::now();
        let removed = store.purge_expired().await.unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(removed, expired, "the purge removes every expired record");
        assert_eq!(store.len() as u64, live);
        rows.push((expired, live, secs));
    }
    let base = rows[0].2;
    for (expired, live, secs) in &rows {
        r.row(
            &format!("purge_expired: {expired:>7} expired, {live:>7} live"),
            format!(
                "{:>9.2} ms   {:.1}x the first row",
                secs * 1000.0,
                secs / base
            ),
        );
        r.field(
            &format!("purge_{expired}_expired_{live}_live_ms"),
            secs * 1000.0,
        );
    }
    r.row(
        "target: purge time proportional to expired, not all",
        verdict(rows[1].2 < 3.0 * rows[0].2 && rows[2].2 > 3.0 * rows[1].2),
    );
}
