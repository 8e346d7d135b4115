//! What only a file has: records and the token counter outlive the store that wrote them.

use std::time::Duration;

use idem_runtime::{Claim, Fingerprint, RecordState, Store};
use idem_store_redb::RedbStore;

#[tokio::test]
async fn records_and_tokens_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.redb");
    let (done, open) = (idem_testkit::unique("done"), idem_testkit::unique("open"));
    let fp = Fingerprint([1; 32]);
    let long = Duration::from_secs(60);
    let claim = |store: &RedbStore, key| {
        let store = store.clone();
        async move {
            match store.claim(key, Some(&fp), long).await.unwrap() {
                Claim::Acquired { token, .. } => token,
                other => panic!("expected to acquire, got {other:?}"),
            }
        }
    };

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.backend(), "redb");
    assert!(store.durable());
    let t1 = claim(&store, &done).await;
    store.complete(&done, t1, b"result", long).await.unwrap();
    let t2 = claim(&store, &open).await;
    drop(store);

    // Reopened, as after a restart: the result replays, the claim is still its holder's.
    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(
        store.claim(&done, Some(&fp), long).await.unwrap(),
        Claim::Completed(b"result".to_vec().into())
    );
    assert_eq!(
        store.get(&open).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t2 }
    );
    store.release(&open, t2).await.unwrap();
    let t3 = claim(&store, &open).await;
    assert!(t3 > t2 && t2 > t1, "{t1:?} {t2:?} {t3:?}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_store_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.redb");
    std::fs::write(&path, b"not a redb file, just text").unwrap();
    let err = RedbStore::open(&path).await.unwrap_err();
    assert!(
        matches!(
            err,
            idem_runtime::Error::Store {
                backend: "redb",
                ..
            }
        ),
        "{err:?}"
    );
}
