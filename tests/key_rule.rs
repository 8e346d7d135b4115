//! One key rule: a call built by hand with the public constructors (`Call::for_operation`,
//! `Call::by_content`) derives the storage key the attribute derives, so each finds the other's
//! records (issue 20: `Call::by_content` used to leave the operation out, and could never find a
//! record of the attribute).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use idempotency::{
    idempotent, Call, Error, ErrorPolicy, FingerprintBuilder, MemoryStore, Operation, Store,
};

static KEYED_RUNS: AtomicUsize = AtomicUsize::new(0);
static CONTENT_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(name = "key_rule.charge", key = order.clone(), scope = tenant.clone(), store = store.clone(), skip(store))]
async fn charge(
    store: Arc<dyn Store>,
    tenant: String,
    order: String,
    amount: u64,
) -> Result<String, Error> {
    let n = KEYED_RUNS.fetch_add(1, SeqCst) + 1;
    Ok(format!("{tenant}/{order}/{amount}/run-{n}"))
}

#[idempotent(name = "key_rule.notify", scope = tenant.clone(), store = store.clone(), skip(store))]
async fn notify(store: Arc<dyn Store>, tenant: String, email: String) -> Result<String, Error> {
    let n = CONTENT_RUNS.fetch_add(1, SeqCst) + 1;
    Ok(format!("{tenant}/{email}/run-{n}"))
}

#[tokio::test]
async fn a_hand_built_keyed_call_finds_the_attributes_record_and_back() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = charge(store.clone(), "acme".into(), "o-1".into(), 500)
        .await
        .expect("runs");
    let by_hand: Result<String, Error> =
        Call::for_operation(Operation::named("key_rule.charge"), "acme", "o-1")
            .expect("a key")
            .store(store.clone())
            .fingerprint(None)
            .run(ErrorPolicy::never(), async { Ok("by hand".to_owned()) })
            .await;
    assert_eq!(by_hand.expect("replayed"), first, "the attribute's record");
    assert_eq!(KEYED_RUNS.load(SeqCst), 1);

    // And the other way: the attribute replays what a hand-built call stored.
    let stored: Result<String, Error> =
        Call::for_operation(Operation::named("key_rule.charge"), "acme", "o-2")
            .expect("a key")
            .store(store.clone())
            .fingerprint(None)
            .run(ErrorPolicy::never(), async {
                Ok("stored by hand".to_owned())
            })
            .await;
    assert_eq!(stored.expect("runs"), "stored by hand");
    let replayed = charge(store, "acme".into(), "o-2".into(), 500)
        .await
        .expect("replays");
    assert_eq!(replayed, "stored by hand");
    assert_eq!(
        KEYED_RUNS.load(SeqCst),
        1,
        "the attribute's body did not run"
    );
}

#[tokio::test]
async fn a_hand_built_content_keyed_call_finds_the_attributes_record() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = notify(store.clone(), "acme".into(), "ana@example.com".into())
        .await
        .expect("runs");
    // The attribute's default fingerprint: the non-skipped parameters, in order.
    let mut fp = FingerprintBuilder::new();
    fp.add("acme").expect("fingerprint");
    fp.add("ana@example.com").expect("fingerprint");
    let by_hand: Result<String, Error> =
        Call::by_content(Operation::named("key_rule.notify"), "acme", fp.finish())
            .expect("a key")
            .store(store.clone())
            .run(ErrorPolicy::never(), async { Ok("by hand".to_owned()) })
            .await;
    assert_eq!(by_hand.expect("replayed"), first);
    assert_eq!(CONTENT_RUNS.load(SeqCst), 1);
}
