//! The conformance suite against `MemoryStore`.

mod conformance;

use std::sync::Arc;

use idempotency::{MemoryStore, Store};

async fn fresh_store() -> Option<Arc<dyn Store>> {
    Some(Arc::new(MemoryStore::new()))
}

conformance::suite!(fresh_store, native_expiry = false);
