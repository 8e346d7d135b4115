//! Durable steps (`idempotency::step`) on the memory store, in one process: what runs once,
//! what is replayed when a call resumes, what is refused, and how many store round trips they
//! cost. The same protocol on every store is the conformance suite's (`idem-testkit`, cases
//! `steps_*`); the multi-process crash tests are `tests/steps_processes.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_testkit::{async_trait, Hooks, Intercept};
use idempotency::store::{Claim, FencingToken};
use idempotency::{
    idempotent, step, step_key, Call, Error, ErrorPolicy, Fingerprint, MemoryStore, OnConflict,
    StorageKey, Store,
};
use serde::{Deserialize, Serialize};

/// Side effects, counted where they start (before any `.await` of the step).
#[derive(Default, Clone)]
struct Ledger(Arc<Mutex<HashMap<String, usize>>>);

impl Ledger {
    fn start(&self, what: &str) {
        *self.0.lock().unwrap().entry(what.to_string()).or_default() += 1;
    }
    fn runs(&self, what: &str) -> usize {
        self.0.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

/// Counts the store operations a call makes.
#[derive(Default)]
struct Count {
    ops: Mutex<HashMap<&'static str, usize>>,
}

impl Count {
    fn add(&self, op: &'static str) {
        *self.ops.lock().unwrap().entry(op).or_default() += 1;
    }
    fn take(&self) -> HashMap<&'static str, usize> {
        std::mem::take(&mut self.ops.lock().unwrap())
    }
}

#[async_trait]
impl Hooks for Count {
    async fn claim(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> idempotency::Result<Claim> {
        self.add("claim");
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
        self.add("complete");
        inner.complete(key, token, record, ttl).await
    }
    async fn renew(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> idempotency::Result<()> {
        self.add("renew");
        inner.renew(key, token, lease).await
    }
    async fn release(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
    ) -> idempotency::Result<()> {
        self.add("release");
        inner.release(key, token).await
    }
    async fn save_step(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> idempotency::Result<()> {
        self.add("save_step");
        inner.save_step(key, token, name, record).await
    }
    async fn load_steps(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
    ) -> idempotency::Result<Vec<(String, bytes::Bytes)>> {
        self.add("load_steps");
        inner.load_steps(key, token).await
    }
}

fn key(label: &str) -> StorageKey {
    StorageKey::derive("steps-test", &format!("{label}-{}", rand::random::<u64>())).unwrap()
}

fn counted() -> Arc<Intercept<MemoryStore, Count>> {
    Arc::new(Intercept::with_hooks(MemoryStore::new(), Count::default()))
}

/// A three-step body: `charge`, `email`, `ledger`; `stop_in` names a step that never ends (the
/// call is then cut off from outside, as by a crash or a caller that leaves).
async fn three_steps(ledger: Ledger, stop_in: Option<&'static str>) -> Result<String, Error> {
    let charge: String = step("charge", async {
        ledger.start("charge");
        if stop_in == Some("charge") {
            std::future::pending::<()>().await;
        }
        Ok::<_, Error>(format!("ch_{}", rand::random::<u32>()))
    })
    .await?;
    step("email", async {
        ledger.start("email");
        if stop_in == Some("email") {
            std::future::pending::<()>().await;
        }
        Ok::<_, Error>(())
    })
    .await?;
    let entry: u64 = step("ledger", async {
        ledger.start("ledger");
        if stop_in == Some("ledger") {
            std::future::pending::<()>().await;
        }
        Ok::<_, Error>(7)
    })
    .await?;
    Ok(format!("{charge}/{entry}"))
}

fn call(store: &Arc<impl Store + 'static>, key: &StorageKey) -> Call {
    Call::new(key.clone())
        .store(store.clone())
        .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
}

#[tokio::test]
async fn steps_run_once_and_a_completed_call_replays_without_them() {
    let store = counted();
    let (k, ledger) = (key("once"), Ledger::default());
    let first = call(&store, &k)
        .run(ErrorPolicy::never(), three_steps(ledger.clone(), None))
        .await
        .unwrap();
    let ops = store.hooks().take();
    assert_eq!(ops.get("claim"), Some(&1));
    assert_eq!(
        ops.get("save_step"),
        Some(&3),
        "one round trip per step: {ops:?}"
    );
    assert_eq!(
        ops.get("load_steps"),
        None,
        "a first run loads nothing: {ops:?}"
    );
    assert_eq!(ops.get("complete"), Some(&1));
    for _ in 0..3 {
        let again = call(&store, &k)
            .run(ErrorPolicy::never(), three_steps(ledger.clone(), None))
            .await
            .unwrap();
        assert_eq!(again, first);
    }
    let ops = store.hooks().take();
    assert_eq!(
        ops,
        HashMap::from([("claim", 3)]),
        "a replay costs its claim and nothing more"
    );
    for s in ["charge", "email", "ledger"] {
        assert_eq!(ledger.runs(s), 1, "{s}");
    }
}

/// A call cut off in the middle of a step (its caller left: the engine suspends it, keeping
/// its steps) is resumed by the next call with the key: the completed steps are replayed, the
/// interrupted one runs again, the rest once.
#[tokio::test]
async fn an_interrupted_call_resumes_where_it_stopped() {
    for stop_in in ["charge", "email", "ledger"] {
        let store = counted();
        let (k, ledger) = (key(stop_in), Ledger::default());
        let cut = tokio::time::timeout(
            Duration::from_millis(200),
            call(&store, &k).run(
                ErrorPolicy::never(),
                three_steps(ledger.clone(), Some(stop_in)),
            ),
        )
        .await;
        assert!(cut.is_err(), "the first call never ends by itself");
        store.hooks().take();
        let out = call(&store, &k)
            .run(ErrorPolicy::never(), three_steps(ledger.clone(), None))
            .await
            .unwrap();
        let ops = store.hooks().take();
        let expected = |s: &str| {
            let order = ["charge", "email", "ledger"];
            let (at, stop) = (
                order.iter().position(|x| *x == s).unwrap(),
                order.iter().position(|x| *x == stop_in).unwrap(),
            );
            if at <= stop {
                if at == stop {
                    2
                } else {
                    1
                }
            } else {
                1
            }
        };
        for s in ["charge", "email", "ledger"] {
            assert_eq!(ledger.runs(s), expected(s), "stopped in {stop_in}: {s}");
        }
        if stop_in != "charge" {
            assert_eq!(ops.get("load_steps"), Some(&1), "{ops:?}");
        }
        // Every later caller gets the same result, and nothing runs again.
        let again = call(&store, &k)
            .run(ErrorPolicy::never(), three_steps(ledger.clone(), None))
            .await
            .unwrap();
        assert_eq!(again, out);
    }
}

/// A body that returns an error it does not keep, after a step completed: the claim is
/// suspended (not released), and the retry resumes without running the step again.
#[tokio::test]
async fn an_error_after_a_step_keeps_the_step_for_the_retry() {
    let store = Arc::new(MemoryStore::new());
    let (k, ledger) = (key("err"), Ledger::default());
    let fail = Arc::new(AtomicUsize::new(1));
    let body = |ledger: Ledger, fail: Arc<AtomicUsize>| async move {
        let id: String = step("charge", async {
            ledger.start("charge");
            Ok::<_, Error>("ch_1".to_string())
        })
        .await?;
        if fail.fetch_sub(1, SeqCst) > 0 {
            return Err(Error::config("the mail server said 503"));
        }
        step("email", async {
            ledger.start("email");
            Ok::<_, Error>(())
        })
        .await?;
        Ok::<_, Error>(id)
    };
    let first = call(&store, &k)
        .run(ErrorPolicy::never(), body(ledger.clone(), fail.clone()))
        .await;
    assert!(matches!(first, Err(Error::Config { .. })), "{first:?}");
    let second = call(&store, &k)
        .run(ErrorPolicy::never(), body(ledger.clone(), fail.clone()))
        .await
        .unwrap();
    assert_eq!(second, "ch_1");
    assert_eq!((ledger.runs("charge"), ledger.runs("email")), (1, 1));
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum PayError {
    Declined(String),
    Timeout,
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

fn declined(e: &PayError) -> bool {
    matches!(e, PayError::Declined(_))
}

/// A step's error follows the call's policy: one the call keeps is stored and replayed when the
/// call resumes; one it does not keep is not, and the step runs again.
#[tokio::test]
async fn step_errors_follow_the_calls_error_policy() {
    let store = Arc::new(MemoryStore::new());
    let (k, ledger) = (key("kept"), Ledger::default());
    let body = |ledger: Ledger, hang: bool| async move {
        let charged = step("charge", async {
            ledger.start("charge");
            Err::<String, _>(PayError::Declined("insufficient funds".into()))
        })
        .await;
        let notice = step("notify", async {
            ledger.start("notify");
            Err::<(), _>(PayError::Timeout)
        })
        .await;
        assert_eq!(notice, Err(PayError::Timeout));
        if hang {
            std::future::pending::<()>().await;
        }
        charged
    };
    let policy = || ErrorPolicy::when(declined as fn(&PayError) -> bool);
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        call(&store, &k).run(policy(), body(ledger.clone(), true)),
    )
    .await;
    assert!(cut.is_err());
    let out = call(&store, &k)
        .run(policy(), body(ledger.clone(), false))
        .await;
    assert_eq!(out, Err(PayError::Declined("insufficient funds".into())));
    assert_eq!(ledger.runs("charge"), 1, "a kept error is replayed");
    assert_eq!(ledger.runs("notify"), 2, "an error not kept runs again");
}

#[tokio::test]
async fn misuse_is_an_error_and_runs_nothing() {
    let ran = Arc::new(AtomicUsize::new(0));
    let outside: Result<u32, Error> = step("alone", async {
        ran.fetch_add(1, SeqCst);
        Ok(1)
    })
    .await;
    let e = outside.unwrap_err();
    assert!(matches!(e, Error::Misuse { .. }), "{e:?}");
    assert!(e.to_string().contains("outside an idempotent call"), "{e}");
    assert!(!e.is_retryable());
    assert!(step_key("alone").is_err());

    let store = Arc::new(MemoryStore::new());
    let out: Result<(), Error> = call(&store, &key("twice"))
        .run(ErrorPolicy::never(), async {
            for _ in 0..2 {
                step("same", async {
                    ran.fetch_add(1, SeqCst);
                    Ok::<_, Error>(())
                })
                .await?;
            }
            Ok(())
        })
        .await;
    let e = out.unwrap_err();
    assert!(matches!(e, Error::Misuse { .. }), "{e:?}");
    assert!(e.to_string().contains("`same` ran twice"), "{e}");

    let out: Result<(), Error> = call(&store, &key("empty"))
        .run(ErrorPolicy::never(), async {
            step("", async {
                ran.fetch_add(1, SeqCst);
                Ok::<_, Error>(())
            })
            .await
        })
        .await;
    assert!(matches!(out, Err(Error::Misuse { .. })), "{out:?}");

    // In a task the body spawned: the call is not that task's; the context, passed along, is.
    let out: Result<u32, Error> = call(&store, &key("spawned"))
        .run(ErrorPolicy::never(), async {
            let lost = tokio::spawn(step("in-task", async { Ok::<_, Error>(1) }))
                .await
                .unwrap();
            assert!(matches!(lost, Err(Error::Misuse { .. })), "{lost:?}");
            let ctx = idempotency::context::current().unwrap();
            tokio::spawn(async move { ctx.step("in-task", async { Ok::<_, Error>(2u32) }).await })
                .await
                .unwrap()
        })
        .await;
    assert_eq!(out.unwrap(), 2);
    assert_eq!(
        ran.load(SeqCst),
        1,
        "only the first of the twice-named steps ran"
    );
}

/// A resumed call that reads a step as another type gets `TypeMismatch`, not a wrong value.
#[tokio::test]
async fn a_step_stored_as_another_type_is_a_type_mismatch() {
    let store = Arc::new(MemoryStore::new());
    let k = key("type");
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        call(&store, &k).run(ErrorPolicy::never(), async {
            step("charge", async { Ok::<_, Error>("ch_1".to_string()) }).await?;
            std::future::pending::<()>().await;
            Ok::<u64, Error>(0)
        }),
    )
    .await;
    assert!(cut.is_err());
    let out: Result<u64, Error> = call(&store, &k)
        .run(ErrorPolicy::never(), async {
            let n: u64 = step("charge", async { Ok::<_, Error>(1u64) }).await?;
            Ok(n)
        })
        .await;
    assert!(matches!(out, Err(Error::TypeMismatch { .. })), "{out:?}");
}

/// A holder whose claim is gone cannot record a step: it learns so before the step starts
/// (the claim already lost) or when saving (lost while it ran).
#[tokio::test]
async fn a_holder_that_lost_its_claim_cannot_record_a_step() {
    let store = Arc::new(MemoryStore::new());
    let k = key("fenced");
    let ledger = Ledger::default();
    let out: Result<(), Error> = call(&store, &k)
        .run(ErrorPolicy::never(), {
            let (store, k, ledger) = (store.clone(), k.clone(), ledger.clone());
            async move {
                let saved = step("charge", async {
                    ledger.start("charge");
                    // An operator forces the key free while the step runs.
                    store.forget(&k, true).await.unwrap();
                    Ok::<_, Error>(())
                })
                .await;
                assert!(matches!(saved, Err(Error::LeaseLost { .. })), "{saved:?}");
                let next = step("email", async {
                    ledger.start("email");
                    Ok::<_, Error>(())
                })
                .await;
                assert!(matches!(next, Err(Error::LeaseLost { .. })), "{next:?}");
                next
            }
        })
        .await;
    assert!(matches!(out, Err(Error::LeaseLost { .. })), "{out:?}");
    assert_eq!((ledger.runs("charge"), ledger.runs("email")), (1, 0));
}

/// A store that cannot keep steps (written before they existed) refuses a step before it runs.
#[tokio::test]
async fn a_store_without_steps_refuses_before_running() {
    struct Old;
    #[async_trait]
    impl Hooks for Old {
        fn keeps_steps(&self, _: &dyn Store) -> bool {
            false
        }
    }
    let store = Arc::new(Intercept::with_hooks(MemoryStore::new(), Old));
    let ran = AtomicUsize::new(0);
    let out: Result<(), Error> = call(&store, &key("old"))
        .run(ErrorPolicy::never(), async {
            step("charge", async {
                ran.fetch_add(1, SeqCst);
                Ok::<_, Error>(())
            })
            .await
        })
        .await;
    assert!(matches!(out, Err(Error::Config { .. })), "{out:?}");
    assert_eq!(ran.load(SeqCst), 0);
}

/// `step_key` is the same in every run of a call (also when a later call resumes it) and
/// differs between steps and calls.
#[tokio::test]
async fn step_keys_are_stable_across_runs_and_distinct() {
    let store = Arc::new(MemoryStore::new());
    let k = key("keys");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let body = |seen: Arc<Mutex<Vec<String>>>, hang: bool| async move {
        let charge = step("charge", async {
            let key = step_key("charge")?;
            assert_ne!(key, step_key("email")?);
            assert_eq!(key.len(), 64);
            Ok::<_, Error>(key)
        })
        .await?;
        seen.lock().unwrap().push(step_key("charge")?);
        if hang {
            std::future::pending::<()>().await;
        }
        Ok::<_, Error>(charge)
    };
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        call(&store, &k).run(ErrorPolicy::never(), body(seen.clone(), true)),
    )
    .await;
    assert!(cut.is_err());
    let resumed = call(&store, &k)
        .run(ErrorPolicy::never(), body(seen.clone(), false))
        .await
        .unwrap();
    let other = call(&store, &key("keys-other"))
        .run(ErrorPolicy::never(), body(seen.clone(), false))
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], seen[1], "the same in the resumed run");
    assert_eq!(resumed, seen[0], "the replayed step saw the same key");
    assert_ne!(seen[0], other, "another call, another key");
}

// ---------------------------------------------------------------------------------------------
// The attribute.

static CHARGES: AtomicUsize = AtomicUsize::new(0);
static EMAILS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    fail_email: bool,
}

