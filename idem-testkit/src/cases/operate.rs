//! The cases of the operator's methods: [`Store::forget`] (removing one record, so the next
//! call runs again, with the holder of a forgotten claim fenced off) and [`Store::scan`]
//! (listing what [`Store::get`] would report).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use idem_runtime::{
    Error, ErrorPolicy, FencingToken, Forgotten, OnConflict, RecordState, RecordSummary,
    StorageKey, Store,
};

use super::{acquire, call, completed, is_lease_lost, record, LONG, PAST_LEASE, SHORT};
use crate::unique;

/// The token of the record under `key`, which must exist.
async fn token_of(store: &dyn Store, key: &StorageKey) -> FencingToken {
    match store.get(key).await.unwrap().map(|r| r.state) {
        Some(RecordState::InFlight { token } | RecordState::Completed { token, .. }) => token,
        None => panic!("no record under {key}"),
    }
}

/// `stale`'s `complete`, `renew` and `release` of `key` all fail with `LeaseLost`.
async fn assert_fenced(store: &dyn Store, key: &StorageKey, stale: FencingToken, when: &str) {
    let bytes = record(stale.0, "1", "u32");
    assert!(
        is_lease_lost(&store.complete(key, stale, &bytes, LONG).await),
        "{when}: the forgotten holder's complete is fenced off"
    );
    assert!(
        is_lease_lost(&store.renew(key, stale, LONG).await),
        "{when}: the forgotten holder's renew is fenced off"
    );
    assert!(
        is_lease_lost(&store.release(key, stale).await),
        "{when}: the forgotten holder's release is fenced off"
    );
}

/// Forgetting a completed record reports its token and removes it: the next call runs its body
/// again (with a newer token), whose result is then replayed; a second forget finds nothing.
pub async fn forget_completed_runs_the_body_again(store: Arc<dyn Store>, _: bool) {
    let key = unique("forget-done");
    let runs = AtomicUsize::new(0);
    let go = || {
        call(&store, &key).run(ErrorPolicy::never(), async {
            runs.fetch_add(1, SeqCst);
            Ok::<u32, Error>(7)
        })
    };
    assert_eq!(go().await.unwrap(), 7);
    assert_eq!(go().await.unwrap(), 7);
    assert_eq!(runs.load(SeqCst), 1, "replayed before the forget");
    let token = token_of(&*store, &key).await;
    assert_eq!(
        store.forget(&key, false).await.unwrap(),
        Forgotten::Completed { token }
    );
    assert_eq!(store.get(&key).await.unwrap(), None, "the record is gone");
    assert_eq!(
        store.forget(&key, false).await.unwrap(),
        Forgotten::Absent,
        "nothing is left to forget"
    );
    assert_eq!(go().await.unwrap(), 7);
    assert_eq!(runs.load(SeqCst), 2, "the body runs again after the forget");
    let again = token_of(&*store, &key).await;
    assert!(
        again > token,
        "a new claim gets a newer token: {again:?} after {token:?}"
    );
    assert_eq!(go().await.unwrap(), 7);
    assert_eq!(runs.load(SeqCst), 2, "the new result is replayed");
}

