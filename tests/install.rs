//! `idempotency::install`: the process-wide store used without `store = ...` (its own test binary, as
//! the default store is process-wide).

use std::sync::Arc;

use idem_support::AppError;
use idempotency::store::RecordState;
use idempotency::{idempotent, MemoryStore, StorageKey, Store};

#[idempotent(key = id)]
async fn uses_the_default_store(id: u32) -> Result<u32, AppError> {
    Ok(id * 2)
}

#[tokio::test]
async fn functions_without_a_store_use_the_installed_one() {
    let store = Arc::new(MemoryStore::new());
    let previous = idempotency::install(store.clone());
    assert!(previous.is_none(), "nothing was installed before");
    assert_eq!(uses_the_default_store(21).await.unwrap(), 42);

    let operation =
        idempotency::Operation::from_path(concat!(module_path!(), "::uses_the_default_store"));
    let key = StorageKey::derive_for(&operation, "", &21u32).unwrap();
    let record = store
        .get(&key)
        .await
        .unwrap()
        .expect("stored in the installed store");
    assert!(matches!(record.state, RecordState::Completed { .. }));
    assert_eq!(store.len(), 1);

    // Installing another store replaces it for later calls (and returns the old one).
    let other = Arc::new(MemoryStore::new());
    let replaced = idempotency::install(other.clone()).expect("the first store");
    assert_eq!(replaced.backend(), "memory");
    assert_eq!(uses_the_default_store(21).await.unwrap(), 42);
    assert_eq!(other.len(), 1, "the new store got its own record");
    assert_eq!(store.len(), 1);
}
