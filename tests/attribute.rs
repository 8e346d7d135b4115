//! The attribute's arguments and the single-caller behaviour: replay, key reuse, errors, ttl,
//! invalid keys, canonical fingerprints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use idem_support::AppError;
use idempotency::{idempotent, Error, MemoryStore, Store};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct ChargeRequest {
    order_id: u64,
    amount: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    id: u64,
    amount: u64,
}

struct Payments {
    store: Arc<MemoryStore>,
    runs: AtomicUsize,
}

impl Payments {
    fn new() -> Self {
        Payments {
            store: Arc::new(MemoryStore::new()),
            runs: AtomicUsize::new(0),
        }
    }

    /// A random receipt id shows whether a result was replayed or recomputed.
    #[idempotent(key = format!("charge:{}", req.order_id), ttl = "24h", store = self.store.clone())]
    async fn charge(&self, req: ChargeRequest) -> Result<Receipt, AppError> {
        self.runs.fetch_add(1, SeqCst);
        Ok(Receipt {
            id: rand::random(),
            amount: req.amount,
        })
    }

    #[idempotent(key = format!("decline:{}", req.order_id), store = self.store.clone())]
    async fn declined(&self, req: ChargeRequest) -> Result<Receipt, AppError> {
        self.runs.fetch_add(1, SeqCst);
        Err(AppError::Declined(format!(
            "order {} declined",
            req.order_id
        )))
    }

    #[idempotent(key = format!("keep:{}", req.order_id), store = self.store.clone(), cache_errors = true)]
    async fn declined_kept(&self, req: ChargeRequest) -> Result<Receipt, AppError> {
        self.runs.fetch_add(1, SeqCst);
        Err(AppError::Declined(format!(
            "order {} declined {}",
            req.order_id,
            rand::random::<u32>()
        )))
    }

    #[idempotent(key = req.order_id, store = self.store.clone(), cache_errors = is_permanent)]
    async fn flaky(&self, req: ChargeRequest, permanent: bool) -> Result<Receipt, AppError> {
        self.runs.fetch_add(1, SeqCst);
        if permanent {
            Err(AppError::Declined("no".into()))
        } else {
            Err(AppError::Transient("try again".into()))
        }
    }
}

fn is_permanent(e: &AppError) -> bool {
    matches!(e, AppError::Declined(_))
}

#[tokio::test]
async fn replay_returns_the_first_result_and_the_body_runs_once() {
    let p = Payments::new();
    let req = ChargeRequest {
        order_id: 1,
        amount: 500,
    };
    let first = p.charge(req.clone()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(p.charge(req.clone()).await.unwrap(), first);
    }
    assert_eq!(p.runs.load(SeqCst), 1);
    // Another key runs again and (almost surely) gets another random id.
    let other = p
        .charge(ChargeRequest {
            order_id: 2,
            amount: 500,
        })
        .await
        .unwrap();
    assert_eq!(p.runs.load(SeqCst), 2);
    assert_ne!(other.id, first.id);
}

#[tokio::test]
async fn same_key_different_arguments_is_key_reuse_and_does_not_run() {
    let p = Payments::new();
    p.charge(ChargeRequest {
        order_id: 7,
        amount: 500,
    })
    .await
    .unwrap();
    let err = p
        .charge(ChargeRequest {
            order_id: 7,
            amount: 999,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.idem(), Some(Error::KeyReuse { .. })),
        "{err:?}"
    );
    assert_eq!(p.runs.load(SeqCst), 1);
}

#[tokio::test]
async fn errors_are_not_kept_by_default() {
    let p = Payments::new();
    let req = ChargeRequest {
        order_id: 3,
        amount: 1,
    };
    assert!(matches!(
        p.declined(req.clone()).await,
        Err(AppError::Declined(_))
    ));
    assert!(matches!(
        p.declined(req.clone()).await,
        Err(AppError::Declined(_))
    ));
    assert_eq!(
        p.runs.load(SeqCst),
        2,
        "an Err releases the claim; the retry runs again"
    );
}

