//! The replay marker: `observe` tells a first run from a replay without changing the
//! function's signature, and `on_replay` adjusts replayed values (only those) without changing
//! what is stored.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use idem_support::AppError;
use idempotency::{
    idempotent, observe, Call, Error, ErrorPolicy, MemoryStore, ReplayInfo, Served, StorageKey,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Ack {
    event: String,
    /// Set by the hook, never by the body: the stored value always has it `false`.
    replayed: bool,
    /// How many times the value went through the hook.
    hooked: u32,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);
static HOOKED: AtomicUsize = AtomicUsize::new(0);

/// The hook of [`counted`]: counts its calls at their start, and marks the value.
fn mark_counted(ack: Ack, info: &ReplayInfo) -> Ack {
    HOOKED.fetch_add(1, SeqCst);
    mark(ack, info)
}

/// The hook of the other functions (whose calls are not counted: tests run at once).
fn mark(ack: Ack, info: &ReplayInfo) -> Ack {
    assert!(!info.is_kept_error());
    Ack {
        replayed: true,
        hooked: ack.hooked + 1,
        ..ack
    }
}

/// The only function whose runs and hooks are counted, called by one test only.
#[idempotent(name = "tests.replay_marker.counted", key = event, store = store, skip(store), on_replay = mark_counted)]
async fn counted(store: &MemoryStore, event: &str) -> Result<Ack, AppError> {
    RUNS.fetch_add(1, SeqCst);
    Ok(Ack {
        event: event.to_string(),
        replayed: false,
        hooked: 0,
    })
}

#[idempotent(name = "tests.replay_marker.handle", key = event, store = store, skip(store), on_replay = mark)]
async fn handle(store: &MemoryStore, event: &str) -> Result<Ack, AppError> {
    Ok(Ack {
        event: event.to_string(),
        replayed: false,
        hooked: 0,
    })
}

#[tokio::test]
async fn first_run_then_replays_through_the_hook_once_each() {
    let store = MemoryStore::new();

    let (first, how) = observe(counted(&store, "evt_1")).await;
    let first = first.unwrap();
    let Some(Served::Ran {
        key,
        token,
        takeover,
        ..
    }) = how
    else {
        panic!("a first call runs: {how:?}")
    };
    assert!(!takeover);
    assert_eq!((first.replayed, first.hooked), (false, 0));
    assert_eq!(RUNS.load(SeqCst), 1);
    assert_eq!(HOOKED.load(SeqCst), 0, "no hook on a first run");

    let (retry, how) = observe(counted(&store, "evt_1")).await;
    let retry = retry.unwrap();
    let Some(Served::Replayed(info)) = &how else {
        panic!("a retry is replayed: {how:?}")
    };
    assert!(how.as_ref().is_some_and(Served::is_replay));
    assert_eq!(info.key(), &key);
    assert_eq!(info.token(), token, "the token of the call that ran");
    assert_eq!(
        retry,
        Ack {
            replayed: true,
            hooked: 1,
            ..first.clone()
        },
        "the hook's change reaches the caller"
    );
    assert_eq!(RUNS.load(SeqCst), 1, "the body ran once");
    assert_eq!(HOOKED.load(SeqCst), 1);

    // The stored record is the body's value: a third call gets it through the hook once more,
    // not through it twice.
    let (third, how) = observe(counted(&store, "evt_1")).await;
    assert!(matches!(how, Some(Served::Replayed(_))));
    assert_eq!(third.unwrap().hooked, 1);
    assert_eq!(HOOKED.load(SeqCst), 2);
    assert_eq!(RUNS.load(SeqCst), 1);
}

#[tokio::test]
async fn outside_observe_and_without_a_call() {
    let store = MemoryStore::new();
    // A call made outside `observe` works as ever.
    assert!(!handle(&store, "evt_plain").await.unwrap().replayed);
    assert!(handle(&store, "evt_plain").await.unwrap().replayed);
    // No idempotent call inside: nothing to tell.
    let (n, how) = observe(async { 7 }).await;
    assert_eq!((n, how), (7, None));
}

/// A function that owns its data runs its body on a task of its own: the marker and the hook
/// work there too (both happen in the caller).
#[idempotent(name = "tests.replay_marker.detached", key = id, on_replay = mark)]
async fn detached(id: String) -> Result<Ack, AppError> {
    Ok(Ack {
        event: id,
        replayed: false,
        hooked: 0,
    })
}

#[tokio::test]
async fn detached_calls_are_observed() {
    let id = format!("evt_detached_{}", idem_support::unique("detached"));
    let (a, how) = observe(detached(id.clone())).await;
    assert!(matches!(how, Some(Served::Ran { .. })), "{how:?}");
    assert!(!a.unwrap().replayed);
    let (b, how) = observe(detached(id)).await;
    assert!(matches!(how, Some(Served::Replayed(_))), "{how:?}");
    assert!(b.unwrap().replayed);
}

/// An outer call whose body makes an inner idempotent call (replayed) is reported, not the
/// inner one: the outer call is answered last.
#[idempotent(name = "tests.replay_marker.outer", key = event, store = store, skip(store))]
async fn outer(store: &MemoryStore, event: &str) -> Result<bool, AppError> {
    let inner = handle(store, event).await?;
    Ok(inner.replayed)
}

#[tokio::test]
async fn nested_calls_report_the_outer_one() {
    let store = MemoryStore::new();
    handle(&store, "evt_nested").await.unwrap();
    let (inner_replayed, how) = observe(outer(&store, "evt_nested")).await;
    assert!(inner_replayed.unwrap(), "the inner call was a replay");
    assert!(matches!(how, Some(Served::Ran { .. })), "{how:?}");

    // An `observe` inside the body sees the inner call; the outer one still sees its own.
    let (_, how) = observe(async {
        let (_, inner) = observe(handle(&store, "evt_nested")).await;
        assert!(matches!(inner, Some(Served::Replayed(_))), "{inner:?}");
    })
    .await;
    assert_eq!(
        how, None,
        "the inner call was seen by the inner observe only"
    );
}

#[tokio::test]
async fn refusals_are_neither_runs_nor_replays() {
    let store = MemoryStore::new();
    let key = || StorageKey::derive("tests.replay_marker", "busy").unwrap();
    let (started, start) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let call = Call::new(key()).store(&store);
        tokio::spawn(call.run(ErrorPolicy::never(), async move {
            started.send(()).unwrap();
            released.await.unwrap();
            Ok::<u32, Error>(1)
        }))
    };
    start.await.unwrap();
    let (busy, how) = observe(
        Call::new(key())
            .store(&store)
            .run(ErrorPolicy::never(), async { Ok::<u32, Error>(2) }),
    )
    .await;
    assert!(matches!(busy, Err(Error::InFlight { .. })), "{busy:?}");
    assert_eq!(how, Some(Served::Refused));
    release.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
}

