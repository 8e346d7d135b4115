//! `RedbStore` against idem-testkit's conformance suite: every case, each with a database file
//! of its own.

use std::sync::Arc;

use idem_runtime::Store;
use idem_store_redb::RedbStore;
use idem_testkit::Intercept;

/// A store in a temporary directory, removed when the store is dropped.
async fn fresh_store() -> Option<Arc<dyn Store>> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = RedbStore::open(dir.path().join("idem.redb"))
        .await
        .expect("open the redb store");
    Some(Arc::new(Intercept::new(store).keeping(dir)))
}

idem_testkit::conformance!(fresh_store, native_expiry = false);