#[tokio::test]
async fn cache_errors_true_replays_the_err() {
    let p = Payments::new();
    let req = ChargeRequest {
        order_id: 4,
        amount: 1,
    };
    let Err(AppError::Declined(first)) = p.declined_kept(req.clone()).await else {
        panic!()
    };
    let Err(AppError::Declined(again)) = p.declined_kept(req.clone()).await else {
        panic!()
    };
    assert_eq!(first, again, "the kept error is replayed, not recomputed");
    assert_eq!(p.runs.load(SeqCst), 1);
}

#[tokio::test]
async fn cache_errors_predicate_keeps_only_accepted_errors() {
    let p = Payments::new();
    let req = ChargeRequest {
        order_id: 5,
        amount: 1,
    };
    assert!(matches!(
        p.flaky(req.clone(), false).await,
        Err(AppError::Transient(_))
    ));
    assert!(matches!(
        p.flaky(req.clone(), false).await,
        Err(AppError::Transient(_))
    ));
    assert_eq!(p.runs.load(SeqCst), 2, "transient errors are not kept");
    assert!(matches!(
        p.flaky(req.clone(), true).await,
        Err(AppError::Declined(_))
    ));
    // `permanent` is part of the fingerprint, so the replay needs the same arguments.
    assert!(matches!(
        p.flaky(req.clone(), true).await,
        Err(AppError::Declined(_))
    ));
    assert_eq!(
        p.runs.load(SeqCst),
        3,
        "the permanent error was kept and replayed"
    );
}

static PLAIN_RUNS: AtomicUsize = AtomicUsize::new(0);

/// A free function on the process-wide default store, keyed by content (no `key`).
#[idempotent]
async fn content_keyed(order: ChargeRequest) -> Result<u64, AppError> {
    PLAIN_RUNS.fetch_add(1, SeqCst);
    Ok(rand::random())
}

#[tokio::test]
async fn without_key_calls_are_deduplicated_by_content() {
    let a = content_keyed(ChargeRequest {
        order_id: 99,
        amount: 1,
    })
    .await
    .unwrap();
    let b = content_keyed(ChargeRequest {
        order_id: 99,
        amount: 1,
    })
    .await
    .unwrap();
    let c = content_keyed(ChargeRequest {
        order_id: 99,
        amount: 2,
    })
    .await
    .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(PLAIN_RUNS.load(SeqCst), 2);
}

#[idempotent(key = "fixed", store = store, skip(store))]
async fn by_map(store: &MemoryStore, items: HashMap<String, u32>) -> Result<u64, AppError> {
    Ok(rand::random())
}

#[tokio::test]
async fn equal_hashmaps_have_equal_fingerprints() {
    let store = MemoryStore::new();
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    for i in 0..50 {
        a.insert(format!("item{i}"), i);
    }
    for i in (0..50).rev() {
        b.insert(format!("item{i}"), i);
    }
    let first = by_map(&store, a).await.unwrap();
    assert_eq!(
        by_map(&store, b.clone()).await.unwrap(),
        first,
        "same content, same fingerprint"
    );
    b.insert("item0".into(), 1);
    assert!(matches!(
        by_map(&store, b).await.unwrap_err().idem(),
        Some(Error::KeyReuse { .. })
    ));
}

#[idempotent(key = key, store = store, skip(store), ttl = Duration::from_millis(200))]
async fn short_lived(store: &MemoryStore, key: &str) -> Result<u64, AppError> {
    Ok(rand::random())
}

#[tokio::test(start_paused = true)]
async fn after_the_ttl_the_body_runs_again() {
    let store = MemoryStore::new();
    let a = short_lived(&store, "k").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        short_lived(&store, "k").await.unwrap(),
        a,
        "within the ttl: replay"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_ne!(
        short_lived(&store, "k").await.unwrap(),
        a,
        "past the ttl: a new run"
    );
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "the new record is live"
    );
}

