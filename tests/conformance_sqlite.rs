//! The conformance suite against `SqliteStore`, each test with a database file of its own.
#![cfg(feature = "sqlite")]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idempotency::{Claim, FencingToken, Fingerprint, SqliteStore, StorageKey, Store, StoredRecord};
use tempfile::TempDir;

/// A `SqliteStore` in a temporary directory that is removed when the store is dropped.
struct TempSqlite {
    store: SqliteStore,
    _dir: TempDir,
}

async fn fresh_store() -> Option<Arc<dyn Store>> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("idem.sqlite"))
        .await
        .expect("open the SQLite store");
    Some(Arc::new(TempSqlite { store, _dir: dir }))
}

conformance::suite!(fresh_store, native_expiry = false);

#[async_trait]
impl Store for TempSqlite {
    fn backend(&self) -> &'static str {
        self.store.backend()
    }
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> idempotency::Result<Claim> {
        self.store.claim(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.store.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StorageKey, token: FencingToken) -> idempotency::Result<()> {
        self.store.release(key, token).await
    }
    async fn renew(
        &self,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> idempotency::Result<()> {
        self.store.renew(key, token, lease).await
    }
    async fn get(&self, key: &StorageKey) -> idempotency::Result<Option<StoredRecord>> {
        self.store.get(key).await
    }
    async fn purge_expired(&self) -> idempotency::Result<u64> {
        self.store.purge_expired().await
    }
    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        self.store.wait_for_change(key, max).await
    }
}
