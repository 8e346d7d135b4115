//! The memory store is bounded: a claim past its limits fails closed (the body does not run),
//! expired records make room by themselves, `forget` makes room, and memory is given back.
//! Measured with the store's own accounting (`len`, `bytes`, `capacity`), not the process's.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::Forgotten;
use idempotency::store::{Claim, FencingToken, ABANDONED_CLAIM_RETENTION};
use idempotency::{Call, Error, ErrorPolicy, MemoryStore, StorageKey, Store};

const LONG: Duration = Duration::from_secs(3600);

fn key(k: &str) -> StorageKey {
    StorageKey::derive("memory-bounds", k).unwrap()
}

async fn acquire(store: &MemoryStore, k: &str, lease: Duration) -> FencingToken {
    match store.claim(&key(k), None, lease).await.unwrap() {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected to acquire {k}, got {other:?}"),
    }
}

async fn completed(store: &MemoryStore, k: &str, record: &[u8], ttl: Duration) {
    let token = acquire(store, k, LONG).await;
    store.complete(&key(k), token, record, ttl).await.unwrap();
}

/// A call through the engine that counts its body's runs where the body starts.
async fn call(store: &MemoryStore, k: &str, runs: &AtomicU32) -> Result<u32, Error> {
    Call::new(key(k))
        .store(store)
        .ttl(LONG)
        .run(ErrorPolicy::never(), async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(7)
        })
        .await
}

fn assert_full(result: Result<impl std::fmt::Debug, Error>, limit: &str) {
    match result {
        Err(
            e @ Error::StoreFull {
                backend: "memory", ..
            },
        ) => assert!(e.to_string().contains(limit), "{e}"),
        other => panic!("expected a full memory store, got {other:?}"),
    }
}