/// A claim in flight, its lease live or ended (nobody took over), is not forgotten without
/// `force`: `InFlight` naming the key, and the record stays its holder's. Forced, it is removed.
pub async fn forget_in_flight_is_refused_unless_forced(store: Arc<dyn Store>, _: bool) {
    let key = unique("forget-live");
    let held = FencingToken(acquire(&*store, &key, LONG).await);
    match store.forget(&key, false).await {
        Err(Error::InFlight { key: Some(named) }) => assert_eq!(named, key),
        other => panic!("expected InFlight naming the key, got {other:?}"),
    }
    assert_eq!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(RecordState::InFlight { token: held }),
        "a refused forget leaves the record"
    );
    store.renew(&key, held, LONG).await.unwrap();
    let ended = unique("forget-ended");
    let ended_token = FencingToken(acquire(&*store, &ended, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    let refused = store.forget(&ended, false).await;
    assert!(
        matches!(refused, Err(Error::InFlight { .. })),
        "a claim whose lease ended, not taken over, is still in flight: {refused:?}"
    );
    assert_eq!(
        store.get(&ended).await.unwrap().map(|r| r.state),
        Some(RecordState::InFlight { token: ended_token })
    );
    assert_eq!(
        store.forget(&ended, true).await.unwrap(),
        Forgotten::InFlight { token: ended_token }
    );
    assert_eq!(store.get(&ended).await.unwrap(), None);
    assert_eq!(
        store.forget(&key, true).await.unwrap(),
        Forgotten::InFlight { token: held }
    );
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// A forced forget fences the holder off: its `complete`, `renew` and `release` fail with
/// `LeaseLost` and change nothing, also after another caller claimed the key again (with a
/// newer token) and after that caller completed.
pub async fn forced_forget_fences_the_holder_off(store: Arc<dyn Store>, _: bool) {
    let key = unique("forget-fence");
    let stale = FencingToken(acquire(&*store, &key, LONG).await);
    assert_eq!(
        store.forget(&key, true).await.unwrap(),
        Forgotten::InFlight { token: stale }
    );
    assert_fenced(&*store, &key, stale, "with no record").await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "the fenced holder created nothing"
    );
    let fresh = FencingToken(acquire(&*store, &key, LONG).await);
    assert!(
        fresh > stale,
        "tokens are never handed out twice: {fresh:?} after {stale:?}"
    );
    assert_fenced(&*store, &key, stale, "after a new claim").await;
    assert_eq!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(RecordState::InFlight { token: fresh }),
        "the new claim stands"
    );
    let bytes = record(fresh.0, "2", "u32");
    store.complete(&key, fresh, &bytes, LONG).await.unwrap();
    assert_fenced(&*store, &key, stale, "after the new claim completed").await;
    assert_eq!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(RecordState::Completed {
            token: fresh,
            record: bytes.into()
        }),
        "the new result stands"
    );
}

/// A call waiting for a key in flight (`on_conflict = "wait"`) gets on when the claim is
/// forgotten: it runs its body and returns, long before its wait limit.
pub async fn forget_wakes_waiters(store: Arc<dyn Store>, _: bool) {
    let key = unique("forget-wake");
    let stale = FencingToken(acquire(&*store, &key, LONG).await);
    let runs = Arc::new(AtomicUsize::new(0));
    let (s, k, r) = (store.clone(), key.clone(), runs.clone());
    let waiter = tokio::spawn(async move {
        call(&s, &k)
            .on_conflict(OnConflict::Wait(LONG))
            .run(ErrorPolicy::never(), async move {
                r.fetch_add(1, SeqCst);
                Ok::<u32, Error>(5)
            })
            .await
    });
    // Let the waiter find the key in flight and start waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        runs.load(SeqCst),
        0,
        "the waiter waits while the key is held"
    );
    assert_eq!(
        store.forget(&key, true).await.unwrap(),
        Forgotten::InFlight { token: stale }
    );
    let out = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter got on after the forget, long before its 60 s wait limit")
        .unwrap();
    assert_eq!(out.unwrap(), 5, "the waiter ran its own body");
    assert_eq!(runs.load(SeqCst), 1);
    let got = token_of(&*store, &key).await;
    assert!(got > stale, "the waiter's claim: {got:?} after {stale:?}");
    assert!(is_lease_lost(
        &store
            .complete(&key, stale, &record(stale.0, "1", "u32"), LONG)
            .await
    ));
}

/// No record, a released claim and a completed record past its ttl are `Absent`.
pub async fn forget_absent_is_absent(store: Arc<dyn Store>, _: bool) {
    let never = unique("forget-never");
    assert_eq!(
        store.forget(&never, false).await.unwrap(),
        Forgotten::Absent
    );
    assert_eq!(store.forget(&never, true).await.unwrap(), Forgotten::Absent);
    let released = unique("forget-released");
    let t = FencingToken(acquire(&*store, &released, LONG).await);
    store.release(&released, t).await.unwrap();
    assert_eq!(
        store.forget(&released, false).await.unwrap(),
        Forgotten::Absent
    );
    let expired = completed(&*store, "forget-expired", SHORT).await;
    tokio::time::sleep(PAST_LEASE).await;
    assert_eq!(
        store.forget(&expired, false).await.unwrap(),
        Forgotten::Absent,
        "a result past its ttl is gone already"
    );
    acquire(&*store, &expired, LONG).await;
}

/// Every record of a listing that starts at the beginning and follows `next` with pages of
/// `limit`, among `keys`, and the number of pages. A record listed twice (allowed for one that
/// changed) must be listed alike: these do not change.
async fn list(
    store: &dyn Store,
    limit: usize,
    keys: &[&StorageKey],
) -> (HashMap<StorageKey, RecordSummary>, usize) {
    let mut listed: HashMap<StorageKey, RecordSummary> = HashMap::new();
    let mut cursor: Option<String> = None;
    for pages in 1..=1_000_000 {
        let page = store.scan(cursor.as_deref(), limit).await.unwrap();
        for summary in page.records {
            if !keys.contains(&&summary.key) {
                continue;
            }
            if let Some(before) = listed.get(&summary.key) {
                assert_eq!(before, &summary, "a record listed twice is listed alike");
            }
            listed.insert(summary.key.clone(), summary);
        }
        cursor = page.next;
        if cursor.is_none() {
            return (listed, pages);
        }
    }
    panic!("the listing did not end in a million pages");
}

