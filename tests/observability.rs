//! Counters and `tracing` events (one test in its own binary: the counters are process-wide).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_support::AppError;
use idempotency::{counters, idempotent, MemoryStore, StorageKey, Store};
use tracing_subscriber::layer::SubscriberExt;

/// Collects the `message` of every event with target `idem`.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "idem" {
            return;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.lock().unwrap().push(m.0);
    }
}

impl Events {
    fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

#[idempotent(key = key, store = store.clone(), skip(store), lease = "200ms")]
async fn op(
    store: Arc<MemoryStore>,
    key: &str,
    amount: u32,
    fail: bool,
    sleep_ms: u64,
) -> Result<u32, AppError> {
    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    if fail {
        return Err(AppError::Transient("no".into()));
    }
    Ok(amount)
}

#[tokio::test]
async fn counters_and_events_follow_each_outcome() {
    let events = Events::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(events.clone()));
    let store = Arc::new(MemoryStore::new());
    let before = counters();

    op(store.clone(), "a", 1, false, 0).await.unwrap(); // miss
    op(store.clone(), "a", 1, false, 0).await.unwrap(); // hit
    op(store.clone(), "a", 2, false, 0).await.unwrap_err(); // key reuse
    let _ = op(store.clone(), "b", 1, true, 0).await; // miss, then release
    let slow = tokio::spawn(op(store.clone(), "c", 1, false, 100)); // miss
    tokio::time::sleep(Duration::from_millis(20)).await;
    op(store.clone(), "c", 1, false, 100).await.unwrap_err(); // conflict
    slow.await.unwrap().unwrap();
    // A crashed holder of "d": its lease runs out and the next call takes over.
    let operation = idempotency::Operation::from_path(concat!(module_path!(), "::op"));
    let key = StorageKey::derive_for(&operation, "", "d").unwrap();
    let fp = idem_runtime::__private::fingerprint_with(|f| {
        f.add("d")?.add(&1u32)?.add(&false)?.add(&0u64)?;
        Ok(())
    })
    .unwrap();
    store
        .claim(&key, Some(&fp), Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    op(store.clone(), "d", 1, false, 0).await.unwrap(); // miss + takeover

    let after = counters();
    assert_eq!(after.misses - before.misses, 4);
    assert_eq!(after.hits - before.hits, 1);
    assert_eq!(after.key_reuses - before.key_reuses, 1);
    assert_eq!(after.conflicts - before.conflicts, 1);
    assert_eq!(after.releases - before.releases, 1);
    assert_eq!(after.takeovers - before.takeovers, 1);
    assert_eq!(after.store_errors - before.store_errors, 0);

    assert_eq!(events.count("claimed"), 4);
    assert_eq!(events.count("replay"), 1);
    assert_eq!(events.count("key reused"), 1);
    assert_eq!(events.count("in flight elsewhere"), 1);
    assert_eq!(events.count("released"), 1);
    assert_eq!(events.count("took over"), 1);
    assert_eq!(events.count("completed"), 3);
}
