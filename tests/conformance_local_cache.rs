//! The conformance suite (idem-testkit) against `LocalCache` in front of a `MemoryStore`: the
//! local tier keeps every rule of the store protocol the store behind it keeps.

use std::sync::Arc;

use idempotency::{LocalCache, MemoryStore, Store};

async fn fresh() -> Option<Arc<dyn Store>> {
    Some(Arc::new(LocalCache::new(MemoryStore::new())))
}

idem_testkit::conformance!(fresh, native_expiry = false);
