//! A result that could not be replayed is refused when it is stored, not found out on the
//! retry: serde_json writes `NaN` and infinities as `null`, which no `f64` decodes from. The
//! first call gets `Error::Encode` saying so (the body ran: its outcome is recorded as unknown,
//! so the retry is refused with `OutcomeUnknown`, never a misleading `TypeMismatch` that asks
//! for a `version` bump).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use idempotency::{idempotent, Error, MemoryStore, Store};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Quote {
    price: f64,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(name = "encode_check.quote", key = id.clone(), store = store.clone(), skip(store, price))]
async fn quote(store: Arc<dyn Store>, id: String, price: f64) -> Result<Quote, Error> {
    RUNS.fetch_add(1, SeqCst);
    Ok(Quote { price })
}

#[tokio::test]
async fn a_nan_is_refused_at_the_first_call() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for (id, price) in [("nan", f64::NAN), ("inf", f64::INFINITY)] {
        let before = RUNS.load(SeqCst);
        let first = quote(store.clone(), id.into(), price).await;
        match &first {
            Err(Error::Encode(e)) => assert!(e.to_string().contains("NaN"), "{e}"),
            other => panic!("{id}: the first call is an Encode error, got {other:?}"),
        }
        let retry = quote(store.clone(), id.into(), 1.0).await;
        assert!(
            matches!(retry, Err(Error::OutcomeUnknown { .. })),
            "{id}: the retry is refused as an unknown outcome, not a TypeMismatch: {retry:?}"
        );
        assert_eq!(RUNS.load(SeqCst), before + 1, "{id}: the body ran once");
    }
    // A finite value is stored and replayed as usual.
    let ok = quote(store.clone(), "finite".into(), 9.5)
        .await
        .expect("runs");
    let again = quote(store, "finite".into(), 0.0).await.expect("replays");
    assert_eq!((ok.price, again.price), (9.5, 9.5));
}
