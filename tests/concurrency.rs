//! Exactly once under concurrency; a panicking or dropped call (an unknown outcome, or a detached
//! body that finishes by itself); lease takeover, renewal and fencing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_support::AppError;
use idempotency::Operation;
use idempotency::{idempotent, Error, MemoryStore, StorageKey, Store};

/// Counts body runs per key.
#[derive(Default)]
struct Ledger(Mutex<HashMap<u32, usize>>);

impl Ledger {
    fn record(&self, key: u32) {
        *self.0.lock().unwrap().entry(key).or_default() += 1;
    }
    fn runs(&self, key: u32) -> usize {
        self.0.lock().unwrap().get(&key).copied().unwrap_or(0)
    }
}

#[idempotent(key = key, store = store.clone(), skip(store, ledger), on_conflict = "wait", wait = "20s")]
async fn waiting(store: Arc<MemoryStore>, ledger: Arc<Ledger>, key: u32) -> Result<u64, AppError> {
    ledger.record(key);
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(rand::random())
}

#[idempotent(key = key, store = store.clone(), skip(store, ledger))]
async fn rejecting(
    store: Arc<MemoryStore>,
    ledger: Arc<Ledger>,
    key: u32,
) -> Result<u64, AppError> {
    ledger.record(key);
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(rand::random())
}