#[tokio::test]
async fn empty_and_overlong_keys_are_invalid_and_nothing_runs() {
    let store = MemoryStore::new();
    for key in [String::new(), "x".repeat(256)] {
        let err = short_lived(&store, &key).await.unwrap_err();
        assert!(
            matches!(err.idem(), Some(Error::InvalidKey { .. })),
            "{err:?}"
        );
    }
    assert!(store.is_empty(), "nothing was claimed");
    assert!(short_lived(&store, &"x".repeat(255)).await.is_ok());
}

// ---- every argument form compiles and does what it says -------------------------------------

#[idempotent(
    key = format!("all:{id}"),
    ttl = 3600,
    lease = "2s",
    store = store.clone(),
    scope = tenant,
    fingerprint = (id, amount),
    on_conflict = "wait",
    wait = "1s",
    cache_errors = false,
    max_record_bytes = 4096,
    on_unknown = "refuse",
    recovery = "1h",
    detach = false
)]
async fn every_argument(
    store: Arc<dyn Store>,
    tenant: &str,
    id: u32,
    amount: u32,
    note: String,
) -> Result<String, AppError> {
    Ok(format!(
        "{tenant}:{id}:{amount}:{note}:{}",
        rand::random::<u16>()
    ))
}

#[tokio::test]
async fn every_argument_together() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = every_argument(store.clone(), "t1", 1, 10, "x".into())
        .await
        .unwrap();
    // `note` is not in the explicit fingerprint: a different note still replays.
    assert_eq!(
        every_argument(store.clone(), "t1", 1, 10, "y".into())
            .await
            .unwrap(),
        a
    );
    // Another scope never shares the record.
    let b = every_argument(store.clone(), "t2", 1, 10, "x".into())
        .await
        .unwrap();
    assert!(b.starts_with("t2:"));
    let err = every_argument(store.clone(), "t1", 1, 11, "x".into())
        .await
        .unwrap_err();
    assert!(matches!(err.idem(), Some(Error::KeyReuse { .. })));
}

#[idempotent(key = "no-fp", store = store, fingerprint = false)]
async fn unfingerprinted(store: &MemoryStore, n: u32) -> Result<u32, AppError> {
    Ok(n)
}

#[tokio::test]
async fn fingerprint_false_replays_whatever_the_arguments() {
    let store = MemoryStore::new();
    assert_eq!(unfingerprinted(&store, 1).await.unwrap(), 1);
    assert_eq!(unfingerprinted(&store, 2).await.unwrap(), 1);
}

struct Counter {
    store: MemoryStore,
    n: u32,
}

impl Counter {
    #[idempotent(key = step, store = self.store.clone())]
    async fn bump(&mut self, step: u32) -> Result<u32, AppError> {
        self.n += step;
        Ok(self.n)
    }
}

#[tokio::test]
async fn mut_self_methods() {
    let mut c = Counter {
        store: MemoryStore::new(),
        n: 0,
    };
    assert_eq!(c.bump(5).await.unwrap(), 5);
    assert_eq!(
        c.bump(5).await.unwrap(),
        5,
        "replayed; the body did not run again"
    );
    assert_eq!(c.n, 5);
    assert_eq!(c.bump(2).await.unwrap(), 7);
}

#[idempotent(key = format!("{key}"), store = store, skip(store))]
async fn generic<T>(store: &MemoryStore, key: u32, value: T) -> Result<Vec<T>, AppError>
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send,
{
    Ok(vec![value.clone(), value])
}

#[tokio::test]
async fn generic_functions() {
    let store = MemoryStore::new();
    assert_eq!(
        generic(&store, 1, "a".to_string()).await.unwrap(),
        vec!["a", "a"]
    );
    assert_eq!(
        generic(&store, 1, "a".to_string()).await.unwrap(),
        vec!["a", "a"]
    );
    assert_eq!(generic(&store, 2, 7u8).await.unwrap(), vec![7, 7]);
}

