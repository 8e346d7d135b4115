//! The cases of a call's durable steps ([`Store::save_step`], [`Store::load_steps`]): fenced by
//! the holder's token, kept through renewals and takeovers, gone with the call's record.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{Claim, FencingToken, Store};

use super::{acquire, fp, is_lease_lost, record, LONG, PAST_LEASE, SHORT};
use crate::unique;

/// The steps of `key` under `token`, sorted by name.
async fn steps_of(
    store: &dyn Store,
    key: &idem_runtime::StorageKey,
    token: u64,
) -> Vec<(String, Vec<u8>)> {
    let mut steps: Vec<(String, Vec<u8>)> = store
        .load_steps(key, FencingToken(token))
        .await
        .expect("the holder loads its steps")
        .into_iter()
        .map(|(name, record)| (name, record.to_vec()))
        .collect();
    steps.sort();
    steps
}

/// Only the holder's token saves or loads steps; a step saved again under its name replaces the
/// first; a completed record, an absent one and a wrong token are `LeaseLost`.
pub async fn steps_are_fenced_by_the_token(store: Arc<dyn Store>, _: bool) {
    let key = unique("steps-fence");
    assert!(
        is_lease_lost(&store.save_step(&key, FencingToken(1), "a", b"x").await),
        "no record: nothing to save a step into"
    );
    assert!(is_lease_lost(
        &store.load_steps(&key, FencingToken(1)).await
    ));
    let t = acquire(&*store, &key, LONG).await;
    assert_eq!(
        steps_of(&*store, &key, t).await,
        vec![],
        "a new claim has no steps"
    );
    let a = record(t, "1", "u32");
    store
        .save_step(&key, FencingToken(t), "a", &a)
        .await
        .unwrap();
    let b = record(t, "\"b\"", "String");
    store
        .save_step(&key, FencingToken(t), "b/2 ü", &b)
        .await
        .unwrap();
    assert!(
        is_lease_lost(&store.save_step(&key, FencingToken(t + 1), "c", b"x").await),
        "another token saves nothing"
    );
    assert!(is_lease_lost(
        &store.load_steps(&key, FencingToken(t + 1)).await
    ));
    assert_eq!(
        steps_of(&*store, &key, t).await,
        vec![("a".into(), a.clone()), ("b/2 ü".into(), b.clone())]
    );
    let a2 = record(t, "2", "u32");
    store
        .save_step(&key, FencingToken(t), "a", &a2)
        .await
        .unwrap();
    assert_eq!(
        steps_of(&*store, &key, t).await,
        vec![("a".into(), a2), ("b/2 ü".into(), b)],
        "a step saved again under its name replaces it"
    );
    store
        .complete(&key, FencingToken(t), &record(t, "3", "u32"), LONG)
        .await
        .unwrap();
    assert!(
        is_lease_lost(&store.save_step(&key, FencingToken(t), "c", b"x").await),
        "a completed call takes no more steps"
    );
    assert!(is_lease_lost(
        &store.load_steps(&key, FencingToken(t)).await
    ));
}

/// A takeover keeps the steps for the new holder, which adds its own; the old holder can no
/// longer save or load any.
pub async fn takeover_keeps_the_steps(store: Arc<dyn Store>, _: bool) {
    let key = unique("steps-takeover");
    let old = acquire(&*store, &key, SHORT).await;
    let a = record(old, "1", "u32");
    store
        .save_step(&key, FencingToken(old), "a", &a)
        .await
        .unwrap();
    tokio::time::sleep(PAST_LEASE).await;
    // Its lease ended, but nobody took over: the old holder still saves steps.
    let b = record(old, "2", "u32");
    store
        .save_step(&key, FencingToken(old), "b", &b)
        .await
        .unwrap();
    let new = match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired { token, takeover } => {
            assert!(takeover, "the claim took over");
            token.0
        }
        other => panic!("expected a takeover, got {other:?}"),
    };
    assert!(
        is_lease_lost(&store.save_step(&key, FencingToken(old), "c", b"x").await),
        "the old holder is fenced off"
    );
    assert!(is_lease_lost(
        &store.load_steps(&key, FencingToken(old)).await
    ));
    assert_eq!(
        steps_of(&*store, &key, new).await,
        vec![("a".into(), a.clone()), ("b".into(), b.clone())]
    );
    let c = record(new, "3", "u32");
    store
        .save_step(&key, FencingToken(new), "c", &c)
        .await
        .unwrap();
    assert_eq!(
        steps_of(&*store, &key, new).await,
        vec![("a".into(), a), ("b".into(), b), ("c".into(), c)]
    );
}