#[idempotent(name = "steps.checkout", key = order.id.clone(), fingerprint = false)]
async fn checkout(order: Order) -> Result<String, Error> {
    let charge: String = step("charge", async {
        CHARGES.fetch_add(1, SeqCst);
        Ok::<_, Error>(format!("ch-{}", order.id))
    })
    .await?;
    step("email", async {
        EMAILS.fetch_add(1, SeqCst);
        if order.fail_email {
            Err(Error::config("smtp down"))
        } else {
            Ok(())
        }
    })
    .await?;
    Ok(charge)
}

#[tokio::test]
async fn steps_inside_an_idempotent_function() {
    let id = format!("o-{}", rand::random::<u64>());
    let failed = checkout(Order {
        id: id.clone(),
        fail_email: true,
    })
    .await;
    assert!(failed.is_err());
    let ok = checkout(Order {
        id: id.clone(),
        fail_email: false,
    })
    .await
    .unwrap();
    assert_eq!(ok, format!("ch-{id}"));
    assert_eq!(CHARGES.load(SeqCst), 1, "the charge ran once");
    assert_eq!(EMAILS.load(SeqCst), 2, "the failed email ran again");
}

// ---------------------------------------------------------------------------------------------
// The HTTP layer.

#[cfg(feature = "http")]
mod http_layer {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use idempotency::http::{IdempotencyLayer, RequestBody};
    use tower::{service_fn, Layer, ServiceExt};

