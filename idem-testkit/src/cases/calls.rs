//! The cases that go through [`Call`], the engine `#[idempotent]` expands to: what callers see.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{
    Claim, Error, ErrorPolicy, FencingToken, OnConflict, OnUnknown, StorageKey, Store,
};

use super::{acquire, call, fp, record, LONG};
use crate::unique;

/// 200 concurrent callers over 10 keys, waiting on conflicts: each key's body runs exactly once,
/// and every caller of a key gets its one value.
pub async fn exactly_once_under_200_concurrent_callers(store: Arc<dyn Store>, _: bool) {
    let runs: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let keys: Vec<StorageKey> = (0..10).map(|i| unique(&format!("once{i}"))).collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (store, runs, key) = (store.clone(), runs.clone(), keys[i % 10].clone());
            tokio::spawn(async move {
                let out: Result<u64, Error> = call(&store, &key)
                    .on_conflict(OnConflict::Wait(Duration::from_secs(30)))
                    .run(ErrorPolicy::never(), async {
                        *runs.lock().unwrap().entry(i % 10).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        Ok(rand::random())
                    })
                    .await;
                (i % 10, out.unwrap())
            })
        })
        .collect();
    let mut values = HashMap::new();
    for t in tasks {
        let (k, v) = t.await.unwrap();
        assert_eq!(
            *values.entry(k).or_insert(v),
            v,
            "all callers of key {k} get one value"
        );
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 10);
    assert!(
        runs.values().all(|&n| n == 1),
        "each body ran exactly once: {runs:?}"
    );
}

/// A completed call replays its value, byte for byte, to every later call with the key.
pub async fn replay_is_identical(store: Arc<dyn Store>, _: bool) {
    let key = unique("replay");
    let first: Result<(u64, String, Vec<f64>), Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async {
            Ok((rand::random(), "ü\"\\\n".to_string(), vec![0.1, 1e300]))
        })
        .await;
    let first = first.unwrap();
    for _ in 0..3 {
        let again: Result<(u64, String, Vec<f64>), Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                unreachable!("replayed, not run")
            })
            .await;
        assert_eq!(again.unwrap(), first);
    }
}

/// The key reused with another fingerprint is `KeyReuse`, nothing runs; also while in flight.
pub async fn key_reuse_is_refused(store: Arc<dyn Store>, _: bool) {
    let key = unique("reuse");
    let _: u32 = call(&store, &key)
        .run(ErrorPolicy::never(), async { Ok::<u32, Error>(1) })
        .await
        .unwrap();
    let other: Result<u32, Error> = call(&store, &key)
        .fingerprint(Some(fp(2)))
        .run(ErrorPolicy::never(), async {
            unreachable!("key reuse must not run")
        })
        .await;
    assert!(matches!(other, Err(Error::KeyReuse { .. })), "{other:?}");
    // In flight with another fingerprint is reuse too.
    let key = unique("reuse-in-flight");
    acquire(&*store, &key, LONG).await;
    assert_eq!(
        store.claim(&key, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse
    );
}

/// Within its ttl a result is replayed; past it, the body runs again.
pub async fn ttl_expiry_runs_again(store: Arc<dyn Store>, _: bool) {
    let key = unique("ttl");
    let runs = AtomicUsize::new(0);
    let go = || {
        call(&store, &key)
            .ttl(Duration::from_millis(300))
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Ok::<u32, Error>(1)
            })
    };
    go().await.unwrap();
    go().await.unwrap();
    assert_eq!(
        runs.load(SeqCst),
        1,
        "within the ttl the result is replayed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    go().await.unwrap();
    assert_eq!(runs.load(SeqCst), 2, "past the ttl the body runs again");
}

/// A body's `Err` releases the claim: the retry runs at once, and no record is left.
pub async fn release_on_error(store: Arc<dyn Store>, _: bool) {
    let key = unique("err");
    let runs = AtomicUsize::new(0);
    for _ in 0..2 {
        let out: Result<u32, Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Err(Error::InvalidKey {
                    reason: "the body's own error".into(),
                })
            })
            .await;
        assert!(matches!(out, Err(Error::InvalidKey { .. })));
    }
    assert_eq!(
        runs.load(SeqCst),
        2,
        "an Err releases the claim, the retry runs at once"
    );
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// Claims `key` again within `within`, proving the previous claim was released rather than
/// left to its 60 s lease.
async fn reclaimable_soon(store: &dyn Store, key: &StorageKey, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match store.claim(key, Some(&fp(1)), LONG).await.unwrap() {
            Claim::Acquired { .. } => return,
            Claim::InFlight if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("claim was not released: {other:?}"),
        }
    }
}

/// A started body that panics or is dropped has an unknown outcome: by default (at most once)
/// the key then refuses calls with `OutcomeUnknown`; under `OnUnknown::Rerun` (at least once)
/// the claim is released at once.
async fn unknown_outcome_is_recorded_or_released(
    store: Arc<dyn Store>,
    label: &str,
    end: impl Fn(Arc<dyn Store>, StorageKey, OnUnknown) -> tokio::task::JoinHandle<()>,
) {
    let key = unique(label);
    end(store.clone(), key.clone(), OnUnknown::Refuse)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let runs = AtomicUsize::new(0);
    loop {
        let out: Result<u32, Error> = call(&store, &key)
            .lease(LONG)
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, SeqCst);
                Ok(1)
            })
            .await;
        match out {
            Err(Error::OutcomeUnknown { .. }) => break,
            // The unknown outcome is recorded in the background, right after the panic or drop.
            Err(Error::InFlight { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("expected OutcomeUnknown for a started body, got {other:?}"),
        }
    }
    assert_eq!(runs.load(SeqCst), 0, "the body is not run again");

    let key = unique(label);
    end(store.clone(), key.clone(), OnUnknown::Rerun)
        .await
        .unwrap();
    reclaimable_soon(&*store, &key, Duration::from_secs(5)).await;
}

