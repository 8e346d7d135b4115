//! A holder knows its own deadline, and a late renewal is not a lost lease (issue 19 items 2
//! and 5), on the memory store, Redis and PostgreSQL (each wrapped in an `idem_testkit::Intercept`
//! that plays the network's part).
//!
//! - **The store cannot be reached to renew** (`unreachable_*`): the holder's renewals hang, so
//!   no refusal can ever reach it; another caller takes the key over once the lease lapses and
//!   charges. The holder, checking `is_lost()` right before its side effect, reads `true` (its
//!   own deadline passed) and does not charge: charges counted where they start, 1.
//! - **A renewal answered after the result was stored** (`late_renewal_*`): the store applies
//!   the result, its reply is held back, and a renewal lands meanwhile and is refused (the key is
//!   completed). Nobody took the key over: no "lease lost" is logged, and the call returns its
//!   value.
//!
//! Redis and PostgreSQL come from `IDEM_REDIS_URL` / `IDEM_POSTGRES_URL`; without them those
//! cases print why and pass, unless `IDEM_REQUIRE_SERVICES=1`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use idem_testkit::{Hooks, Intercept};
use idempotency::store::FencingToken;
use idempotency::{Call, Error, ErrorPolicy, MemoryStore, OnConflict, StorageKey, Store};
use tokio::sync::Notify;

/// The stores of these tests, by name, or `None` for one that is unreachable (skipped).
async fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    // `mut` is used only with the redis or postgres feature.
    #[allow(unused_mut)]
    let mut out: Vec<(&'static str, Arc<dyn Store>)> =
        vec![("memory", Arc::new(MemoryStore::new()))];
    #[cfg(feature = "redis")]
    if let Some(s) = idem_support::redis::fresh("lease_deadline").await {
        out.push(("redis", s));
    }
    #[cfg(feature = "postgres")]
    if let Some(s) = idem_support::postgres::fresh("lease_deadline").await {
        out.push(("postgres", s));
    }
    out
}

fn key(label: &str) -> StorageKey {
    StorageKey::derive(
        "lease-deadline",
        &format!("{label}-{:016x}", rand::random::<u64>()),
    )
    .expect("a key")
}

// ---- the store cannot be reached to renew --------------------------------------------------

/// Renewals hang until the test ends, as through a partition that drops every packet.
struct Unreachable {
    renewals: AtomicUsize,
    never: Notify,
}

#[async_trait::async_trait]
impl Hooks for Unreachable {
    async fn renew(
        &self,
        _inner: &dyn Store,
        _key: &StorageKey,
        _token: FencingToken,
        _lease: Duration,
    ) -> idempotency::Result<()> {
        self.renewals.fetch_add(1, SeqCst);
        self.never.notified().await;
        unreachable!("never notified")
    }
}