/// `Call::on_replay` without the macro; kept errors are replayed, but not through the hook.
#[tokio::test]
async fn call_hook_skips_kept_errors() {
    let store = MemoryStore::new();
    let hooked = Arc::new(AtomicUsize::new(0));
    let call = |id: &str| {
        let hooked = hooked.clone();
        Call::new(StorageKey::derive("tests.replay_marker", id).unwrap())
            .store(&store)
            .on_replay(move |n: u32, _: &ReplayInfo| {
                hooked.fetch_add(1, SeqCst);
                n + 100
            })
    };
    let declined = || async { Err::<u32, AppError>(AppError::Declined("no".into())) };

    let (first, how) = observe(call("kept").run(ErrorPolicy::always(), declined())).await;
    assert!(matches!(first, Err(AppError::Declined(_))));
    assert!(matches!(how, Some(Served::Ran { .. })));
    let (again, how) = observe(call("kept").run(ErrorPolicy::always(), declined())).await;
    assert!(matches!(again, Err(AppError::Declined(_))));
    let Some(Served::Replayed(info)) = how else {
        panic!("a kept error is replayed: {how:?}")
    };
    assert!(info.is_kept_error());
    assert_eq!(hooked.load(SeqCst), 0, "no hook on a kept error");

    let ok = || async { Ok::<u32, AppError>(1) };
    assert_eq!(call("ok").run(ErrorPolicy::never(), ok()).await.unwrap(), 1);
    assert_eq!(
        call("ok").run(ErrorPolicy::never(), ok()).await.unwrap(),
        101
    );
    assert_eq!(hooked.load(SeqCst), 1);
}
