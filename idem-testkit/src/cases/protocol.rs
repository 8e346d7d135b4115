//! The cases that drive the [`Store`] methods directly: atomic claims, fencing tokens, expiry
//! and purge.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{Claim, Error, FencingToken, RecordState, Store};

use super::{acquire, completed, fp, record, LONG};
use crate::unique;

/// A claim whose lease ran out is taken over, with a newer token; a live one is `InFlight`.
pub async fn expired_lease_is_taken_over(store: Arc<dyn Store>, _: bool) {
    let key = unique("takeover");
    let first = acquire(&*store, &key, Duration::from_millis(300)).await;
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired { token, .. } => assert!(token.0 > first, "takeover gets a newer token"),
        other => panic!("expected a takeover, got {other:?}"),
    }
}

/// After a takeover the old token can neither renew, complete nor release, before or after
/// the new holder completed; a completed record cannot be renewed or released at all.
pub async fn stale_tokens_are_fenced(store: Arc<dyn Store>, _: bool) {
    let key = unique("fence");
    let stale = FencingToken(acquire(&*store, &key, Duration::from_millis(300)).await);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fresh = FencingToken(acquire(&*store, &key, LONG).await);
    assert!(matches!(
        store.renew(&key, stale, LONG).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store
            .complete(&key, stale, &record(stale.0, "1", "u32"), LONG)
            .await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store.release(&key, stale).await,
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: fresh }
    );
    store
        .complete(&key, fresh, &record(fresh.0, "2", "u32"), LONG)
        .await
        .unwrap();
    assert!(matches!(
        store
            .complete(&key, stale, &record(stale.0, "1", "u32"), LONG)
            .await,
        Err(Error::LeaseLost { .. })
    ));
    let got = store.get(&key).await.unwrap().unwrap();
    let RecordState::Completed {
        token,
        record: bytes,
    } = got.state
    else {
        panic!("{got:?}")
    };
    assert_eq!(token, fresh);
    assert_eq!(
        bytes,
        record(fresh.0, "2", "u32"),
        "the newer result stands, byte for byte"
    );
    // Completed records cannot be renewed or released either.
    assert!(matches!(
        store.renew(&key, fresh, LONG).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store.release(&key, fresh).await,
        Err(Error::LeaseLost { .. })
    ));
}

/// Tokens strictly increase across claims of a key, and across keys.
pub async fn tokens_strictly_increase(store: Arc<dyn Store>, _: bool) {
    let key = unique("tokens");
    let mut last = 0;
    for _ in 0..5 {
        let t = acquire(&*store, &key, LONG).await;
        assert!(t > last, "{t} after {last}");
        store.release(&key, FencingToken(t)).await.unwrap();
        last = t;
    }
    let other = acquire(&*store, &unique("tokens-other"), LONG).await;
    assert!(
        other > last,
        "tokens increase across keys too: {other} after {last}"
    );
}

/// `purge_expired` removes completed records past their ttl and nothing else: not live results,
/// not live claims, not a claim whose lease just ended.
pub async fn purge_removes_only_expired(store: Arc<dyn Store>, native_expiry: bool) {
    let short = Duration::from_millis(300);
    let mut expired = Vec::new();
    let mut live = Vec::new();
    for i in 0..3 {
        expired.push(completed(&*store, &format!("purge-done{i}"), short).await);
    }
    // A claim whose lease just ended is not abandoned: purge keeps it for its holder.
    let k = unique("purge-lease");
    acquire(&*store, &k, short).await;
    live.push(k);
    for i in 0..2 {
        live.push(completed(&*store, &format!("purge-live{i}"), LONG).await);
    }
    let k = unique("purge-live-lease");
    acquire(&*store, &k, LONG).await;
    live.push(k);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let purged = store.purge_expired().await.unwrap();
    if native_expiry {
        // The server expires records itself; nothing is left for purge to do.
        assert_eq!(purged, 0);
    } else {
        assert_eq!(purged, expired.len() as u64);
        assert_eq!(
            store.purge_expired().await.unwrap(),
            0,
            "a second purge finds nothing"
        );
    }
    for k in &expired {
        assert_eq!(store.get(k).await.unwrap(), None);
    }
    for k in &live {
        assert!(
            store.get(k).await.unwrap().is_some(),
            "live records survive purge"
        );
    }
}

/// `get` reports nothing, then the claim in flight with its fingerprint and token, then the
/// completed record; a claim then replays it.
pub async fn get_reports_states(store: Arc<dyn Store>, _: bool) {
    let key = unique("get");
    assert_eq!(store.get(&key).await.unwrap(), None);
    let t = FencingToken(acquire(&*store, &key, LONG).await);
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(got.fingerprint, Some(fp(1)));
    assert_eq!(got.state, RecordState::InFlight { token: t });
    let bytes = record(t.0, "[1,2]", "x");
    store.complete(&key, t, &bytes, LONG).await.unwrap();
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(
        got.state,
        RecordState::Completed {
            token: t,
            record: bytes.clone().into()
        }
    );
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(bytes.into())
    );
}

/// A claim without a fingerprint matches any fingerprint, in flight and completed.
pub async fn missing_fingerprint_matches_any(store: Arc<dyn Store>, _: bool) {
    let key = unique("nofp");
    let t = match store.claim(&key, None, LONG).await.unwrap() {
        Claim::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    assert_eq!(store.get(&key).await.unwrap().unwrap().fingerprint, None);
    assert_eq!(
        store.claim(&key, Some(&fp(9)), LONG).await.unwrap(),
        Claim::InFlight
    );
    store.complete(&key, t, b"r", LONG).await.unwrap();
    assert_eq!(
        store.claim(&key, Some(&fp(3)), LONG).await.unwrap(),
        Claim::Completed(b"r".to_vec().into())
    );
}