async fn unreachable(name: &str, store: Arc<dyn Store>) {
    let holder_store = Arc::new(Intercept::with_hooks(
        store.clone(),
        Unreachable {
            renewals: AtomicUsize::new(0),
            never: Notify::new(),
        },
    ));
    let key = key("unreachable");
    let lease = Duration::from_secs(1);
    let charges = Arc::new(AtomicUsize::new(0));
    let taken_over = Arc::new(Notify::new());
    let lost_at_side_effect = Arc::new(OnceLock::new());
    let started = Arc::new(Notify::new());

    let holder = tokio::spawn({
        let (key, charges, taken_over, seen, started) = (
            key.clone(),
            charges.clone(),
            taken_over.clone(),
            lost_at_side_effect.clone(),
            started.clone(),
        );
        let store = holder_store.clone();
        async move {
            Call::new(key)
                .store(store)
                .lease(lease)
                .run(ErrorPolicy::never(), async move {
                    let call = idempotency::context::current().expect("inside the call");
                    started.notify_one();
                    // Slow work, during which the store cannot be reached to renew; meanwhile
                    // another caller takes the key over.
                    taken_over.notified().await;
                    let lost = call.is_lost();
                    seen.set(lost).ok();
                    if !lost {
                        charges.fetch_add(1, SeqCst); // the side effect, counted as it starts
                    }
                    Ok::<_, Error>("holder".to_owned())
                })
                .await
        }
    });

    // Once the holder runs, the taker waits until its lease lapsed in the store, then charges.
    started.notified().await;
    let taker = Call::new(key.clone())
        .store(store.clone())
        .lease(lease)
        .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
        .run(ErrorPolicy::never(), {
            let charges = charges.clone();
            async move {
                charges.fetch_add(1, SeqCst);
                Ok::<_, Error>("taker".to_owned())
            }
        })
        .await;
    assert_eq!(taker.expect("the taker runs"), "taker", "{name}");
    taken_over.notify_one();
    let holder = holder.await.expect("the holder's task");

    assert!(
        holder_store.hooks().renewals.load(SeqCst) >= 1,
        "{name}: the holder tried to renew"
    );
    assert_eq!(
        lost_at_side_effect.get(),
        Some(&true),
        "{name}: the holder knows its lease lapsed, though no refusal could reach it"
    );
    assert_eq!(charges.load(SeqCst), 1, "{name}: one charge");
    assert!(
        matches!(holder, Err(Error::LeaseLost { .. })),
        "{name}: the stale holder's result is refused: {holder:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_the_holder_reads_its_own_deadline() {
    for (name, store) in stores().await {
        unreachable(name, store).await;
    }
}

// ---- a renewal answered after the result was stored ----------------------------------------

/// Holds back the reply of `complete` (after the store applied it) and sends renewals only once
/// the result is applied, so that one is refused while the caller still waits for the reply.
#[derive(Default)]
struct LateRenewal {
    applied: AtomicBool,
    applied_now: Notify,
    refused: AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for LateRenewal {
    async fn complete(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> idempotency::Result<()> {
        let out = inner.complete(key, token, record, ttl).await;
        self.applied.store(true, SeqCst);
        self.applied_now.notify_waiters();
        // The reply is on its way for a while.
        tokio::time::sleep(Duration::from_millis(400)).await;
        out
    }

    async fn renew(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> idempotency::Result<()> {
        while !self.applied.load(SeqCst) {
            let applied = self.applied_now.notified();
            if self.applied.load(SeqCst) {
                break;
            }
            applied.await;
        }
        let out = inner.renew(key, token, lease).await;
        if matches!(out, Err(Error::LeaseLost { .. })) {
            self.refused.fetch_add(1, SeqCst);
        }
        out
    }
}

/// Every event logged at WARN or above, with its fields.
fn warnings() -> &'static Mutex<Vec<String>> {
    static LOG: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LOG.get_or_init(|| {
        #[derive(Clone)]
        struct Sink;
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                warnings()
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(buf).into_owned());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| Sink)
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        Mutex::new(Vec::new())
    })
}

async fn late_renewal(name: &str, store: Arc<dyn Store>) {
    let _ = warnings();
    let store = Arc::new(Intercept::with_hooks(store, LateRenewal::default()));
    let key = key("late");
    let out = Call::new(key.clone())
        .store(store.clone())
        .lease(Duration::from_millis(400))
        .run(ErrorPolicy::never(), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, Error>(7)
        })
        .await;
    assert_eq!(out.expect("the call's value"), 7, "{name}");
    // Let a refused renewal's answer reach the renewal task, if it is still there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store.hooks().refused.load(SeqCst) >= 1,
        "{name}: a renewal landed after the result and was refused (the case under test)"
    );
    let hex = key.as_str().to_owned();
    let lost: Vec<String> = warnings()
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(&hex) && l.contains("lease lost"))
        .cloned()
        .collect();
    assert!(lost.is_empty(), "{name}: no lease loss is logged: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_renewal_after_the_result_is_not_a_lost_lease() {
    for (name, store) in stores().await {
        late_renewal(name, store).await;
    }
}