/// A renewal keeps the steps; a renewal of zero ends the lease at once, and the next claim
/// takes over with them (how a call with steps is left to be resumed).
pub async fn renewal_keeps_the_steps_and_zero_hands_them_on(store: Arc<dyn Store>, _: bool) {
    let key = unique("steps-renew");
    let t = acquire(&*store, &key, LONG).await;
    let a = record(t, "1", "u32");
    store
        .save_step(&key, FencingToken(t), "a", &a)
        .await
        .unwrap();
    store.renew(&key, FencingToken(t), LONG).await.unwrap();
    assert_eq!(
        steps_of(&*store, &key, t).await,
        vec![("a".into(), a.clone())]
    );
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    store
        .renew(&key, FencingToken(t), Duration::ZERO)
        .await
        .unwrap();
    // The store's clock may need a moment past the lease's end.
    let mut taken = None;
    for _ in 0..50 {
        match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
            Claim::Acquired { token, takeover } => {
                assert!(takeover, "a claim after a renewal of zero takes over");
                taken = Some(token.0);
                break;
            }
            Claim::InFlight => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("expected a takeover, got {other:?}"),
        }
    }
    let new = taken.expect("a renewal of zero ended the lease");
    assert_eq!(steps_of(&*store, &key, new).await, vec![("a".into(), a)]);
}

/// The result replaces the steps: once the record expires, the next call starts with none.
/// Release and forget delete them with the record.
pub async fn steps_go_with_the_record(store: Arc<dyn Store>, _: bool) {
    // Completed, then expired.
    let key = unique("steps-complete");
    let t = acquire(&*store, &key, LONG).await;
    store
        .save_step(&key, FencingToken(t), "a", &record(t, "1", "u32"))
        .await
        .unwrap();
    store
        .complete(&key, FencingToken(t), &record(t, "9", "u32"), SHORT)
        .await
        .unwrap();
    tokio::time::sleep(PAST_LEASE).await;
    match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired { token, takeover } => {
            assert!(!takeover, "an expired result is not a takeover");
            assert_eq!(
                steps_of(&*store, &key, token.0).await,
                vec![],
                "after complete"
            );
        }
        other => panic!("expected to acquire, got {other:?}"),
    }

    // Released.
    let key = unique("steps-release");
    let t = acquire(&*store, &key, LONG).await;
    store
        .save_step(&key, FencingToken(t), "a", &record(t, "1", "u32"))
        .await
        .unwrap();
    store.release(&key, FencingToken(t)).await.unwrap();
    let t = acquire(&*store, &key, LONG).await;
    assert_eq!(steps_of(&*store, &key, t).await, vec![], "after release");

    // Forgotten (forced: the call is in flight).
    store
        .save_step(&key, FencingToken(t), "a", &record(t, "1", "u32"))
        .await
        .unwrap();
    store.forget(&key, true).await.unwrap();
    assert!(
        is_lease_lost(&store.save_step(&key, FencingToken(t), "b", b"x").await),
        "a forgotten holder is fenced off"
    );
    let t = acquire(&*store, &key, LONG).await;
    assert_eq!(steps_of(&*store, &key, t).await, vec![], "after forget");
}

/// Through [`Call`](idem_runtime::Call): a call cut off after two of its three steps is
/// resumed by the next call with its key, which replays the two and runs the third; the two
/// ran once, and every later caller gets the resumed call's result.
pub async fn an_interrupted_call_resumes_its_steps(store: Arc<dyn Store>, _: bool) {
    use idem_runtime::{step, Call, Error, ErrorPolicy, OnConflict};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    let key = unique("steps-resume");
    let runs: Arc<[AtomicUsize; 3]> = Arc::default();
    let body = |hang: bool| {
        let runs = runs.clone();
        async move {
            let a: u64 = step("a", async {
                runs[0].fetch_add(1, SeqCst);
                Ok::<_, Error>(rand::random::<u32>() as u64)
            })
            .await?;
            let b: String = step("b", async {
                runs[1].fetch_add(1, SeqCst);
                Ok::<_, Error>(format!("b{a}"))
            })
            .await?;
            if hang {
                std::future::pending::<()>().await;
            }
            let c: u64 = step("c", async {
                runs[2].fetch_add(1, SeqCst);
                Ok::<_, Error>(a + 1)
            })
            .await?;
            Ok::<_, Error>(format!("{a}/{b}/{c}"))
        }
    };
    let call = || {
        Call::new(key.clone())
            .store(store.clone())
            .fingerprint(Some(fp(1)))
            .lease(Duration::from_secs(10))
            .on_conflict(OnConflict::Wait(Duration::from_secs(20)))
    };
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        call().run(ErrorPolicy::never(), body(true)),
    )
    .await;
    assert!(cut.is_err(), "the first call hangs after its second step");
    let resumed = call()
        .run(ErrorPolicy::never(), body(false))
        .await
        .expect("the next call resumes the first");
    let counts: Vec<usize> = runs.iter().map(|r| r.load(SeqCst)).collect();
    assert_eq!(counts, vec![1, 1, 1], "each step ran once: {counts:?}");
    let again = call().run(ErrorPolicy::never(), body(false)).await.unwrap();
    assert_eq!(again, resumed, "a later caller gets the same result");
    let counts: Vec<usize> = runs.iter().map(|r| r.load(SeqCst)).collect();
    assert_eq!(counts, vec![1, 1, 1], "a replay runs no step: {counts:?}");
}