    /// A handler with two steps whose second fails once with a 503: the retry replays the
    /// first step and runs only the second.
    #[tokio::test]
    async fn steps_inside_a_handler_behind_the_layer() {
        let ledger = Ledger::default();
        let layer = IdempotencyLayer::shared(MemoryStore::new(), "steps");
        let svc = layer.layer(service_fn({
            let ledger = ledger.clone();
            move |_req: Request<RequestBody<Full<Bytes>>>| {
                let ledger = ledger.clone();
                async move {
                    let charge = step("charge", async {
                        ledger.start("charge");
                        Ok::<_, Error>(format!("ch_{}", rand::random::<u32>()))
                    })
                    .await;
                    let Ok(charge) = charge else {
                        return Ok::<_, Error>(
                            Response::builder()
                                .status(500)
                                .body(Full::default())
                                .unwrap(),
                        );
                    };
                    ledger.start("email");
                    if ledger.runs("email") == 1 {
                        return Ok(Response::builder()
                            .status(StatusCode::SERVICE_UNAVAILABLE)
                            .header("retry-after", "1")
                            .body(Full::default())
                            .unwrap());
                    }
                    Ok(Response::new(Full::new(Bytes::from(charge))))
                }
            }
        }));
        let post = || {
            Request::post("/pay")
                .header("idempotency-key", "k-steps")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let res = svc.clone().oneshot(post()).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The suspended claim is taken over by the retry (at once, or after the waiters'
        // safety net).
        let mut res = svc.clone().oneshot(post()).await.unwrap();
        for _ in 0..50 {
            if res.status() != StatusCode::CONFLICT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            res = svc.clone().oneshot(post()).await.unwrap();
        }
        assert_eq!(res.status(), StatusCode::OK);
        let first = res.into_body().collect().await.unwrap().to_bytes();
        let again = svc.clone().oneshot(post()).await.unwrap();
        assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), first);
        assert_eq!(ledger.runs("charge"), 1);
        assert_eq!(ledger.runs("email"), 2);
    }
}

