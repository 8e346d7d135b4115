//! Once a body has started, it is never run again by accident: through `#[idempotent]`, on every
//! store (memory always; SQLite, Redis and PostgreSQL with their features, Redis and PostgreSQL
//! when reachable, required under `IDEM_REQUIRE_SERVICES=1`).
//!
//! - a detached body (it owns its data) runs to its end when the caller stops waiting, and its
//!   result is replayed; a retry meanwhile is `InFlight` or waits;
//! - a body that runs in place (it borrows) and is abandoned, or that panics, is an unknown
//!   outcome: refused (`OutcomeUnknown`) until the recovery window passes, or run again under
//!   `on_unknown = "rerun"`;
//! - a body that blocks its thread keeps its lease (renewed on a task of its own);
//! - a body whose claim was taken over is told (`context::current().is_lost()`), and its stale
//!   fencing token is refused by a resource that checks it;
//! - the waiters of a crashed holder get the result of the caller that takes over;
//! - a lease below `MIN_LEASE` is a configuration error, and nothing runs.
//!
//! Every ledger counts a body where it STARTS (its first line, before any `.await`), so a
//! duplicate caused by an interrupted body shows.
//!
//! ```text
//! cargo test --all-features --test started
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_support::AppError;
use idem_testkit::{Hooks, Intercept};
use idempotency::store::{Claim, FencingToken};
use idempotency::Operation;
use idempotency::{idempotent, Error, StorageKey, Store};
use tokio::sync::watch;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Fixtures: a fresh store of each backend, a ledger, a gate.