const CALLS: u32 = 1_000;
const KEYS: u32 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_waiting_callers_over_fifty_keys_run_each_body_once() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Arc::new(Ledger::default());
    let tasks: Vec<_> = (0..CALLS)
        .map(|i| {
            let (store, ledger) = (store.clone(), ledger.clone());
            tokio::spawn(async move { (i % KEYS, waiting(store, ledger, i % KEYS).await.unwrap()) })
        })
        .collect();
    let mut values: HashMap<u32, u64> = HashMap::new();
    for t in tasks {
        let (key, value) = t.await.unwrap();
        let first = *values.entry(key).or_insert(value);
        assert_eq!(
            first, value,
            "every caller of key {key} gets the first caller's value"
        );
    }
    for key in 0..KEYS {
        assert_eq!(ledger.runs(key), 1, "key {key}");
    }
    assert_eq!(values.len(), KEYS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_rejecting_callers_get_in_flight_or_the_replay_never_a_second_run() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Arc::new(Ledger::default());
    let tasks: Vec<_> = (0..CALLS)
        .map(|i| {
            let (store, ledger) = (store.clone(), ledger.clone());
            tokio::spawn(async move { (i % KEYS, rejecting(store, ledger, i % KEYS).await) })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let mut in_flight = 0;
    for key in 0..KEYS {
        assert_eq!(ledger.runs(key), 1, "key {key}");
        // The one stored value per key, read back after the run.
        let stored = rejecting(store.clone(), ledger.clone(), key).await.unwrap();
        for (_, outcome) in outcomes.iter().filter(|(k, _)| *k == key) {
            match outcome {
                Ok(v) => assert_eq!(*v, stored),
                Err(AppError::Idem(Error::InFlight { .. })) => in_flight += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(
        ledger.0.lock().unwrap().values().sum::<usize>(),
        KEYS as usize
    );
    assert!(
        in_flight > 0,
        "with 20 ms bodies some callers must have met a claim in flight"
    );
}

static PANIC_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Waits for a call in flight, so that the retry sees what the panic left once it is recorded
/// (on a task of its own).
#[idempotent(key = "boom", store = store.clone(), skip(store), lease = "60s", on_conflict = "wait", wait = "10s")]
async fn panics_first(store: Arc<MemoryStore>) -> Result<u32, AppError> {
    panic_on_first_run(&PANIC_RUNS)
}

/// The body of the `panics_first*` functions: counts its run in `runs`, panics in the first.
fn panic_on_first_run(runs: &AtomicUsize) -> Result<u32, AppError> {
    if runs.fetch_add(1, SeqCst) == 0 {
        panic!("the first run panics");
    }
    Ok(7)
}

#[tokio::test]
async fn a_panicking_body_is_an_unknown_outcome_and_is_not_run_again() {
    let store = Arc::new(MemoryStore::new());
    let joined = tokio::spawn(panics_first(store.clone())).await;
    assert!(joined.unwrap_err().is_panic());
    // At most once: the panic may have come after the side effect, so the key is refused
    // (until the recovery window, by default the ttl, passes) rather than run again.
    for _ in 0..3 {
        let err = panics_first(store.clone()).await.unwrap_err();
        assert!(
            matches!(err.idem(), Some(Error::OutcomeUnknown { reason, .. }) if reason.contains("panicked")),
            "{err:?}"
        );
    }
    assert_eq!(PANIC_RUNS.load(SeqCst), 1);
}

static RERUN_PANIC_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = "boom", store = store.clone(), skip(store), lease = "60s", on_unknown = "rerun", on_conflict = "wait", wait = "10s")]
async fn panics_first_rerun(store: Arc<MemoryStore>) -> Result<u32, AppError> {
    panic_on_first_run(&RERUN_PANIC_RUNS)
}

#[tokio::test]
async fn a_panicking_body_under_on_unknown_rerun_releases_the_claim_at_once() {
    let store = Arc::new(MemoryStore::new());
    let joined = tokio::spawn(panics_first_rerun(store.clone())).await;
    assert!(joined.unwrap_err().is_panic());
    // At least once: the lease is 60 s, and the retry (10 s wait at most) runs as soon as the
    // claim is released.
    assert_eq!(panics_first_rerun(store.clone()).await.unwrap(), 7);
    assert_eq!(RERUN_PANIC_RUNS.load(SeqCst), 2);
}

/// Owns its data: runs detached, so it finishes when its caller stops waiting. Named, so that
/// `slow_once_waiting` shares its records.
#[idempotent(name = "concurrency.slow", key = "slow", store = store.clone(), skip(store, ledger), lease = "60s")]
async fn slow_once(
    store: Arc<MemoryStore>,
    ledger: Arc<Ledger>,
    delay_ms: u64,
) -> Result<u32, AppError> {
    ledger.record(0);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    Ok(1)
}

#[idempotent(name = "concurrency.slow", key = "slow", store = store.clone(), skip(store, ledger), lease = "60s", on_conflict = "wait", wait = "10s")]
async fn slow_once_waiting(
    store: Arc<MemoryStore>,
    ledger: Arc<Ledger>,
    delay_ms: u64,
) -> Result<u32, AppError> {
    ledger.record(0);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    Ok(2)
}

#[tokio::test]
async fn a_dropped_detached_call_keeps_its_claim_and_its_body_finishes() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Arc::new(Ledger::default());
    let timed_out = tokio::time::timeout(
        Duration::from_millis(20),
        slow_once(store.clone(), ledger.clone(), 400),
    )
    .await;
    assert!(timed_out.is_err(), "the caller stopped waiting");
    // Same arguments (they are fingerprinted), so the retry reuses the key legally. The body
    // still runs: the retry is rejected, not run.
    let err = slow_once(store.clone(), ledger.clone(), 400)
        .await
        .unwrap_err();
    assert!(
        matches!(err.idem(), Some(Error::InFlight { .. })),
        "{err:?}"
    );
    // A waiting retry gets the abandoned call's result (1), not a run of its own (2).
    assert_eq!(
        slow_once_waiting(store.clone(), ledger.clone(), 400)
            .await
            .unwrap(),
        1
    );
    assert_eq!(ledger.runs(0), 1, "one run, finished by itself");
}

/// Borrows its ledger: runs in place, so it stops when its caller stops waiting.
#[idempotent(key = "slow-in-place", store = store.clone(), skip(store, ledger, delay_ms), lease = "60s", on_conflict = "wait", wait = "10s")]
async fn slow_in_place(
    store: Arc<MemoryStore>,
    ledger: &Ledger,
    delay_ms: u64,
) -> Result<u32, AppError> {
    ledger.record(0);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    Ok(1)
}

#[idempotent(key = "slow-in-place", store = store.clone(), skip(store, ledger, delay_ms), lease = "60s", on_unknown = "rerun")]
async fn slow_in_place_rerun(
    store: Arc<MemoryStore>,
    ledger: &Ledger,
    delay_ms: u64,
) -> Result<u32, AppError> {
    ledger.record(0);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    Ok(1)
}

#[tokio::test]
async fn a_dropped_in_place_call_is_an_unknown_outcome() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Ledger::default();
    let timed_out = tokio::time::timeout(
        Duration::from_millis(50),
        slow_in_place(store.clone(), &ledger, 10_000),
    )
    .await;
    assert!(timed_out.is_err(), "the call was cancelled by the timeout");
    assert_eq!(ledger.runs(0), 1, "the body started before the timeout");
    // The body stopped at its `.await`, halfway: the retry (waiting for the record of that)
    // is refused rather than run.
    let err = slow_in_place(store.clone(), &ledger, 10_000)
        .await
        .unwrap_err();
    assert!(
        matches!(err.idem(), Some(Error::OutcomeUnknown { reason, .. }) if reason.contains("abandoned")),
        "{err:?}"
    );
    assert_eq!(ledger.runs(0), 1);
}

#[tokio::test]
async fn a_dropped_in_place_call_under_on_unknown_rerun_releases_the_claim_at_once() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Ledger::default();
    let timed_out = tokio::time::timeout(
        Duration::from_millis(50),
        slow_in_place_rerun(store.clone(), &ledger, 10_000),
    )
    .await;
    assert!(timed_out.is_err(), "the call was cancelled by the timeout");
    assert_eq!(ledger.runs(0), 1);
    // The claim is released in the background: the retry claims it and runs, without waiting
    // out the 60 s lease (polled, 2 s at most).
    let mut ran = false;
    for _ in 0..100 {
        match slow_in_place_rerun(store.clone(), &ledger, 0).await {
            Ok(1) => {
                ran = true;
                break;
            }
            Err(AppError::Idem(Error::InFlight { .. })) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(ran, "the retry ran without waiting out the 60 s lease");
    assert_eq!(ledger.runs(0), 2, "at least once: the body ran again");
}

#[idempotent(name = "concurrency.after_crash", scope = "concurrency", key = "takeover", store = store.clone(), skip(store), lease = "100ms")]
async fn after_crash(store: Arc<MemoryStore>) -> Result<String, AppError> {
    Ok("recovered".into())
}

#[tokio::test]
async fn an_expired_claim_is_taken_over() {
    let store = Arc::new(MemoryStore::new());
    // A "crashed" holder: claims and never completes, releases or renews.
    let key = StorageKey::derive_for(
        &Operation::named("concurrency.after_crash"),
        "concurrency",
        "takeover",
    )
    .unwrap();
    let fp = idem_runtime::fingerprint::FingerprintBuilder::new().finish();
    let claim = store
        .claim(&key, Some(&fp), Duration::from_millis(100))
        .await
        .unwrap();
    let idempotency::store::Claim::Acquired { token: stale, .. } = claim else {
        panic!("{claim:?}")
    };
    assert!(matches!(
        after_crash(store.clone()).await.unwrap_err().idem(),
        Some(Error::InFlight { .. })
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(after_crash(store.clone()).await.unwrap(), "recovered");
    // The crashed holder wakes up: its token is stale, nothing is overwritten.
    assert!(matches!(
        store
            .complete(&key, stale, b"late", Duration::from_secs(60))
            .await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store.release(&key, stale).await,
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(after_crash(store.clone()).await.unwrap(), "recovered");
}

#[tokio::test]
async fn a_long_body_keeps_its_lease_renewed() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Arc::new(Ledger::default());
    #[idempotent(key = "long", store = store.clone(), skip(store, ledger), lease = "100ms")]
    async fn long(store: Arc<MemoryStore>, ledger: Arc<Ledger>) -> Result<u32, AppError> {
        ledger.record(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(1)
    }
    let first = tokio::spawn(long(store.clone(), ledger.clone()));
    // Five leases later the first call still holds the key: a second caller is rejected.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(90)).await;
        let err = long(store.clone(), ledger.clone()).await.unwrap_err();
        assert!(
            matches!(err.idem(), Some(Error::InFlight { .. })),
            "{err:?}"
        );
    }
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(ledger.runs(0), 1);
}

#[idempotent(name = "concurrency.fenced", scope = "concurrency", key = "fenced", store = store.clone(), skip(store, block_ms), lease = "100ms")]
async fn fenced(store: Arc<MemoryStore>, who: String, block_ms: u64) -> Result<String, AppError> {
    // On a current-thread runtime, blocking its only thread starves the renewal task too, as a
    // stalled (or SIGSTOPped) process would.
    std::thread::sleep(Duration::from_millis(block_ms));
    Ok(who)
}

#[test]
fn a_stalled_holder_gets_lease_lost_and_the_newer_result_stands() {
    let store = Arc::new(MemoryStore::new());
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let s = store.clone();
    // `who` is fingerprinted, so both callers pass the same `who` to reuse the key legally;
    // the result tells which body's value was stored.
    let stalled = std::thread::spawn(move || rt().block_on(fenced(s, "w".into(), 400)));
    std::thread::sleep(Duration::from_millis(200));
    let s = store.clone();
    let newer = std::thread::spawn(move || rt().block_on(fenced(s, "w".into(), 0)));
    assert_eq!(newer.join().unwrap().unwrap(), "w");
    let err = stalled.join().unwrap().unwrap_err();
    assert!(
        matches!(err.idem(), Some(Error::LeaseLost { .. })),
        "{err:?}"
    );
    let key = StorageKey::derive_for(
        &Operation::named("concurrency.fenced"),
        "concurrency",
        "fenced",
    )
    .unwrap();
    let rec = rt().block_on(store.get(&key)).unwrap().unwrap();
    let idempotency::store::RecordState::Completed { token, record } = rec.state else {
        panic!()
    };
    let decoded = idem_runtime::record::Record::decode(&record).unwrap();
    assert_eq!(decoded.token, token.0, "the record is the newer holder's");
    assert!(token.0 >= 2, "the newer claim has a larger fencing token");
}
