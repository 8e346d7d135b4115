//! [`Intercept`]: a store that forwards to another, except where its [`Hooks`] say otherwise.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_runtime::{
    Claim, FencingToken, Fingerprint, Forgotten, Result, ScanPage, StorageKey, Store, StoredRecord,
};

/// What an [`Intercept`] does on each method of [`Store`]. Every method forwards to the inner
/// store by default, so a fake overrides only what it fakes: a `complete` that fails, a `claim`
/// that is slow, a reply that is lost after the write.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use idem_runtime::{Error, FencingToken, MemoryStore, StorageKey, Store};
/// use idem_testkit::{Hooks, Intercept};
///
/// /// `renew` fails while `cut` is set, as during a network partition.
/// struct CutRenewals {
///     cut: AtomicBool,
/// }
///
/// #[async_trait::async_trait]
/// impl Hooks for CutRenewals {
///     async fn renew(
///         &self,
///         inner: &dyn Store,
///         key: &StorageKey,
///         token: FencingToken,
///         lease: Duration,
///     ) -> idem_runtime::Result<()> {
///         if self.cut.load(Ordering::SeqCst) {
///             return Err(Error::store("test", "renewal cut off"));
///         }
///         inner.renew(key, token, lease).await
///     }
/// }
///
/// let store = Arc::new(Intercept::with_hooks(
///     MemoryStore::new(),
///     CutRenewals { cut: AtomicBool::new(true) },
/// ));
/// store.hooks().cut.store(false, Ordering::SeqCst);
/// ```
#[async_trait]
pub trait Hooks: Send + Sync {
    /// [`Store::backend`]; by default the inner store's.
    fn backend(&self, inner: &dyn Store) -> &'static str {
        inner.backend()
    }

    /// [`Store::durable`]; by default the inner store's.
    fn durable(&self, inner: &dyn Store) -> bool {
        inner.durable()
    }

    /// [`Store::notifies_changes`]; by default the inner store's.
    fn notifies_changes(&self, inner: &dyn Store) -> bool {
        inner.notifies_changes()
    }

    /// [`Store::claim`]; by default the inner store's.
    async fn claim(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        inner.claim(key, fingerprint, lease).await
    }

    /// [`Store::complete`]; by default the inner store's.
    async fn complete(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        inner.complete(key, token, record, ttl).await
    }

    /// [`Store::release`]; by default the inner store's.
    async fn release(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<()> {
        inner.release(key, token).await
    }

    /// [`Store::renew`]; by default the inner store's.
    async fn renew(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<()> {
        inner.renew(key, token, lease).await
    }

    /// [`Store::get`]; by default the inner store's.
    async fn get(&self, inner: &dyn Store, key: &StorageKey) -> Result<Option<StoredRecord>> {
        inner.get(key).await
    }

    /// [`Store::purge_expired`]; by default the inner store's.
    async fn purge_expired(&self, inner: &dyn Store) -> Result<u64> {
        inner.purge_expired().await
    }

    /// [`Store::purge_expired_up_to`]; by default the inner store's.
    async fn purge_expired_up_to(&self, inner: &dyn Store, limit: u64) -> Result<u64> {
        inner.purge_expired_up_to(limit).await
    }

    /// [`Store::forget`]; by default the inner store's.
    async fn forget(&self, inner: &dyn Store, key: &StorageKey, force: bool) -> Result<Forgotten> {
        inner.forget(key, force).await
    }

    /// [`Store::scan`]; by default the inner store's.
    async fn scan(
        &self,
        inner: &dyn Store,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage> {
        inner.scan(cursor, limit).await
    }

    /// [`Store::wait_for_change`]; by default the inner store's.
    async fn wait_for_change(&self, inner: &dyn Store, key: &StorageKey, max: Duration) {
        inner.wait_for_change(key, max).await
    }

    /// [`Store::keeps_steps`]; by default the inner store's.
    fn keeps_steps(&self, inner: &dyn Store) -> bool {
        inner.keeps_steps()
    }

    /// [`Store::save_step`]; by default the inner store's.
    async fn save_step(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        inner.save_step(key, token, name, record).await
    }

    /// [`Store::load_steps`]; by default the inner store's.
    async fn load_steps(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        inner.load_steps(key, token).await
    }
}

/// The [`Hooks`] that change nothing: an [`Intercept`] with them is the inner store, plus the
/// guard it [keeps](Intercept::keeping).
#[derive(Clone, Copy, Debug, Default)]
pub struct Forward;

impl Hooks for Forward {}

/// A [`Store`] that forwards every method to `inner` through its [`Hooks`], and keeps a guard
/// alive as long as it lives (a temporary directory holding the store's file, a server
/// process).
///
/// ```
/// use std::sync::Arc;
///
/// use idem_runtime::{MemoryStore, Store};
/// use idem_testkit::Intercept;
///
/// let dir = tempfile::tempdir().unwrap();
/// // The directory is removed when the last handle to the store is dropped.
/// let store: Arc<dyn Store> = Arc::new(Intercept::new(MemoryStore::new()).keeping(dir));
/// ```
///
/// Cloning it clones the inner store and the hooks, and shares the guard.
#[derive(Clone)]
pub struct Intercept<S, H = Forward> {
    inner: S,
    hooks: H,
    guard: Option<Arc<dyn Any + Send + Sync>>,
}

impl<S: Store> Intercept<S> {
    /// `inner`, unchanged (add a guard with [`keeping`](Intercept::keeping)).
    pub fn new(inner: S) -> Self {
        Intercept::with_hooks(inner, Forward)
    }
}

impl<S: Store, H: Hooks> Intercept<S, H> {
    /// `inner`, with the methods `hooks` override.
    pub fn with_hooks(inner: S, hooks: H) -> Self {
        Intercept {
            inner,
            hooks,
            guard: None,
        }
    }

    /// Keeps `guard` alive until the store (its last clone) is dropped.
    pub fn keeping(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guard = Some(Arc::new(guard));
        self
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The hooks, to change what they do while the store is in use.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

#[async_trait]
impl<S: Store, H: Hooks> Store for Intercept<S, H> {
    fn backend(&self) -> &'static str {
        self.hooks.backend(&self.inner)
    }
    fn durable(&self) -> bool {
        self.hooks.durable(&self.inner)
    }
    fn notifies_changes(&self) -> bool {
        self.hooks.notifies_changes(&self.inner)
    }
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        self.hooks.claim(&self.inner, key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        self.hooks
            .complete(&self.inner, key, token, record, ttl)
            .await
    }
    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.hooks.release(&self.inner, key, token).await
    }
    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        self.hooks.renew(&self.inner, key, token, lease).await
    }
    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        self.hooks.get(&self.inner, key).await
    }
    async fn purge_expired(&self) -> Result<u64> {
        self.hooks.purge_expired(&self.inner).await
    }
    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        self.hooks.purge_expired_up_to(&self.inner, limit).await
    }
    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        self.hooks.forget(&self.inner, key, force).await
    }
    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        self.hooks.scan(&self.inner, cursor, limit).await
    }
    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        self.hooks.wait_for_change(&self.inner, key, max).await
    }
    fn keeps_steps(&self) -> bool {
        self.hooks.keeps_steps(&self.inner)
    }
    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        self.hooks
            .save_step(&self.inner, key, token, name, record)
            .await
    }
    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        self.hooks.load_steps(&self.inner, key, token).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use idem_runtime::MemoryStore;

    use super::*;

    /// Sets its flag when dropped.
    struct Guard(Arc<AtomicBool>);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }

    struct Renamed;

    impl Hooks for Renamed {
        fn backend(&self, _: &dyn Store) -> &'static str {
            "renamed"
        }
    }

    #[tokio::test]
    async fn forwards_what_the_hooks_leave_and_keeps_the_guard_until_the_last_clone() {
        let dropped = Arc::new(AtomicBool::new(false));
        let store = Intercept::new(MemoryStore::new()).keeping(Guard(dropped.clone()));
        assert_eq!((store.backend(), store.durable()), ("memory", false));
        let key = crate::unique("intercept");
        let claim = store.claim(&key, None, Duration::from_secs(5)).await;
        assert!(matches!(claim, Ok(Claim::Acquired { .. })), "{claim:?}");
        assert!(store.inner().get(&key).await.unwrap().is_some());

        let clone = store.clone();
        drop(store);
        assert!(!dropped.load(SeqCst), "a clone still holds the guard");
        drop(clone);
        assert!(dropped.load(SeqCst));

        let renamed = Intercept::with_hooks(MemoryStore::new(), Renamed);
        assert_eq!(renamed.backend(), "renamed");
    }
}