/// Another request under the key of an unfinished call with steps (a client reusing a key):
/// `KeyReuse`, nothing runs, and the first request's retry still resumes with its steps.
#[tokio::test]
async fn another_request_cannot_resume_someone_elses_steps() {
    let store = Arc::new(MemoryStore::new());
    let (k, ledger) = (key("reuse"), Ledger::default());
    let call = |fp: u8| {
        Call::new(k.clone())
            .store(store.clone())
            .fingerprint(Some(Fingerprint([fp; 32])))
            .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
    };
    let body = |ledger: Ledger, amount: u64, hang: bool| async move {
        let charged: u64 = step("charge", async {
            ledger.start("charge");
            Ok::<_, Error>(amount)
        })
        .await?;
        if hang {
            std::future::pending::<()>().await;
        }
        Ok::<_, Error>(charged)
    };
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        call(1).run(ErrorPolicy::never(), body(ledger.clone(), 100, true)),
    )
    .await;
    assert!(cut.is_err());
    let other = call(2)
        .run(ErrorPolicy::never(), body(ledger.clone(), 200, false))
        .await;
    assert!(matches!(other, Err(Error::KeyReuse { .. })), "{other:?}");
    let resumed = call(1)
        .run(ErrorPolicy::never(), body(ledger.clone(), 100, false))
        .await
        .unwrap();
    assert_eq!(resumed, 100);
    assert_eq!(ledger.runs("charge"), 1);
}
