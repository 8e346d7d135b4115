//! The local cache tier (`LocalCache`): a replay of a record this process has seen makes no
//! store call; the fingerprint is still checked on a local hit; a claim in flight is never
//! cached; an entry stops replaying when its record expires, when it is forgotten through the
//! cache, and within the local bound when another process forgets it in the store. On Redis
//! too (when it is reachable), and behind the HTTP layer.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_testkit::{Hooks, Intercept};
use idempotency::store::{Claim, FencingToken, Forgotten};
use idempotency::{idempotent, Error, Fingerprint, LocalCache, MemoryStore, StorageKey, Store};

/// Counts the calls that reach the store behind the cache.
#[derive(Default)]
struct CountCalls {
    claims: AtomicUsize,
    completes: AtomicUsize,
}

#[async_trait]
impl Hooks for CountCalls {
    async fn claim(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> idempotency::Result<Claim> {
        self.claims.fetch_add(1, SeqCst);
        inner.claim(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.completes.fetch_add(1, SeqCst);
        inner.complete(key, token, record, ttl).await
    }
}

/// `inner`, its calls counted.
type Counted = Arc<Intercept<Arc<dyn Store>, CountCalls>>;

fn counted(inner: Arc<dyn Store>) -> Counted {
    Arc::new(Intercept::with_hooks(inner, CountCalls::default()))
}

fn claims(store: &Counted) -> usize {
    store.hooks().claims.load(SeqCst)
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Counts its starts (before anything else), then answers.
#[idempotent(name = "local_cache.charge", key = order, store = store.clone(), skip(store), ttl = ttl)]
async fn charge(
    store: LocalCache,
    order: String,
    cents: u64,
    ttl: Duration,
) -> Result<String, Error> {
    let n = RUNS.fetch_add(1, SeqCst) + 1;
    Ok(format!("receipt {order} {cents} run {n}"))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", rand::random::<u64>())
}

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn a_local_hit_makes_no_store_call(backend: Arc<dyn Store>) {
    let counted = counted(backend);
    let store = LocalCache::new(counted.clone());
    let order = unique("order");
    let first = charge(store.clone(), order.clone(), 100, DAY)
        .await
        .unwrap();
    assert_eq!(
        (claims(&counted), counted.hooks().completes.load(SeqCst)),
        (1, 1)
    );
    for _ in 0..20 {
        assert_eq!(
            charge(store.clone(), order.clone(), 100, DAY)
                .await
                .unwrap(),
            first
        );
    }
    assert_eq!(claims(&counted), 1, "20 replays, no store call");

    // The fingerprint is checked on a local hit: other arguments under the key are refused,
    // without a store call, and run nothing.
    let reused = charge(store.clone(), order.clone(), 999, DAY).await;
    assert!(matches!(reused, Err(Error::KeyReuse { .. })), "{reused:?}");
    assert_eq!(claims(&counted), 1);

    // Another process (a second cache over the same store) reads the record once from the
    // store, then replays it locally.
    let other = LocalCache::new(counted.clone());
    for _ in 0..5 {
        assert_eq!(
            charge(other.clone(), order.clone(), 100, DAY)
                .await
                .unwrap(),
            first
        );
    }
    assert_eq!(claims(&counted), 2, "one store read for the second process");
}

#[tokio::test]
async fn memory_a_local_hit_makes_no_store_call() {
    a_local_hit_makes_no_store_call(Arc::new(MemoryStore::new())).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_a_local_hit_makes_no_store_call() {
    let Some(store) = idem_support::redis::store("local_cache").await else {
        return;
    };
    a_local_hit_makes_no_store_call(Arc::new(store)).await;
}

#[tokio::test]
async fn a_claim_in_flight_is_never_cached() {
    let inner = MemoryStore::new();
    let counted = counted(Arc::new(inner.clone()));
    let store = LocalCache::new(counted.clone());
    let key = StorageKey::derive("local_cache", "in-flight").unwrap();
    let Claim::Acquired { token, .. } = store
        .claim(&key, None, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("claims a fresh key");
    };
    for round in 1..=3 {
        let again = store.claim(&key, None, Duration::from_secs(30)).await;
        assert_eq!(again.unwrap(), Claim::InFlight);
        assert_eq!(
            claims(&counted),
            1 + round,
            "each claim of a key in flight asks the store"
        );
    }
    store.release(&key, token).await.unwrap();
}

#[tokio::test]
async fn an_entry_expires_with_its_record() {
    let store = LocalCache::builder()
        .max_age(Duration::from_secs(3600))
        .build(MemoryStore::new());
    let order = unique("short");
    let ttl = Duration::from_millis(300);
    let first = charge(store.clone(), order.clone(), 1, ttl).await.unwrap();
    assert_eq!(
        charge(store.clone(), order.clone(), 1, ttl).await.unwrap(),
        first
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let after = charge(store.clone(), order.clone(), 1, ttl).await.unwrap();
    assert_ne!(
        after, first,
        "past the record's ttl, the body runs again: {after}"
    );
}

#[tokio::test]
async fn forgotten_through_the_cache_stops_at_once_and_elsewhere_within_the_bound() {
    let shared = MemoryStore::new();
    let bound = Duration::from_millis(400);
    let store = LocalCache::builder().max_age(bound).build(shared.clone());
    let order = unique("forget");
    let key = StorageKey::derive_for(
        &idempotency::Operation::named("local_cache.charge"),
        "",
        &order,
    )
    .unwrap();

    // Forgotten through the cache: the next call runs at once.
    let first = charge(store.clone(), order.clone(), 5, DAY).await.unwrap();
    let forgotten = store.forget(&key, false).await.unwrap();
    assert!(
        matches!(forgotten, Forgotten::Completed { .. }),
        "{forgotten:?}"
    );
    let second = charge(store.clone(), order.clone(), 5, DAY).await.unwrap();
    assert_ne!(
        second, first,
        "runs again right after a forget through the cache"
    );

    // Forgotten by another process, in the store itself: replayed here until the local bound,
    // then run again.
    let forgotten = shared.forget(&key, false).await.unwrap();
    assert!(
        matches!(forgotten, Forgotten::Completed { .. }),
        "{forgotten:?}"
    );
    let cached = charge(store.clone(), order.clone(), 5, DAY).await.unwrap();
    assert_eq!(
        cached, second,
        "within the bound, the local entry still replays"
    );
    tokio::time::sleep(bound + Duration::from_millis(100)).await;
    let third = charge(store.clone(), order.clone(), 5, DAY).await.unwrap();
    assert_ne!(
        third, second,
        "past the local bound, the key runs again: {third}"
    );
}

#[tokio::test]
async fn a_zero_bound_keeps_nothing() {
    let counted = counted(Arc::new(MemoryStore::new()));
    let store = LocalCache::builder()
        .max_age(Duration::ZERO)
        .build(counted.clone());
    let order = unique("zero");
    let first = charge(store.clone(), order.clone(), 1, DAY).await.unwrap();
    assert_eq!(
        charge(store.clone(), order.clone(), 1, DAY).await.unwrap(),
        first
    );
    assert_eq!(claims(&counted), 2, "the replay came from the store");
    assert_eq!(store.cached(), 0);
}

#[cfg(feature = "http")]
mod http_layer {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use idempotency::http::{IdempotencyLayer, RequestBody};
    use std::convert::Infallible;
    use tower::{service_fn, Layer, ServiceExt};

    #[tokio::test]
    async fn a_replayed_response_makes_no_store_call() {
        let counted = counted(Arc::new(MemoryStore::new()));
        let layer = IdempotencyLayer::shared(LocalCache::new(counted.clone()), "local");
        let runs = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(service_fn({
            let runs = runs.clone();
            move |_req: Request<RequestBody<Full<Bytes>>>| {
                let n = runs.fetch_add(1, SeqCst) + 1;
                async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run {n}")))))
                }
            }
        }));
        let post = |body: &'static str| {
            Request::post("/pay")
                .header("idempotency-key", "k-1")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        let mut answers = Vec::new();
        for _ in 0..5 {
            let res = svc.clone().oneshot(post("{\"a\":1}")).await.unwrap();
            assert_eq!(res.status(), 200);
            answers.push(res.into_body().collect().await.unwrap().to_bytes());
        }
        assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
        assert_eq!(runs.load(SeqCst), 1);
        assert_eq!(claims(&counted), 1, "4 replays, no store call");
        // Another body under the key: refused on the local hit.
        let res = svc.clone().oneshot(post("{\"a\":2}")).await.unwrap();
        assert_eq!(res.status(), 422);
        assert_eq!((runs.load(SeqCst), claims(&counted)), (1, 1));
    }
}