/// Instantiates every case as a test per backend: `memory::case`, `sqlite::case`, ..., each on
/// a store of its own (idem-support's, which removes its records when the test ends).
macro_rules! on_every_store {
    ($($(#[$attr:meta])* $case:ident),* $(,)?) => {
        on_every_store!(@on memory, all(), idem_support::memory(); $($(#[$attr])* $case),*);
        on_every_store!(@on sqlite, feature = "sqlite", idem_support::sqlite();
            $($(#[$attr])* $case),*);
        on_every_store!(@on redis, feature = "redis", idem_support::redis::fresh("idem-started");
            $($(#[$attr])* $case),*);
        on_every_store!(@on postgres, feature = "postgres",
            idem_support::postgres::fresh("started"); $($(#[$attr])* $case),*);
    };
    (@on $backend:ident, $cfg:meta, $fresh:expr; $($(#[$attr:meta])* $case:ident),*) => {
        #[cfg($cfg)]
        mod $backend {
            $(
                $(#[$attr])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(store) = $fresh.await {
                        super::$case(store).await;
                    }
                }
            )*
        }
    };
}

on_every_store!(
    a_detached_body_runs_to_its_end_after_the_caller_gives_up,
    an_abandoned_in_place_body_is_an_unknown_outcome_and_is_not_run_again,
    an_abandoned_in_place_body_runs_again_under_on_unknown_rerun,
    a_panic_after_the_side_effect_is_not_run_again,
    a_panic_runs_again_under_on_unknown_rerun,
    a_panic_runs_again_once_the_recovery_window_passed,
    a_body_that_blocks_its_thread_keeps_its_lease,
    a_body_is_told_its_claim_was_lost_and_skips_its_side_effect,
    #[cfg(feature = "postgres")]
    a_token_guarded_table_refuses_the_stale_holders_write,
    hundred_waiters_of_a_dead_holder_get_the_takers_result,
    a_lease_below_the_minimum_is_a_config_error_and_nothing_runs,
);

/// What the bodies of one test did, counted at their first line.
struct Ledger {
    /// Bodies started.
    starts: watch::Sender<usize>,
    /// Side effects performed (for bodies that may skip theirs).
    effects: AtomicUsize,
    /// Values the bodies returned, in order.
    values: Mutex<Vec<u64>>,
    /// `(token, takeover)` of each started body, from its call context.
    holders: Mutex<Vec<(FencingToken, bool)>>,
}

impl Ledger {
    fn new() -> Arc<Self> {
        Arc::new(Ledger {
            starts: watch::channel(0).0,
            effects: AtomicUsize::new(0),
            values: Mutex::default(),
            holders: Mutex::default(),
        })
    }

    /// The first line of every body, before any `.await`.
    fn start(&self) {
        self.starts.send_modify(|n| *n += 1);
        let call = idempotency::context::current().expect("a body runs inside its call's context");
        assert_eq!(idempotency::context::token(), Some(call.token()));
        assert_eq!(idempotency::context::token(), Some(call.token()));
        self.holders
            .lock()
            .unwrap()
            .push((call.token(), call.is_takeover()));
    }

    fn starts(&self) -> usize {
        *self.starts.borrow()
    }

    /// Waits until `n` bodies have started (at most 10 s).
    async fn started(&self, n: usize) {
        let mut rx = self.starts.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| *s >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} bodies did not start within 10 s"))
            .unwrap();
    }

    /// A new random value, recorded as a body's result.
    fn produce(&self) -> u64 {
        let v = rand::random();
        self.values.lock().unwrap().push(v);
        v
    }

    fn values(&self) -> Vec<u64> {
        self.values.lock().unwrap().clone()
    }

    fn holders(&self) -> Vec<(FencingToken, bool)> {
        self.holders.lock().unwrap().clone()
    }

    fn effects(&self) -> usize {
        self.effects.load(SeqCst)
    }
}

/// Holds bodies until the test opens it (at most 10 s, so that a body run by mistake ends the
/// test with a wrong count rather than a hang).
struct Gate(watch::Sender<bool>);

impl Gate {
    fn closed() -> Arc<Self> {
        Arc::new(Gate(watch::channel(false).0))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    async fn pass(&self) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|open| *open)).await;
    }
}

fn is_in_flight<T>(r: &Result<T, AppError>) -> bool {
    matches!(r, Err(AppError::Idem(Error::InFlight { .. })))
}

fn is_unknown<T>(r: &Result<T, AppError>) -> bool {
    matches!(r, Err(AppError::Idem(Error::OutcomeUnknown { .. })))
}

// ---------------------------------------------------------------------------------------------
// A detached body finishes when its caller gives up.

/// Owns all its data: runs on its own task (`Call::run_detached`).
#[idempotent(name = "started.detached", key = key, store = store.clone(), skip(store, ledger, gate))]
async fn detached_charge(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    gate.pass().await;
    Ok(ledger.produce())
}

/// The same record (name, key, fingerprint), waiting for a call in flight.
#[idempotent(name = "started.detached", key = key, store = store.clone(), skip(store, ledger, gate), on_conflict = "wait")]
async fn detached_charge_waiting(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    gate.pass().await;
    Ok(ledger.produce())
}

async fn a_detached_body_runs_to_its_end_after_the_caller_gives_up(store: Arc<dyn Store>) {
    let (ledger, gate) = (Ledger::new(), Gate::closed());
    let call = || {
        detached_charge(
            store.clone(),
            ledger.clone(),
            gate.clone(),
            "order-1".into(),
        )
    };
    let finished_before = idempotency::counters().finished_detached;

    // The body is held at the gate (it "takes 400 ms"); the caller gives up after 50 ms.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), call()).await;
    assert!(gave_up.is_err(), "the caller gave up: {gave_up:?}");
    ledger.started(1).await;

    // A retry while the body runs: in flight, not a second run.
    let retry = call().await;
    assert!(is_in_flight(&retry), "{retry:?}");
    // A waiting retry waits for the body and gets its result.
    let waiter = tokio::spawn(detached_charge_waiting(
        store.clone(),
        ledger.clone(),
        gate.clone(),
        "order-1".into(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "the waiter waits for the body");
    assert_eq!(ledger.starts(), 1);

    gate.open();
    let waited = waiter.await.unwrap().unwrap();
    let values = ledger.values();
    assert_eq!(values.len(), 1, "one body produced a value");
    assert_eq!(waited, values[0], "the waiter got the first run's value");
    assert_eq!(
        call().await.unwrap(),
        values[0],
        "a later retry replays the first run's value"
    );
    assert_eq!(ledger.starts(), 1, "one charge");
    assert!(idempotency::counters().finished_detached > finished_before);
}

// ---------------------------------------------------------------------------------------------
// A body that runs in place and is abandoned: its outcome is unknown.

struct Account {
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
}

impl Account {
    fn new(store: &Arc<dyn Store>) -> Self {
        Account {
            store: store.clone(),
            ledger: Ledger::new(),
            gate: Gate::closed(),
        }
    }

    /// Borrows `self`: runs in place.
    #[idempotent(name = "started.in_place", key = key, store = self.store.clone())]
    async fn charge(&self, key: &str) -> Result<u64, AppError> {
        self.ledger.start();
        self.gate.pass().await;
        Ok(self.ledger.produce())
    }

    /// The same record, waiting for the call in flight (here: for the unknown outcome to be
    /// recorded).
    #[idempotent(name = "started.in_place", key = key, store = self.store.clone(), on_conflict = "wait", wait = "10s")]
    async fn charge_waiting(&self, key: &str) -> Result<u64, AppError> {
        self.ledger.start();
        self.gate.pass().await;
        Ok(self.ledger.produce())
    }

    /// At least once: an unknown outcome releases the claim.
    #[idempotent(name = "started.in_place_rerun", key = key, store = self.store.clone(), on_unknown = "rerun", on_conflict = "wait", wait = "10s")]
    async fn charge_rerun(&self, key: &str) -> Result<u64, AppError> {
        self.ledger.start();
        self.gate.pass().await;
        Ok(self.ledger.produce())
    }
}

/// Borrows a parameter: runs in place.
#[idempotent(name = "started.borrowed_key", key = key, store = store.clone(), skip(store, ledger, gate), on_conflict = "wait", wait = "10s")]
async fn borrowed_key(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    key: &str,
) -> Result<u64, AppError> {
    ledger.start();
    gate.pass().await;
    Ok(ledger.produce())
}

/// Owns its data but opts out of running detached.
#[idempotent(name = "started.in_place_by_choice", key = key, store = store.clone(), skip(store, ledger, gate), detach = false, on_conflict = "wait", wait = "10s")]
async fn in_place_by_choice(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    gate.pass().await;
    Ok(ledger.produce())
}

/// Drives `call` until its body has started, then gives it 50 ms more under
/// `tokio::time::timeout`, which strikes while the body waits at its gate and drops the call:
/// a caller's timeout during the body, whatever the store's latency before it.
async fn abandon_once_started<F: std::future::Future>(call: F, ledger: &Ledger) {
    let mut call = std::pin::pin!(call);
    tokio::select! {
        _ = &mut call => panic!("the body is held at its gate, yet the call returned"),
        () = ledger.started(1) => {}
    }
    let gave_up = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(gave_up.is_err(), "the caller gave up while the body ran");
}

async fn an_abandoned_in_place_body_is_an_unknown_outcome_and_is_not_run_again(
    store: Arc<dyn Store>,
) {
    let unknown_before = idempotency::counters().unknown_outcomes;

    // `&self` method.
    let account = Account::new(&store);
    abandon_once_started(account.charge("order-2"), &account.ledger).await;
    // A waiting retry waits for the unknown outcome to be recorded, then is refused.
    let waited = account.charge_waiting("order-2").await;
    assert!(is_unknown(&waited), "{waited:?}");
    let retry = account.charge("order-2").await;
    match &retry {
        Err(AppError::Idem(Error::OutcomeUnknown { reason, .. })) => {
            assert!(reason.contains("abandoned"), "{reason}")
        }
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    account.gate.open();
    assert!(is_unknown(&account.charge("order-2").await));
    assert_eq!(account.ledger.starts(), 1, "&self: one charge");

    // `&str` parameter.
    let (ledger, gate) = (Ledger::new(), Gate::closed());
    let call = || borrowed_key(store.clone(), ledger.clone(), gate.clone(), "order-3");
    abandon_once_started(call(), &ledger).await;
    gate.open();
    let retry = call().await;
    assert!(is_unknown(&retry), "{retry:?}");
    assert!(is_unknown(&call().await));
    assert_eq!(ledger.starts(), 1, "&str: one charge");

    // Owned data with `detach = false`.
    let (ledger, gate) = (Ledger::new(), Gate::closed());
    let call = || {
        in_place_by_choice(
            store.clone(),
            ledger.clone(),
            gate.clone(),
            "order-4".into(),
        )
    };
    abandon_once_started(call(), &ledger).await;
    gate.open();
    let retry = call().await;
    assert!(is_unknown(&retry), "{retry:?}");
    assert_eq!(ledger.starts(), 1, "detach = false: one charge");

    assert!(idempotency::counters().unknown_outcomes >= unknown_before + 3);
}

async fn an_abandoned_in_place_body_runs_again_under_on_unknown_rerun(store: Arc<dyn Store>) {
    let account = Account::new(&store);
    abandon_once_started(account.charge_rerun("order-5"), &account.ledger).await;
    account.gate.open();
    // The claim is released: the retry runs the body again (at least once, as documented).
    let retry = account.charge_rerun("order-5").await.unwrap();
    assert_eq!(
        account.ledger.starts(),
        2,
        "two charges under at-least-once"
    );
    assert_eq!(
        account.ledger.values(),
        vec![retry],
        "only the rerun returned"
    );
    assert_eq!(account.charge_rerun("order-5").await.unwrap(), retry);
    assert_eq!(account.ledger.starts(), 2);
}

// ---------------------------------------------------------------------------------------------
// A panic after the side effect.

/// The body of the `panics_first*` functions: charges, then panics in its first run only.
fn panic_on_first_run(ledger: &Ledger) -> Result<u64, AppError> {
    ledger.start();
    if ledger.starts() == 1 {
        panic!("the first run panics after its side effect");
    }
    Ok(ledger.produce())
}

/// Panics in its first run, after the side effect; later runs succeed. Waits for a call in
/// flight, so that a retry sees what the panic left once it is recorded (it is recorded by a
/// task of its own).
#[idempotent(name = "started.panics_first", key = key, store = store.clone(), skip(store, ledger), on_conflict = "wait", wait = "10s")]
async fn panics_first(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    key: String,
) -> Result<u64, AppError> {
    panic_on_first_run(&ledger)
}

#[idempotent(name = "started.panics_first_rerun", key = key, store = store.clone(), skip(store, ledger), on_conflict = "wait", wait = "10s", on_unknown = "rerun")]
async fn panics_first_rerun(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    key: String,
) -> Result<u64, AppError> {
    panic_on_first_run(&ledger)
}

/// A recovery window of 2 s: the key is refused for 2 s, then runs again.
#[idempotent(name = "started.panics_first_recovering", key = key, store = store.clone(), skip(store, ledger), on_conflict = "wait", wait = "10s", recovery = "2s")]
async fn panics_first_recovering(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    key: String,
) -> Result<u64, AppError> {
    panic_on_first_run(&ledger)
}

/// Runs `call` on a task and checks that it panicked (the body's panic reaches the caller).
async fn expect_panic<F>(call: F)
where
    F: std::future::Future<Output = Result<u64, AppError>> + Send + 'static,
{
    let joined = tokio::spawn(call).await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_panic()),
        "the body's panic reaches the caller: {joined:?}"
    );
}

async fn a_panic_after_the_side_effect_is_not_run_again(store: Arc<dyn Store>) {
    let ledger = Ledger::new();
    let call = || panics_first(store.clone(), ledger.clone(), "order-6".into());
    expect_panic(call()).await;
    for _ in 0..3 {
        let retry = call().await;
        match &retry {
            Err(AppError::Idem(Error::OutcomeUnknown { reason, .. })) => {
                assert!(reason.contains("panicked"), "{reason}")
            }
            other => panic!("expected OutcomeUnknown, got {other:?}"),
        }
    }
    assert_eq!(ledger.starts(), 1, "one charge");
}

async fn a_panic_runs_again_under_on_unknown_rerun(store: Arc<dyn Store>) {
    let ledger = Ledger::new();
    let call = || panics_first_rerun(store.clone(), ledger.clone(), "order-7".into());
    expect_panic(call()).await;
    let retry = call().await.unwrap();
    assert_eq!(ledger.starts(), 2, "two charges under at-least-once");
    assert_eq!(call().await.unwrap(), retry, "then replayed");
    assert_eq!(ledger.starts(), 2);
}

async fn a_panic_runs_again_once_the_recovery_window_passed(store: Arc<dyn Store>) {
    let ledger = Ledger::new();
    let call = || panics_first_recovering(store.clone(), ledger.clone(), "order-8".into());
    expect_panic(call()).await;
    let panicked_at = Instant::now();
    let retry = call().await;
    assert!(
        is_unknown(&retry),
        "within the 2 s recovery window ({:?} after the panic): {retry:?}",
        panicked_at.elapsed()
    );
    assert_eq!(ledger.starts(), 1);
    // Past the window the key runs again (polled: the window is measured on the store's clock).
    tokio::time::sleep_until(panicked_at + Duration::from_secs(2)).await;
    let mut ran = None;
    for _ in 0..50 {
        match call().await {
            Ok(v) => {
                ran = Some(v);
                break;
            }
            Err(AppError::Idem(Error::OutcomeUnknown { .. })) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let ran = ran.expect("the key runs again within 5 s after the recovery window");
    assert_eq!(ledger.starts(), 2, "one run after the window");
    assert_eq!(call().await.unwrap(), ran, "and its result is replayed");
    assert_eq!(ledger.starts(), 2);
}

// ---------------------------------------------------------------------------------------------
// A body that blocks its thread keeps its lease.

#[idempotent(name = "started.blocks_its_thread", key = key, store = store.clone(), skip(store, ledger, done), lease = "1s")]
async fn blocks_its_thread(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    done: Arc<AtomicBool>,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    // Blocks a worker of the multi-thread runtime for 2.5 leases, as a synchronous client
    // would: the renewal runs on a task of its own, on another worker.
    std::thread::sleep(Duration::from_millis(2500));
    done.store(true, SeqCst);
    Ok(ledger.produce())
}

async fn a_body_that_blocks_its_thread_keeps_its_lease(store: Arc<dyn Store>) {
    let (ledger, done) = (Ledger::new(), Arc::new(AtomicBool::new(false)));
    let call = || {
        blocks_its_thread(
            store.clone(),
            ledger.clone(),
            done.clone(),
            "order-9".into(),
        )
    };
    let first = tokio::spawn(call());
    ledger.started(1).await;
    let started = Instant::now();
    // Past the 1 s lease, while the body still blocks: the claim is held, nobody takes over.
    let mut in_flight = 0;
    for at_ms in [1_200, 1_500, 1_800] {
        tokio::time::sleep_until(started + Duration::from_millis(at_ms)).await;
        let r = call().await;
        if is_in_flight(&r) {
            in_flight += 1;
        } else {
            // Only a very slow machine gets here: then the body must have ended.
            assert!(
                done.load(SeqCst) && r.is_ok(),
                "a caller {at_ms} ms into the block: {r:?}"
            );
        }
    }
    assert!(in_flight > 0, "callers during the block met the claim");
    let value = first.await.unwrap().unwrap();
    assert_eq!(call().await.unwrap(), value, "afterwards: the replay");
    assert_eq!(ledger.starts(), 1, "one charge");
    let takeovers: Vec<bool> = ledger.holders().iter().map(|h| h.1).collect();
    assert_eq!(takeovers, vec![false]);
}

// ---------------------------------------------------------------------------------------------
// A body is told when its claim is lost; fencing tokens increase between holders.

/// Hooks whose `renew` fails while `failing` is set, as during a network partition between the
/// holder and the store; everything else goes through.
#[derive(Clone)]
struct FailingRenew {
    failing: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Hooks for FailingRenew {
    async fn renew(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> idempotency::Result<()> {
        if self.failing.load(SeqCst) {
            return Err(Error::store("test", "renewal cut off from the store"));
        }
        inner.renew(key, token, lease).await
    }
}

/// `inner`, with renewals failing until told otherwise.
type FlakyRenew = Intercept<Arc<dyn Store>, FailingRenew>;

fn failing_renewals(inner: &Arc<dyn Store>) -> FlakyRenew {
    let failing = Arc::new(AtomicBool::new(true));
    Intercept::with_hooks(inner.clone(), FailingRenew { failing })
}

/// What the first holder of [`guarded`] saw: `(is_lost, check().is_ok())` before and after it
/// waited for its claim to be lost.
type Seen = Arc<Mutex<Vec<(bool, bool)>>>;

#[idempotent(name = "started.guarded", key = key, store = store.clone(), skip(store, ledger, seen), lease = "300ms")]
async fn guarded(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    seen: Seen,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    let call = idempotency::context::current().expect("inside a body");
    if ledger.starts() == 1 {
        // The first holder stalls (a slow dependency) until its claim is lost: by its own
        // deadline, since its renewals fail.
        seen.lock()
            .unwrap()
            .push((call.is_lost(), call.check().is_ok()));
        let _ = tokio::time::timeout(Duration::from_secs(10), call.lost()).await;
        seen.lock()
            .unwrap()
            .push((call.is_lost(), call.check().is_ok()));
    }
    // Right before the side effect: a holder whose claim was taken over stops here.
    call.check()?;
    ledger.effects.fetch_add(1, SeqCst);
    Ok(ledger.produce())
}

/// Calls `call` until it is not `InFlight` (at most 10 s): a caller retrying until the holder's
/// lease lapsed and it takes over.
async fn until_not_in_flight<F, Fut>(call: F) -> Result<u64, AppError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, AppError>>,
{
    for _ in 0..200 {
        let r = call().await;
        if !is_in_flight(&r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still in flight after 10 s");
}

async fn a_body_is_told_its_claim_was_lost_and_skips_its_side_effect(store: Arc<dyn Store>) {
    assert!(
        idempotency::context::current().is_none(),
        "no context outside a body"
    );
    assert!(idempotency::context::token().is_none());
    let flaky = failing_renewals(&store);
    let shared: Arc<dyn Store> = Arc::new(flaky.clone());
    let (ledger, seen): (_, Seen) = (Ledger::new(), Seen::default());
    let call = || {
        guarded(
            shared.clone(),
            ledger.clone(),
            seen.clone(),
            "order-10".into(),
        )
    };

    let first = tokio::spawn(call());
    ledger.started(1).await;
    // The first holder cannot renew: once its 300 ms lease lapsed by its own clock, it is told
    // and gives up without its side effect (its `Err` releases the claim if the store still
    // holds it); a second caller then runs (fresh, or taking the lapsed lease over).
    let second = until_not_in_flight(call).await.unwrap();
    assert_eq!(ledger.starts(), 2);
    assert_eq!(ledger.effects(), 1, "the taker did the side effect");
    // The first holder's renewals reach the store again: refused, and the body is told.
    flaky.hooks().failing.store(false, SeqCst);
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(AppError::Idem(Error::LeaseLost { .. }))),
        "{first:?}"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(false, true), (true, false)],
        "is_lost()/check() turned once the claim was lost"
    );
    assert_eq!(ledger.effects(), 1, "one effective charge");
    let holders = ledger.holders();
    assert_eq!(holders.len(), 2);
    assert!(!holders[0].1, "the first was a fresh claim: {holders:?}");
    assert!(
        holders[1].0 > holders[0].0,
        "fencing tokens increase between holders: {holders:?}"
    );
    assert_eq!(call().await.unwrap(), second, "the taker's result stands");
    assert_eq!(ledger.starts(), 2);
}

#[cfg(feature = "postgres")]
mod fenced {
    use super::*;
    use idempotency::postgres::tokio_postgres;

    /// Writes to a table that refuses a token older than one it has seen. The first holder
    /// stalls at the gate until the taker has written, then writes with its stale token.
    #[idempotent(name = "started.fenced_write", key = key, store = store.clone(), skip(store, ledger, gate, db, table), lease = "300ms")]
    pub async fn fenced_write(
        store: Arc<dyn Store>,
        ledger: Arc<Ledger>,
        gate: Arc<Gate>,
        db: Arc<tokio_postgres::Client>,
        table: String,
        key: String,
    ) -> Result<u64, AppError> {
        ledger.start();
        let call = idempotency::context::current().expect("inside a body");
        if !call.is_takeover() {
            gate.pass().await;
        }
        let token = i64::try_from(idempotency::context::token().expect("inside a body").0).unwrap();
        let rows = db
            .execute(
                &format!(
                    "UPDATE {table} SET fence = $2, charges = charges + 1 WHERE id = $1 AND fence < $2"
                ),
                &[&1i64, &token],
            )
            .await
            .map_err(|e| AppError::Transient(e.to_string()))?;
        ledger.effects.fetch_add(rows as usize, SeqCst);
        Ok(rows)
    }
}

#[cfg(feature = "postgres")]
async fn a_token_guarded_table_refuses_the_stale_holders_write(store: Arc<dyn Store>) {
    let Some(table) = idem_support::postgres::fresh_table("fence").await else {
        return;
    };
    let db = Arc::new(idem_support::postgres::admin().await.expect("connect"));
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, fence bigint NOT NULL, charges int NOT NULL);
         INSERT INTO {table} VALUES (1, 0, 0)"
    ))
    .await
    .unwrap();
    let flaky = failing_renewals(&store);
    let shared: Arc<dyn Store> = Arc::new(flaky);
    let (ledger, gate) = (Ledger::new(), Gate::closed());
    let call = || {
        fenced::fenced_write(
            shared.clone(),
            ledger.clone(),
            gate.clone(),
            db.clone(),
            table.clone(),
            "order-11".into(),
        )
    };

    let first = tokio::spawn(call());
    ledger.started(1).await;
    // The first holder cannot renew; once its lease lapsed a second caller takes over, writes.
    assert_eq!(
        until_not_in_flight(call).await.unwrap(),
        1,
        "the taker wrote"
    );
    // The stalled holder goes on, unaware, and writes with its older token: refused.
    gate.open();
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(AppError::Idem(Error::LeaseLost { .. }))),
        "{first:?}"
    );
    let holders = ledger.holders();
    assert_eq!(holders.len(), 2);
    assert!(holders[1].0 > holders[0].0, "{holders:?}");
    assert_eq!(ledger.effects(), 1, "one effective charge");
    let row = db
        .query_one(
            &format!("SELECT fence, charges FROM {table} WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    let (fence, charges): (i64, i32) = (row.get(0), row.get(1));
    assert_eq!(charges, 1, "one charge in the table");
    assert_eq!(fence as u64, holders[1].0 .0, "the taker's token stands");
    assert_eq!(call().await.unwrap(), 1, "the taker's result is replayed");
    assert_eq!(ledger.starts(), 2);
}

// ---------------------------------------------------------------------------------------------
// The waiters of a dead holder.

const DEAD_HOLDER_SCOPE: &str = "started::dead_holder";

/// Waits without `wait = `: `default_wait(1s)` = 3 s, time for the dead holder's lease to end
/// and for a taker to run.
#[idempotent(name = "started.dead_holder", scope = DEAD_HOLDER_SCOPE, key = key, store = store.clone(), skip(store, ledger), on_conflict = "wait", lease = "1s")]
async fn waits_for_a_dead_holder(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(ledger.produce())
}

async fn hundred_waiters_of_a_dead_holder_get_the_takers_result(store: Arc<dyn Store>) {
    let key = "order-12";
    // The SIGKILLed holder: claimed with a 1 s lease, then never renewed, completed or released.
    let storage_key = StorageKey::derive_for(
        &Operation::named("started.dead_holder"),
        DEAD_HOLDER_SCOPE,
        key,
    )
    .unwrap();
    let claim = store
        .claim(&storage_key, None, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }), "{claim:?}");
    let ledger = Ledger::new();
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(waits_for_a_dead_holder(
                store.clone(),
                ledger.clone(),
                key.into(),
            ))
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in waiters {
        outcomes.push(w.await.unwrap());
    }
    let timeouts = outcomes
        .iter()
        .filter(|o| matches!(o, Err(AppError::Idem(Error::WaitTimeout { .. }))))
        .count();
    assert_eq!(timeouts, 0, "no waiter timed out");
    assert_eq!(ledger.starts(), 1, "one charge");
    let value = ledger.values()[0];
    for o in &outcomes {
        assert_eq!(
            o.as_ref().unwrap(),
            &value,
            "every waiter got the taker's result"
        );
    }
    assert!(ledger.holders()[0].1, "the one run took the key over");
}

// ---------------------------------------------------------------------------------------------
// A lease below the minimum.

const WITH_LEASE_SCOPE: &str = "started::with_lease";

#[idempotent(name = "started.with_lease", scope = WITH_LEASE_SCOPE, key = key, store = store.clone(), skip(store, ledger, lease_ms), lease = Duration::from_millis(lease_ms))]
async fn with_lease(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    lease_ms: u64,
    key: String,
) -> Result<u64, AppError> {
    ledger.start();
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(ledger.produce())
}

async fn a_lease_below_the_minimum_is_a_config_error_and_nothing_runs(store: Arc<dyn Store>) {
    assert_eq!(idempotency::MIN_LEASE, Duration::from_millis(100));
    for lease_ms in [0, 1] {
        let key = format!("order-13-{lease_ms}");
        let ledger = Ledger::new();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                tokio::spawn(with_lease(
                    store.clone(),
                    ledger.clone(),
                    lease_ms,
                    key.clone(),
                ))
            })
            .collect();
        for c in callers {
            match c.await.unwrap() {
                Err(AppError::Idem(Error::Config { reason })) => {
                    assert!(reason.contains("minimum"), "{reason}")
                }
                other => panic!("lease {lease_ms} ms: expected Error::Config, got {other:?}"),
            }
        }
        assert_eq!(ledger.starts(), 0, "lease {lease_ms} ms: no body ran");
        let storage_key = StorageKey::derive_for(
            &Operation::named("started.with_lease"),
            WITH_LEASE_SCOPE,
            &key,
        )
        .unwrap();
        assert_eq!(
            store.get(&storage_key).await.unwrap(),
            None,
            "lease {lease_ms} ms: nothing was claimed"
        );
    }
    // The minimum itself is accepted, and 20 callers run the body once.
    let ledger = Ledger::new();
    let callers: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(with_lease(
                store.clone(),
                ledger.clone(),
                100,
                "order-13-min".into(),
            ))
        })
        .collect();
    for c in callers {
        let r = c.await.unwrap();
        assert!(r.is_ok() || is_in_flight(&r), "{r:?}");
    }
    assert_eq!(ledger.starts(), 1, "lease 100 ms: one run");
}