/// A listing in pages of 3 reports every completed record within its ttl and every claim in
/// flight (also one whose lease ended), as `get` reports them, and no result past its ttl:
/// the state with its token and bytes, the size of the result (0 in flight), the end of the
/// lease or ttl, and when the key was claimed where the store keeps it.
pub async fn scan_lists_what_get_reports(store: Arc<dyn Store>, _: bool) {
    let start = SystemTime::now();
    let mut done = Vec::new();
    for i in 0..7 {
        done.push(completed(&*store, &format!("scan-done{i}"), LONG).await);
    }
    let mut in_flight = Vec::new();
    for i in 0..2 {
        let key = unique(&format!("scan-live{i}"));
        acquire(&*store, &key, LONG).await;
        in_flight.push(key);
    }
    let ended = unique("scan-ended");
    acquire(&*store, &ended, SHORT).await;
    let mut expired = Vec::new();
    for i in 0..2 {
        expired.push(completed(&*store, &format!("scan-expired{i}"), SHORT).await);
    }
    tokio::time::sleep(PAST_LEASE).await;

    let live: Vec<&StorageKey> = done.iter().chain(&in_flight).chain([&ended]).collect();
    let all: Vec<&StorageKey> = live.iter().copied().chain(&expired).collect();
    let (listed, pages) = list(&*store, 3, &all).await;
    let now = SystemTime::now();
    assert!(
        pages > 1,
        "10 records in pages of 3 take more than one page"
    );
    for key in &expired {
        assert!(
            !listed.contains_key(key),
            "a result past its ttl is not listed"
        );
    }
    // Clocks of the store and of this test may differ a little; far more is a wrong time.
    let slack = Duration::from_secs(300);
    for key in live {
        let summary = listed
            .get(key)
            .unwrap_or_else(|| panic!("{key} exists throughout, so it is listed"));
        let got = store.get(key).await.unwrap().expect("the record exists");
        assert_eq!(
            summary.state, got.state,
            "the listing reports what get does"
        );
        assert_eq!(summary.fingerprint, got.fingerprint);
        let size = match &got.state {
            RecordState::Completed { record, .. } => record.len() as u64,
            RecordState::InFlight { .. } => 0,
        };
        assert_eq!(summary.size, size, "the size of the stored result");
        assert_eq!(summary.in_flight(), !done.contains(key));
        let expires_in = summary.expires_in(now);
        if key == &ended {
            assert!(
                expires_in.is_err(),
                "the ended lease is in the past: {summary:?}"
            );
        } else {
            let left = expires_in.unwrap_or_else(|passed| {
                panic!("a lease or ttl of 60 s passed {passed:?} ago: {summary:?}")
            });
            assert!(left <= LONG + slack, "{summary:?}");
        }
        if let Some(claimed_at) = summary.claimed_at {
            assert!(claimed_at <= summary.expires_at, "{summary:?}");
            assert!(
                claimed_at + slack >= start && claimed_at <= now + slack,
                "claimed during this case: {summary:?}"
            );
        }
    }
}

/// A forced forget racing its holder's `complete` happens in one order or the other, and both
/// see the same one: the claim forgotten and the completion refused (`LeaseLost`), or the
/// result stored and then forgotten. Either way no record is left.
pub async fn forget_racing_complete_is_one_order(store: Arc<dyn Store>, _: bool) {
    for i in 0..20 {
        let key = unique(&format!("forget-race{i}"));
        let t = FencingToken(acquire(&*store, &key, LONG).await);
        let bytes = record(t.0, "1", "u32");
        let (forgot, completed) = tokio::join!(
            store.forget(&key, true),
            store.complete(&key, t, &bytes, LONG)
        );
        match (forgot.unwrap(), completed) {
            (Forgotten::InFlight { token }, Err(Error::LeaseLost { .. }))
            | (Forgotten::Completed { token }, Ok(())) => assert_eq!(token, t),
            other => panic!("forget and complete disagree on their order: {other:?}"),
        }
        assert_eq!(store.get(&key).await.unwrap(), None, "nothing is left");
    }
}