#[tokio::test]
async fn full_by_records_refuses_new_keys_and_still_replays_old_ones() {
    let store = MemoryStore::builder().max_records(3).build().unwrap();
    let runs = AtomicU32::new(0);
    for k in ["a", "b", "c"] {
        assert_eq!(call(&store, k, &runs).await.unwrap(), 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    assert_full(call(&store, "d", &runs).await, "max_records(3)");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "the body of a refused call did not run"
    );
    assert_eq!(store.len(), 3);

    assert_eq!(call(&store, "a", &runs).await.unwrap(), 7, "replayed");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn full_by_bytes_refuses_claims_and_results_that_do_not_fit() {
    // What one record costs before its result, by the store's own count.
    let probe = MemoryStore::new();
    acquire(&probe, "probe", LONG).await;
    let entry = probe.bytes();
    assert!(entry > 64, "a record counts at least its key: {entry}");

    let store = MemoryStore::builder()
        .max_bytes(2 * entry + 100)
        .build()
        .unwrap();
    completed(&store, "a", &[1; 50], LONG).await;
    assert_eq!(store.bytes(), entry + 50);
    let b = acquire(&store, "b", LONG).await;
    assert_full(
        store.complete(&key("b"), b, &[2; 200], LONG).await,
        "max_bytes",
    );
    // A refused result changed nothing: the claim is still its holder's, and a smaller one fits.
    assert!(matches!(
        store.get(&key("b")).await.unwrap().unwrap().state,
        idempotency::store::RecordState::InFlight { token } if token == b
    ));
    store.complete(&key("b"), b, &[2; 40], LONG).await.unwrap();
    assert_eq!(store.bytes(), 2 * entry + 90);

    let runs = AtomicU32::new(0);
    assert_full(call(&store, "c", &runs).await, "max_bytes");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the body did not run");
    assert_eq!(
        store.bytes(),
        2 * entry + 90,
        "nothing reserved by the refusal"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_records_make_room_without_a_purge_call() {
    let store = MemoryStore::builder().max_records(2).build().unwrap();
    completed(&store, "a", b"a", Duration::from_secs(10)).await;
    completed(&store, "b", b"b", Duration::from_secs(10)).await;
    assert_full(store.claim(&key("c"), None, LONG).await, "max_records");

    tokio::time::advance(Duration::from_secs(11)).await;
    acquire(&store, "c", LONG).await;
    assert_eq!(store.len(), 1, "both expired records went to make room");
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_lease_ended_keeps_its_room_until_abandoned() {
    let store = MemoryStore::builder().max_records(1).build().unwrap();
    let lease = Duration::from_secs(10);
    let held = acquire(&store, "held", lease).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    // Its holder may still complete it: it is not evicted to make room.
    assert_full(store.claim(&key("other"), None, LONG).await, "max_records");
    assert!(store.get(&key("held")).await.unwrap().is_some());

    tokio::time::advance(ABANDONED_CLAIM_RETENTION).await;
    acquire(&store, "other", LONG).await;
    assert!(matches!(
        store.complete(&key("held"), held, b"late", LONG).await,
        Err(Error::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn forget_makes_room_and_fences_off_a_forced_holder() {
    let store = MemoryStore::builder().max_records(1).build().unwrap();
    completed(&store, "a", b"a", LONG).await;
    assert_full(store.claim(&key("b"), None, LONG).await, "max_records");
    assert!(matches!(
        store.forget(&key("a"), false).await.unwrap(),
        Forgotten::Completed { .. }
    ));
    assert_eq!((store.len(), store.bytes()), (0, 0));

    let old = acquire(&store, "b", LONG).await;
    match store.forget(&key("b"), false).await {
        Err(Error::InFlight { key: Some(k) }) => assert_eq!(k, key("b")),
        other => panic!("an in-flight record is not forgotten unforced: {other:?}"),
    }
    assert_eq!(
        store.forget(&key("b"), true).await.unwrap(),
        Forgotten::InFlight { token: old }
    );
    let new = acquire(&store, "b", LONG).await;
    assert_ne!(new, old, "tokens are never handed out twice");
    for result in [
        store.complete(&key("b"), old, b"stale", LONG).await,
        store.renew(&key("b"), old, LONG).await,
        store.release(&key("b"), old).await,
    ] {
        assert!(matches!(result, Err(Error::LeaseLost { .. })), "{result:?}");
    }
    store.complete(&key("b"), new, b"new", LONG).await.unwrap();
    assert_eq!(
        store.forget(&key("nothing"), true).await.unwrap(),
        Forgotten::Absent
    );
}

#[tokio::test(start_paused = true)]
async fn expired_records_drain_as_new_keys_arrive() {
    let store = MemoryStore::new();
    const OLD: usize = 1000;
    for i in 0..OLD {
        completed(&store, &format!("old-{i}"), b"x", Duration::from_secs(10)).await;
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut new = 0;
    // Each claim of a new key removes a few due records: far fewer claims than records.
    while store.len() > new && new < OLD {
        new += 1;
        acquire(&store, &format!("new-{new}"), LONG).await;
    }
    assert_eq!(store.len(), new, "every expired record is gone");
    assert!(new < OLD / 2, "took {new} claims to remove {OLD} records");
}

#[tokio::test(start_paused = true)]
async fn memory_is_given_back_once_records_expire() {
    let store = MemoryStore::new();
    const N: usize = 50_000;
    for i in 0..N {
        completed(&store, &format!("k{i}"), b"result", Duration::from_secs(10)).await;
    }
    let (len, bytes, capacity) = (store.len(), store.bytes(), store.capacity());
    assert_eq!(len, N);
    assert!(bytes >= N * (64 + 6), "{bytes}");
    assert!(capacity >= N, "{capacity}");

    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(store.purge_expired().await.unwrap(), N as u64);
    assert_eq!((store.len(), store.bytes()), (0, 0));
    assert!(
        store.capacity() < capacity / 4,
        "the table shrank: {} of {capacity}",
        store.capacity()
    );
}

#[tokio::test]
async fn limits_that_hold_nothing_are_configuration_errors() {
    for built in [
        MemoryStore::builder().max_records(0).build(),
        MemoryStore::builder().max_bytes(10).build(),
    ] {
        assert!(matches!(built, Err(Error::Config { .. })));
    }
    let store = MemoryStore::new();
    assert_eq!(store.max_records(), 250_000);
    assert_eq!(store.max_bytes(), 128 << 20);
}

#[tokio::test]
async fn scan_pages_through_every_record_once() {
    let store = MemoryStore::new();
    let mut expected = Vec::new();
    for i in 0..25 {
        completed(&store, &format!("s{i}"), b"r", LONG).await;
        expected.push(key(&format!("s{i}")));
    }
    let held = acquire(&store, "in-flight", LONG).await;
    expected.push(key("in-flight"));
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = store.scan(cursor.as_deref(), 4).await.unwrap();
        assert!(page.records.len() <= 4);
        seen.extend(page.records.iter().map(|r| r.key.clone()));
        if let Some(r) = page.records.iter().find(|r| r.key == key("in-flight")) {
            assert!(r.in_flight());
            assert_eq!(
                r.state,
                idempotency::store::RecordState::InFlight { token: held }
            );
        }
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "the listing ended");
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
    assert!(matches!(
        store.scan(Some("not-a-cursor"), 4).await,
        Err(Error::Config { .. })
    ));
}
