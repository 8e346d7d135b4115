//! Replays of a result type that is `Clone` clone the value this process decoded the first
//! time, instead of decoding the record's JSON again; other types decode every time. A decoded
//! value is only used for the very record it was decoded from: another store's record under the
//! same key, or a caller of another schema version, is never answered from it.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use idempotency::{idempotent, Error, MemoryStore};
use serde::{Deserialize, Deserializer, Serialize};

/// Counts how often a value of its type was decoded.
macro_rules! counted_type {
    ($name:ident, $counter:ident $(, $derive:ident)*) => {
        static $counter: AtomicUsize = AtomicUsize::new(0);

        #[derive(Debug, PartialEq, Serialize $(, $derive)*)]
        struct $name {
            text: String,
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                struct Raw {
                    text: String,
                }
                $counter.fetch_add(1, SeqCst);
                Raw::deserialize(d).map(|r| $name { text: r.text })
            }
        }
    };
}

counted_type!(Cloned, CLONED_DECODES, Clone);
counted_type!(NotCloned, NOT_CLONED_DECODES);

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(name = "decoded.cloned", key = key, store = store, skip(store))]
async fn cloned(store: &MemoryStore, key: &str, text: &str) -> Result<Cloned, Error> {
    RUNS.fetch_add(1, SeqCst);
    Ok(Cloned { text: text.into() })
}

#[idempotent(name = "decoded.not_cloned", key = key, store = store, skip(store))]
async fn not_cloned(store: &MemoryStore, key: &str) -> Result<NotCloned, Error> {
    Ok(NotCloned {
        text: "fresh".into(),
    })
}

/// The same operation and key as `cloned`, at schema version 2.
#[idempotent(name = "decoded.cloned", key = key, store = store, skip(store), version = 2)]
async fn cloned_v2(store: &MemoryStore, key: &str, text: &str) -> Result<Cloned, Error> {
    Ok(Cloned { text: text.into() })
}

// One test: the decode counters are per process.
#[tokio::test]
async fn replays_of_a_clone_type_decode_once() {
    // A type that is `Clone`: the first replay decodes (the first call decoded once more, to
    // check that its result can be replayed), the next ones clone.
    let store = MemoryStore::new();
    let first = cloned(&store, "k1", "a").await.unwrap();
    let after_first = CLONED_DECODES.load(SeqCst);
    for _ in 0..10 {
        assert_eq!(cloned(&store, "k1", "a").await.unwrap(), first);
    }
    assert_eq!(
        CLONED_DECODES.load(SeqCst) - after_first,
        1,
        "10 replays, one decode"
    );

    // A type that is not `Clone`: every replay decodes.
    let _ = not_cloned(&store, "k2").await.unwrap();
    let before = NOT_CLONED_DECODES.load(SeqCst);
    for _ in 0..10 {
        not_cloned(&store, "k2").await.unwrap();
    }
    assert_eq!(NOT_CLONED_DECODES.load(SeqCst) - before, 10);

    // Another store's record under the same key is its own: never answered with the value
    // decoded from the first store's record.
    let other = MemoryStore::new();
    let runs = RUNS.load(SeqCst);
    let b = cloned(&other, "k1", "a").await.unwrap();
    assert_eq!(RUNS.load(SeqCst), runs + 1, "the other store runs the body");
    assert_eq!(b, first, "equal value");
    let c = cloned(&other, "k1", "a").await.unwrap();
    assert_eq!(c, b);
    assert_eq!(cloned(&store, "k1", "a").await.unwrap(), first);
    assert_eq!(RUNS.load(SeqCst), runs + 1);

    // A caller of another schema version is refused, whether or not a decoded value of the
    // record is kept.
    for _ in 0..2 {
        let err = cloned_v2(&store, "k1", "a").await.unwrap_err();
        assert!(matches!(err, Error::TypeMismatch { .. }), "{err:?}");
    }
}