/// A body that panics after it started is an unknown outcome: `OutcomeUnknown` by default,
/// released under `OnUnknown::Rerun`.
pub async fn unknown_on_panic(store: Arc<dyn Store>, _: bool) {
    unknown_outcome_is_recorded_or_released(store, "panic", |s, k, policy| {
        tokio::spawn(async move {
            let joined = tokio::spawn(async move {
                let _: Result<u32, Error> = call(&s, &k)
                    .lease(LONG)
                    .on_unknown(policy)
                    .run(ErrorPolicy::never(), async { panic!("body panics") })
                    .await;
            })
            .await;
            assert!(joined.unwrap_err().is_panic());
        })
    })
    .await
}

/// A body whose caller stopped waiting (the future dropped) is an unknown outcome:
/// `OutcomeUnknown` by default, released under `OnUnknown::Rerun`.
pub async fn unknown_on_cancel(store: Arc<dyn Store>, _: bool) {
    unknown_outcome_is_recorded_or_released(store, "cancel", |s, k, policy| {
        tokio::spawn(async move {
            let slow =
                call(&s, &k)
                    .lease(LONG)
                    .on_unknown(policy)
                    .run(ErrorPolicy::never(), async {
                        tokio::time::sleep(LONG).await;
                        Ok::<u32, Error>(1)
                    });
            assert!(tokio::time::timeout(Duration::from_millis(100), slow)
                .await
                .is_err());
        })
    })
    .await
}

/// A body that runs for four leases keeps its claim: renewed, never taken over.
pub async fn long_body_renews_its_lease(store: Arc<dyn Store>, _: bool) {
    let key = unique("renew");
    let (s, k) = (store.clone(), key.clone());
    // The body runs until the checks are done, however long a slow store makes them take.
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        call(&s, &k)
            .lease(Duration::from_millis(300))
            .run(ErrorPolicy::never(), async {
                let _ = finished.await;
                Ok::<u32, Error>(9)
            })
            .await
    });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
            Claim::InFlight,
            "the lease was renewed"
        );
    }
    done.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 9);
}

/// Stored bytes that do not decode (garbage, empty, truncated, bad JSON) are `Corrupt`, never
/// a silent re-run.
pub async fn corrupt_records_are_errors_not_reruns(store: Arc<dyn Store>, _: bool) {
    let valid = record(1, "5", std::any::type_name::<u32>());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xffnot a record".to_vec()),
        ("empty", Vec::new()),
        ("truncated", valid[..valid.len() - 3].to_vec()),
        (
            "bad json",
            record(1, "{not json", std::any::type_name::<u32>()),
        ),
    ];
    for (label, bytes) in cases {
        let key = unique(label);
        let t = acquire(&*store, &key, LONG).await;
        store
            .complete(&key, FencingToken(t), &bytes, LONG)
            .await
            .unwrap();
        let out: Result<u32, Error> = call(&store, &key)
            .run(ErrorPolicy::never(), async {
                unreachable!("never re-run silently")
            })
            .await;
        assert!(
            matches!(out, Err(Error::Corrupt { .. })),
            "{label}: {out:?}"
        );
    }
}

/// A record of another result type is `TypeMismatch`, naming both types.
pub async fn wrong_type_is_type_mismatch(store: Arc<dyn Store>, _: bool) {
    let key = unique("type");
    let _: String = call(&store, &key)
        .run(ErrorPolicy::never(), async {
            Ok::<_, Error>("text".to_string())
        })
        .await
        .unwrap();
    let out: Result<u64, Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    match out {
        Err(Error::TypeMismatch {
            expected, found, ..
        }) => {
            assert!(expected.contains("u64"), "{expected}");
            assert!(found.contains("String"), "{found}");
        }
        other => panic!("{other:?}"),
    }
}

/// A second caller is rejected (`InFlight`), times out waiting briefly (`WaitTimeout`), or waits
/// and gets the first caller's value.
pub async fn wait_gets_the_first_result(store: Arc<dyn Store>, _: bool) {
    let key = unique("wait");
    let (s, k) = (store.clone(), key.clone());
    let first = tokio::spawn(async move {
        call(&s, &k)
            .run(ErrorPolicy::never(), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<u64, Error>(rand::random())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rejected: Result<u64, Error> = call(&store, &key)
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    // Errors about a record name its storage key, in the value and in the message.
    let storage_key = key.clone();
    let rejected = rejected.unwrap_err();
    assert!(matches!(rejected, Error::InFlight { .. }), "{rejected:?}");
    assert_eq!(rejected.storage_key(), Some(&storage_key));
    assert!(
        rejected.to_string().contains(storage_key.as_str()),
        "{rejected}"
    );
    let short: Result<u64, Error> = call(&store, &key)
        .on_conflict(OnConflict::Wait(Duration::from_millis(20)))
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    let short = short.unwrap_err();
    assert!(matches!(short, Error::WaitTimeout { .. }), "{short:?}");
    assert_eq!(short.storage_key(), Some(&storage_key));
    let waited: Result<u64, Error> = call(&store, &key)
        .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
        .run(ErrorPolicy::never(), async { unreachable!() })
        .await;
    assert_eq!(waited.unwrap(), first.await.unwrap().unwrap());
}
