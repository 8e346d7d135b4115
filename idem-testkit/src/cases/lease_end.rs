//! Conformance cases for the end of a lease: an in-flight claim whose lease expired stays its
//! holder's until another claim takes it over (or it is abandoned for
//! `ABANDONED_CLAIM_RETENTION`), so a result is never lost while nobody else took over.

use std::sync::Arc;

use idem_runtime::{Claim, FencingToken, RecordState, Store};

use super::{acquire, completed, fp, is_lease_lost, record, LONG, PAST_LEASE, SHORT};
use crate::unique;

/// (a) A holder that overran its lease, with nobody taking over, still stores its result, and
/// the next claim with the same fingerprint replays it.
pub async fn complete_after_lease_end_lands(store: Arc<dyn Store>, _: bool) {
    let key = unique("late-complete");
    let t = FencingToken(acquire(&*store, &key, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    let bytes = record(t.0, "7", "u32");
    store
        .complete(&key, t, &bytes, LONG)
        .await
        .expect("complete after the lease ended, without a takeover, lands");
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(bytes.clone().into())
    );
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(
        got.state,
        RecordState::Completed {
            token: t,
            record: bytes.into()
        }
    );
    // Completed now: the same token cannot complete it again.
    let again = store.complete(&key, t, b"other", LONG).await;
    assert!(is_lease_lost(&again), "{again:?}");
}

/// (b) After a takeover the old token's `complete`, `renew` and `release` are `LeaseLost` and
/// change nothing, even once the new holder's lease has expired too.
pub async fn takeover_fences_the_old_token(store: Arc<dyn Store>, _: bool) {
    let key = unique("late-fenced");
    let old = FencingToken(acquire(&*store, &key, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    let new = match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired { token, takeover } => {
            assert!(takeover, "the expired claim was taken over");
            assert!(token > old, "{token:?} after {old:?}");
            token
        }
        other => panic!("expected a takeover, got {other:?}"),
    };
    let check_old_is_fenced = |context: &'static str| {
        let store = store.clone();
        let key = key.clone();
        async move {
            let complete = store
                .complete(&key, old, &record(old.0, "1", "u32"), LONG)
                .await;
            assert!(is_lease_lost(&complete), "{context}: complete {complete:?}");
            let renew = store.renew(&key, old, LONG).await;
            assert!(is_lease_lost(&renew), "{context}: renew {renew:?}");
            let release = store.release(&key, old).await;
            assert!(is_lease_lost(&release), "{context}: release {release:?}");
            let got = store.get(&key).await.unwrap().unwrap();
            assert_eq!(got.state, RecordState::InFlight { token: new }, "{context}");
            assert_eq!(got.fingerprint, Some(fp(1)), "{context}");
        }
    };
    check_old_is_fenced("new lease live").await;
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight,
        "the new holder's lease is untouched"
    );
    // Now the new holder's lease ends too (renewed short): the old token still holds nothing.
    store.renew(&key, new, SHORT).await.unwrap();
    tokio::time::sleep(PAST_LEASE).await;
    check_old_is_fenced("new lease expired").await;
    let bytes = record(new.0, "2", "u32");
    store.complete(&key, new, &bytes, LONG).await.unwrap();
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(bytes.into()),
        "the new holder's result stands"
    );
}

/// (c) `renew` after the lease ended, without a takeover, re-establishes a lease from now: the
/// key is in flight to others again.
pub async fn renew_after_lease_end_holds_again(store: Arc<dyn Store>, _: bool) {
    let key = unique("late-renew");
    let t = FencingToken(acquire(&*store, &key, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    store
        .renew(&key, t, LONG)
        .await
        .expect("renew after the lease ended, without a takeover, succeeds");
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight,
        "held again: not taken over"
    );
    assert_eq!(
        store.claim(&key, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse,
        "live again: another fingerprint is key reuse"
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t }
    );
    store
        .complete(&key, t, &record(t.0, "3", "u32"), LONG)
        .await
        .unwrap();
}

/// (d) `get` reports a claim whose lease expired, and that nobody took over, as in flight with
/// its token; a takeover then shows the new token.
pub async fn get_reports_an_expired_claim_in_flight(store: Arc<dyn Store>, _: bool) {
    let key = unique("late-get");
    let t = FencingToken(acquire(&*store, &key, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    let got = store
        .get(&key)
        .await
        .unwrap()
        .expect("an expired claim nobody took over still exists");
    assert_eq!(got.state, RecordState::InFlight { token: t });
    assert_eq!(got.fingerprint, Some(fp(1)));
    let newer = match store.claim(&key, Some(&fp(1)), LONG).await.unwrap() {
        Claim::Acquired {
            token,
            takeover: true,
        } => token,
        other => panic!("expected a takeover, got {other:?}"),
    };
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: newer }
    );
}

/// (e) `purge_expired` keeps an in-flight claim whose lease ended moments ago (it is not
/// abandoned), while it removes a completed record past its ttl; the claim's holder can still
/// complete after the purge.
pub async fn purge_keeps_a_claim_whose_lease_just_ended(
    store: Arc<dyn Store>,
    native_expiry: bool,
) {
    let done = completed(&*store, "late-purge-done", SHORT).await;
    let key = unique("late-purge");
    let t = FencingToken(acquire(&*store, &key, SHORT).await);
    tokio::time::sleep(PAST_LEASE).await;
    let purged = store.purge_expired().await.unwrap();
    if native_expiry {
        assert_eq!(purged, 0, "the server expires records itself");
    } else {
        assert_eq!(purged, 1, "only the completed record past its ttl");
    }
    assert_eq!(store.get(&done).await.unwrap(), None);
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t },
        "the claim survives purge"
    );
    let bytes = record(t.0, "4", "u32");
    store
        .complete(&key, t, &bytes, LONG)
        .await
        .expect("its holder completes after the purge");
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(bytes.into())
    );
}

/// An expired claim with another fingerprint is taken over, not key reuse (while its lease is
/// live it is key reuse); the takeover's fingerprint is stored.
pub async fn expired_claim_with_another_fingerprint_is_taken_over(store: Arc<dyn Store>, _: bool) {
    let key = unique("late-other-fp");
    let old = FencingToken(acquire(&*store, &key, SHORT).await);
    assert_eq!(
        store.claim(&key, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse,
        "a live claim with another fingerprint is key reuse"
    );
    tokio::time::sleep(PAST_LEASE).await;
    let new = match store.claim(&key, Some(&fp(2)), LONG).await.unwrap() {
        Claim::Acquired {
            token,
            takeover: true,
        } => token,
        other => panic!("expected a takeover, got {other:?}"),
    };
    assert!(new > old, "{new:?} after {old:?}");
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!(got.fingerprint, Some(fp(2)));
    assert_eq!(got.state, RecordState::InFlight { token: new });
    let complete = store.complete(&key, old, b"old", LONG).await;
    assert!(is_lease_lost(&complete), "{complete:?}");
}
