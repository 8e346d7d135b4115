//! The background purger removes expired records without a purge call, from the memory store
//! and from SQLite (a file in a temporary directory), and stops once its store is dropped.

use std::sync::Arc;
use std::time::Duration;

use idempotency::store::{Claim, Purger, PurgerHandle};
use idempotency::{MemoryStore, StorageKey, Store};

const TTL: Duration = Duration::from_millis(100);
const LONG: Duration = Duration::from_secs(3600);

fn key(k: &str) -> StorageKey {
    StorageKey::derive("purger-tests", k).unwrap()
}

fn fast() -> Purger {
    Purger::new()
        .interval(Duration::from_millis(20))
        .batch(3)
        .jitter(0.5)
}

/// `n` records completed with a short ttl, and one with a long one.
async fn fill(store: &dyn Store, n: usize) {
    for i in 0..=n {
        let k = key(&format!("k{i}"));
        let Claim::Acquired { token, .. } = store.claim(&k, None, LONG).await.unwrap() else {
            panic!("acquired");
        };
        let ttl = if i == n { LONG } else { TTL };
        store.complete(&k, token, b"result", ttl).await.unwrap();
    }
}

/// Polls `count` (bounded: at most 400 times, 10 ms apart) until it reaches `want`.
async fn until(want: u64, mut count: impl FnMut() -> u64) -> u64 {
    let mut last = count();
    for _ in 0..400 {
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = count();
    }
    last
}

#[tokio::test]
async fn the_memory_store_is_purged_in_the_background() {
    let store = Arc::new(MemoryStore::new());
    fill(&*store, 10).await;
    let purger = fast().spawn_for(&store).unwrap();
    assert_eq!(
        until(1, || store.len() as u64).await,
        1,
        "only the live record is left"
    );
    assert_eq!(purger.stats().removed, 10);
    assert!(purger.stats().passes >= 1);
    assert_eq!(purger.stats().errors, 0);
    assert!(store.get(&key("k10")).await.unwrap().is_some());
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_sqlite_store_is_purged_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    // Without the store's own background purger, so that every removal is this purger's.
    let options = idempotency::sqlite::SqliteOptions::new().purge_in_background(false);
    let store: Arc<dyn Store> = Arc::new(
        idempotency::SqliteStore::open_with(&path, &options)
            .await
            .unwrap(),
    );
    fill(&*store, 10).await;
    let rows = rusqlite::Connection::open(&path).unwrap();
    let count = || {
        rows.query_row("SELECT count(*) FROM idem_records", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    };
    assert_eq!(count(), 11);
    let purger = fast().spawn_for(&store).unwrap();
    assert_eq!(until(1, count).await, 1, "only the live row is left");
    assert_eq!(purger.stats().removed, 10);
    // A purge that takes several steps: 10 records in batches of 3.
    assert!(store.get(&key("k10")).await.unwrap().is_some());
}

async fn finished(purger: &PurgerHandle) -> bool {
    for _ in 0..400 {
        if purger.is_finished() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    purger.is_finished()
}

#[tokio::test]
async fn the_purger_stops_once_its_store_is_dropped() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let weak = Arc::downgrade(&store);
    let purger = fast().spawn(weak.clone()).unwrap();
    // It holds the store only during a pass: it does not keep it alive.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!purger.is_finished());
    drop(store);
    assert!(
        weak.upgrade().is_none(),
        "the purger kept no strong reference"
    );
    assert!(finished(&purger).await, "the task ended");
    assert!(purger.store_gone());
}

#[tokio::test]
async fn a_stopped_purger_removes_nothing_more() {
    let store = Arc::new(MemoryStore::new());
    let purger = Purger::new()
        .interval(Duration::from_millis(20))
        .spawn_for(&store)
        .unwrap();
    purger.stop();
    fill(&*store, 5).await;
    // Long past the ttl and many intervals: the records are still there.
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(store.len(), 6);
}
