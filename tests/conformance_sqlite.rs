//! The conformance suite (idem-testkit) against `SqliteStore`, each test with a database file
//! of its own; and `idempotency::store::forget` on what `#[idempotent]` stored there.
#![cfg(feature = "sqlite")]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use idempotency::store::Forgotten;
use idempotency::{idempotent, Error, SqliteStore, Store};

idem_testkit::conformance!(idem_support::sqlite, native_expiry = false);

static CHARGES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(name = "billing.charge", key = order, scope = tenant, store = store.clone(), skip(store))]
async fn charge(store: &Arc<SqliteStore>, tenant: &str, order: u64) -> Result<u64, Error> {
    CHARGES.fetch_add(1, SeqCst);
    Ok(order * 10)
}

#[idempotent(name = "billing.refund", key = order, store = store.clone(), skip(store))]
async fn refund(store: &Arc<SqliteStore>, order: u64) -> Result<u64, Error> {
    Ok(order)
}

/// `forget(store, name, scope, key)` removes the record the attribute keeps for that name,
/// scope and key (the default scope is `""`), and nothing else: the next call runs again.
#[tokio::test]
async fn the_facade_forgets_what_the_attribute_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(dir.path().join("idem.sqlite"))
            .await
            .unwrap(),
    );
    assert_eq!(charge(&store, "acme", 42).await.unwrap(), 420);
    assert_eq!(charge(&store, "acme", 43).await.unwrap(), 430);
    assert_eq!(refund(&store, 42).await.unwrap(), 42);
    assert_eq!(charge(&store, "acme", 42).await.unwrap(), 420);
    assert_eq!(CHARGES.load(SeqCst), 2, "replayed");

    for (name, scope, key) in [("billing.charge", "other", 42), ("billing.charge", "", 42)] {
        assert_eq!(
            idempotency::store::forget(store.clone(), name, scope, &key, false)
                .await
                .unwrap(),
            Forgotten::Absent,
            "{name} {scope:?} {key}: another scope's key"
        );
    }
    assert!(matches!(
        idempotency::store::forget(store.clone(), "billing.charge", "acme", &42, false).await,
        Ok(Forgotten::Completed { .. })
    ));
    assert!(matches!(
        idempotency::store::forget(store.clone(), "billing.refund", "", "42", false).await,
        Ok(Forgotten::Completed { .. })
    ));
    assert_eq!(charge(&store, "acme", 43).await.unwrap(), 430);
    assert_eq!(CHARGES.load(SeqCst), 2, "the other order is still replayed");
    assert_eq!(charge(&store, "acme", 42).await.unwrap(), 420);
    assert_eq!(CHARGES.load(SeqCst), 3, "the forgotten order runs again");
    assert!(matches!(
        idempotency::store::forget(store.clone(), "billing.charge", "acme", "", false).await,
        Err(Error::InvalidKey { .. })
    ));
    assert_eq!(store.scan(None, 10).await.unwrap().records.len(), 2);
}