#[async_trait::async_trait]
trait Charger {
    async fn charge(&self, order: u64, amount: u64) -> Result<u64, AppError>;
}

struct Gateway {
    store: Arc<MemoryStore>,
    runs: AtomicUsize,
}

#[async_trait::async_trait]
impl Charger for Gateway {
    #[idempotent(key = order, store = self.store.clone())]
    async fn charge(&self, order: u64, amount: u64) -> Result<u64, AppError> {
        self.runs.fetch_add(1, SeqCst);
        if amount == 0 {
            return Err(AppError::Declined("zero".into()));
        }
        Ok(amount + rand::random::<u32>() as u64)
    }
}

#[tokio::test]
async fn async_trait_methods() {
    let g = Gateway {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicUsize::new(0),
    };
    let dynamic: &dyn Charger = &g;
    let a = dynamic.charge(1, 10).await.unwrap();
    assert_eq!(dynamic.charge(1, 10).await.unwrap(), a);
    assert!(matches!(
        dynamic.charge(1, 11).await.unwrap_err().idem(),
        Some(Error::KeyReuse { .. })
    ));
    assert!(matches!(
        dynamic.charge(2, 0).await,
        Err(AppError::Declined(_))
    ));
    assert_eq!(g.runs.load(SeqCst), 2);
}

#[idempotent(key = key, store = store, skip(store), max_record_bytes = 400)]
async fn limited(store: &MemoryStore, key: &str, len: usize) -> Result<String, AppError> {
    LIMITED_RUNS.fetch_add(1, SeqCst);
    Ok("x".repeat(len))
}

static LIMITED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = key, store = store, skip(store), max_record_bytes = 400, on_unknown = "rerun")]
async fn limited_rerun(store: &MemoryStore, key: &str, len: usize) -> Result<String, AppError> {
    LIMITED_RERUN_RUNS.fetch_add(1, SeqCst);
    Ok("x".repeat(len))
}

static LIMITED_RERUN_RUNS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test]
async fn max_record_bytes_refuses_a_larger_result_which_is_then_an_unknown_outcome() {
    let store = MemoryStore::new();
    assert_eq!(limited(&store, "small", 10).await.unwrap().len(), 10);
    let err = limited(&store, "big", 1_000).await.unwrap_err();
    match err.idem() {
        Some(Error::TooLarge { size, limit }) => {
            assert_eq!(*limit, 400);
            assert!(*size > 1_000, "{size}");
        }
        other => panic!("{other:?}"),
    }
    // The body ran (its side effect may have happened) but its result was not kept: the key
    // holds a record of the unknown outcome, not the result, and is not run again.
    assert_eq!(store.len(), 2, "the small result and the unknown outcome");
    let again = limited(&store, "big", 1_000).await.unwrap_err();
    assert!(
        matches!(again.idem(), Some(Error::OutcomeUnknown { reason, .. }) if reason.contains("not stored")),
        "{again:?}"
    );
    assert_eq!(LIMITED_RUNS.load(SeqCst), 2, "small once, big once");
}

#[tokio::test]
async fn max_record_bytes_under_on_unknown_rerun_stores_nothing_and_runs_again() {
    let store = MemoryStore::new();
    for _ in 0..2 {
        let err = limited_rerun(&store, "big", 1_000).await.unwrap_err();
        assert!(
            matches!(err.idem(), Some(Error::TooLarge { limit: 400, .. })),
            "{err:?}"
        );
    }
    assert!(
        store.is_empty(),
        "nothing is stored: the claim was released"
    );
    assert_eq!(
        LIMITED_RERUN_RUNS.load(SeqCst),
        2,
        "at least once: run again"
    );
}
