//! Isolation: scopes never share records, in every store (memory and SQLite always; Redis and
//! PostgreSQL when reachable, required under `IDEM_REQUIRE_SERVICES=1`) and in the HTTP layer,
//! and the HTTP layer's 409 and 422 say nothing of the other request that holds the key.
//!
//! ```text
//! cargo test --all-features --test isolation -- --nocapture
//! ```

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use idem_support::AppError;
use idempotency::{idempotent, Call, Error, ErrorPolicy, MemoryStore, StorageKey, Store};

// ---------------------------------------------------------------------------------------------
// A fresh store of each backend.

/// A store of the test's own (idem-support's, which removes its records when dropped).
struct Fixture {
    name: &'static str,
    store: Arc<dyn Store>,
}

/// Memory and SQLite always; Redis and PostgreSQL when reachable (else skipped, or a failure
/// under `IDEM_REQUIRE_SERVICES=1`).
async fn fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    let mut add = |name, store: Option<Arc<dyn Store>>| {
        all.extend(store.map(|store| Fixture { name, store }));
    };
    add("memory", idem_support::memory().await);
    #[cfg(feature = "sqlite")]
    add("sqlite", idem_support::sqlite().await);
    #[cfg(feature = "redis")]
    add("redis", idem_support::redis::fresh("idem-isolation").await);
    #[cfg(feature = "postgres")]
    add("postgres", idem_support::postgres::fresh("isolation").await);
    all
}

// ---------------------------------------------------------------------------------------------
// Scopes in the attribute and in `Call`.

/// `tenant` is the scope and is not fingerprinted, so a shared record would show as a replay.
#[idempotent(name = "isolation.scoped", key = key, scope = tenant, store = store.clone(), skip(store, runs, tenant))]
async fn scoped(
    store: Arc<dyn Store>,
    runs: Arc<AtomicUsize>,
    tenant: &str,
    key: &str,
    body: String,
) -> Result<(String, String, u64), AppError> {
    runs.fetch_add(1, SeqCst);
    Ok((tenant.to_owned(), body, rand::random()))
}

/// Scopes that differ a little: case, a space, a suffix, a prefix, empty.
const TENANTS: &[&str] = &[
    "alice",
    "Alice",
    "alice ",
    " alice",
    "alice:",
    "alice\u{200b}",
    "bob",
    "tenant-1",
    "tenant-10",
    "tenant-1\u{1}",
    "",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_in_two_scopes_never_shares_a_record() {
    let mut checked = 0;
    for f in fixtures().await {
        let runs = Arc::new(AtomicUsize::new(0));
        let key = format!("same-key-{:016x}", rand::random::<u64>());
        let mut firsts = Vec::new();
        for tenant in TENANTS {
            let out = scoped(
                f.store.clone(),
                runs.clone(),
                tenant,
                &key,
                "body".to_owned(),
            )
            .await
            .unwrap_or_else(|e| panic!("{}: {tenant:?}: {e:?}", f.name));
            assert_eq!(out.0, *tenant, "{}: not another scope's result", f.name);
            firsts.push(out);
        }
        assert_eq!(
            runs.load(SeqCst),
            TENANTS.len(),
            "{}: one run per scope",
            f.name
        );
        for (tenant, first) in TENANTS.iter().zip(&firsts) {
            let again = scoped(f.store.clone(), runs.clone(), tenant, &key, "body".into())
                .await
                .unwrap();
            assert_eq!(&again, first, "{}: {tenant:?} replays its own", f.name);
        }
        assert_eq!(runs.load(SeqCst), TENANTS.len());
        // Another body under the same key in a fresh scope is not key reuse: the other scopes'
        // records are invisible there.
        let other = scoped(
            f.store.clone(),
            runs.clone(),
            "carol",
            &key,
            "another body".into(),
        )
        .await
        .unwrap();
        assert_eq!(other.1, "another body");
        // ... while in its own scope it is.
        let reuse = scoped(f.store.clone(), runs.clone(), "alice", &key, "x".into()).await;
        assert!(
            matches!(reuse, Err(AppError::Idem(Error::KeyReuse { .. }))),
            "{}: {reuse:?}",
            f.name
        );
        checked += 1;
    }
    eprintln!(
        "isolation: {} scopes x 1 key x {checked} stores through #[idempotent]: no shared record",
        TENANTS.len()
    );
}

/// `(scope, key)` pairs whose bytes run together: each must have a record of its own.
fn pairs() -> Vec<(Vec<u8>, Vec<u8>)> {
    let p = |s: &[u8], k: &[u8]| (s.to_vec(), k.to_vec());
    vec![
        p(b"ab", b"c"),
        p(b"a", b"bc"),
        p(b"a:b", b"c"),
        p(b"a", b"b:c"),
        p(b"s", b"k"),
        p(b"s ", b"k"),
        p(b"s", b" k"),
        p(b"", b"sk"),
        p(b"sk", b"\xff"),
        p(b"s", b"\0k"),
        p(b"s", b"k\0"),
        p(b"", b"s\0k"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_keys_that_run_together_stay_apart_through_call() {
    // The run's prefix in hex: raw random bytes may hold a NUL, which no scope may contain.
    let run = format!("{:016x}-", rand::random::<u64>());
    let pairs = pairs();
    let keys: Vec<StorageKey> = pairs
        .iter()
        .map(|(s, k)| StorageKey::derive(&[run.as_bytes(), s].concat(), k).unwrap())
        .collect();
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "distinct storage keys");
    for f in fixtures().await {
        for (i, key) in keys.iter().enumerate() {
            let out: Result<usize, Error> = Call::new(key.clone())
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async { Ok(i) })
                .await;
            assert_eq!(out.unwrap(), i, "{}: pair {:?}", f.name, pairs[i]);
        }
        for (i, key) in keys.iter().enumerate() {
            let out: Result<usize, Error> = Call::new(key.clone())
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async { unreachable!("replayed") })
                .await;
            assert_eq!(
                out.unwrap(),
                i,
                "{}: pair {:?} replays its own",
                f.name,
                pairs[i]
            );
        }
    }
}

/// A scope with a NUL byte must not reach another scope's records: `("s\0", "k")` and
/// `("s", "\0k")` are different (scope, key) pairs, so they must not share a storage key.
///
/// The storage key hashes `scope, 0x00, key`, which would be ambiguous if a scope held a NUL
/// (both pairs would hash `s\0\0k`), so `StorageKey::derive` refuses such scopes with
/// `Error::InvalidKey`; every NUL-free scope keeps its storage keys.
#[tokio::test]
async fn a_nul_in_the_scope_cannot_reach_another_scopes_records() {
    for (scope, key) in [("s\0", "k"), ("tenant-1\0x", "k"), ("\0", "k")] {
        let theirs = StorageKey::derive(scope, key);
        // The pair that `scope, 0x00, key` would collide with: the scope up to its first NUL.
        let (head, tail) = scope.split_once('\0').unwrap();
        let mine = StorageKey::derive(head, &format!("{tail}\0{key}")).unwrap();
        match theirs {
            Err(Error::InvalidKey { reason }) => assert!(reason.contains("NUL"), "{reason}"),
            Ok(theirs) => assert_ne!(
                theirs, mine,
                "scope {scope:?} with key {key:?} shares the record of scope {head:?}"
            ),
            Err(other) => panic!("{other:?}"),
        }
    }
    // Through the attribute: the victim's record is not replayed to the other scope.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let victim = scoped(store.clone(), runs.clone(), "s", "\0k", "b".into())
        .await
        .unwrap();
    match scoped(store.clone(), runs.clone(), "s\0", "k", "b".into()).await {
        Ok(other) => assert_ne!(other, victim, "another scope got the victim's result"),
        Err(AppError::Idem(Error::InvalidKey { .. })) => {}
        Err(e) => panic!("{e:?}"),
    }
}

/// Two operations never share a record, even with the same scope and key: the operation's
/// name is part of the storage key.
#[idempotent(name = "isolation.first", key = key, store = store.clone(), skip(store))]
async fn first_fn(store: Arc<dyn Store>, key: String) -> Result<String, AppError> {
    Ok(format!("first {}", rand::random::<u64>()))
}

#[idempotent(name = "isolation.second", key = key, store = store.clone(), skip(store))]
async fn second_fn(store: Arc<dyn Store>, key: String) -> Result<String, AppError> {
    Ok(format!("second {}", rand::random::<u64>()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_scopes_of_two_functions_are_apart() {
    for f in fixtures().await {
        let key = format!("k-{:016x}", rand::random::<u64>());
        let a = first_fn(f.store.clone(), key.clone()).await.unwrap();
        let b = second_fn(f.store.clone(), key.clone()).await.unwrap();
        assert!(
            a.starts_with("first ") && b.starts_with("second "),
            "{}",
            f.name
        );
        assert_eq!(first_fn(f.store.clone(), key.clone()).await.unwrap(), a);
        assert_eq!(second_fn(f.store.clone(), key.clone()).await.unwrap(), b);
    }
}

/// A function without a stable `name = ...`: its default name is its path, which changes when
/// it moves, so stores whose records outlive the build refuse it instead of letting a live key
/// run again after a refactoring deploy.
#[idempotent(key = key, store = store.clone(), skip(store))]
async fn unnamed_fn(store: Arc<dyn Store>, key: String) -> Result<String, AppError> {
    Ok(format!("unnamed {key}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_stores_refuse_functions_without_a_stable_name() {
    for f in fixtures().await {
        let out = unnamed_fn(f.store.clone(), "k".to_owned()).await;
        match (f.name, out) {
            ("memory", Ok(v)) => assert_eq!(v, "unnamed k"),
            ("memory", other) => panic!("memory: {other:?}"),
            (_, Err(AppError::Idem(Error::Config { reason }))) => {
                assert!(reason.contains("name = "), "{}: {reason}", f.name);
                assert!(reason.contains("unnamed_fn"), "{}: {reason}", f.name);
            }
            (name, other) => panic!("{name}: {other:?}"),
        }
    }
}

/// A claim in flight in one scope does not make the same key in flight in another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_in_one_scope_is_free_in_another() {
    for f in fixtures().await {
        let key = format!("busy-{:016x}", rand::random::<u64>());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let (store, key) = (f.store.clone(), key.clone());
            tokio::spawn(async move {
                let out: Result<String, Error> =
                    Call::new(StorageKey::derive("scope-a", &key).unwrap())
                        .store(store.clone())
                        .run(ErrorPolicy::never(), async move {
                            started_tx.send(()).unwrap();
                            finish_rx.await.unwrap();
                            Ok("a".to_owned())
                        })
                        .await;
                out
            })
        };
        started_rx.await.unwrap();
        let same_scope: Result<String, Error> =
            Call::new(StorageKey::derive("scope-a", &key).unwrap())
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async { Ok("a2".to_owned()) })
                .await;
        assert!(
            matches!(same_scope, Err(Error::InFlight { .. })),
            "{}: {same_scope:?}",
            f.name
        );
        let other_scope: Result<String, Error> =
            Call::new(StorageKey::derive("scope-b", &key).unwrap())
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async { Ok("b".to_owned()) })
                .await;
        assert_eq!(other_scope.unwrap(), "b", "{}", f.name);
        finish_tx.send(()).unwrap();
        assert_eq!(holder.await.unwrap().unwrap(), "a");
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP layer.

#[cfg(feature = "http")]
mod http_layer {
    use super::*;

    use axum::body::Body;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::Router;
    use bytes::Bytes;
    use http::{HeaderMap, Request, StatusCode};
    use http_body_util::BodyExt;
    use idempotency::http::IdempotencyLayer;
    use tokio::sync::{Notify, Semaphore};
    use tower::ServiceExt;

    #[derive(Clone)]
    struct App {
        runs: Arc<AtomicUsize>,
        started: Arc<Notify>,
        gate: Arc<Semaphore>,
    }

    /// 201 with a random id, echoing the body and the `x-secret` header (so that a leak of the
    /// other request's response would show too).
    async fn create(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
        app.runs.fetch_add(1, SeqCst);
        app.started.notify_one();
        if headers.contains_key("x-wait-for-gate") {
            app.gate.acquire().await.unwrap().forget();
        }
        let secret = headers
            .get("x-secret")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let id = format!("pay_{:016x}", rand::random::<u64>());
        (
            StatusCode::CREATED,
            [("x-echo-secret", secret.clone())],
            format!("{{\"id\":\"{id}\",\"secret\":\"{secret}\",\"request\":{body:?}}}"),
        )
            .into_response()
    }

    fn app(store: Arc<dyn Store>) -> (Router, App) {
        let state = App {
            runs: Arc::default(),
            started: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        let layer = IdempotencyLayer::per_client(store, |req| {
            let principal = req.headers.get("x-principal")?.to_str().ok()?;
            Some(principal.to_owned())
        })
        .replay_headers(["x-echo-secret"]);
        let router = Router::new()
            .route("/payments", post(create))
            .with_state(state.clone())
            .layer(layer);
        (router, state)
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Reply {
        fn replayed(&self) -> bool {
            self.headers.contains_key("idempotent-replayed")
        }

        /// Whether `marker` appears anywhere in the reply: body, header names or values.
        fn mentions(&self, marker: &str) -> bool {
            let m = marker.as_bytes();
            let has = |b: &[u8]| b.windows(m.len()).any(|w| w.eq_ignore_ascii_case(m));
            has(&self.body)
                || self
                    .headers
                    .iter()
                    .any(|(k, v)| has(k.as_str().as_bytes()) || has(v.as_bytes()))
        }
    }

    async fn send(
        router: &Router,
        who: &str,
        key: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::post("/payments")
            .header("idempotency-key", key)
            .header("x-principal", who)
            .header("content-type", "application/json");
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let res = router
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let (head, body) = res.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn principals_with_one_key_never_see_each_others_responses() {
        for f in fixtures().await {
            let (router, app) = app(f.store.clone());
            let key = format!("shared-key-{:016x}", rand::random::<u64>());
            let body = r#"{"amount":500}"#;
            let alice = send(
                &router,
                "alice",
                &key,
                body,
                &[("x-secret", "ALICE-HDR-7f3a")],
            )
            .await;
            let bob = send(&router, "bob", &key, body, &[("x-secret", "BOB-HDR-91c2")]).await;
            for r in [&alice, &bob] {
                assert_eq!(r.status, StatusCode::CREATED, "{}", f.name);
                assert!(
                    !r.replayed(),
                    "{}: bob does not get alice's response",
                    f.name
                );
            }
            assert_ne!(alice.body, bob.body);
            assert!(!bob.mentions("ALICE-HDR-7f3a") && !alice.mentions("BOB-HDR-91c2"));
            // Each replays only its own.
            let alice2 = send(&router, "alice", &key, body, &[]).await;
            let bob2 = send(&router, "bob", &key, body, &[]).await;
            assert!(alice2.replayed() && bob2.replayed(), "{}", f.name);
            assert_eq!(alice2.body, alice.body, "{}", f.name);
            assert_eq!(bob2.body, bob.body, "{}", f.name);
            assert!(!bob2.mentions("ALICE-HDR-7f3a"), "{}", f.name);
            // Another body with the key in a third scope is a new request, not a 422.
            let carol = send(&router, "carol", &key, r#"{"amount":1}"#, &[]).await;
            assert_eq!(carol.status, StatusCode::CREATED, "{}", f.name);
            assert!(!carol.replayed());
            assert_eq!(app.runs.load(SeqCst), 3, "{}", f.name);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflicts_reveal_nothing_of_the_other_request() {
        let mut refusals = 0;
        for f in fixtures().await {
            let (router, app) = app(f.store.clone());
            let router = Arc::new(router);
            let key = format!("k-{:016x}", rand::random::<u64>());
            let secret_body = r#"{"card":"SECRET-BODY-4242","amount":777}"#;
            let secret_header = "SECRET-HEADER-c0ffee";
            let markers = [
                "SECRET-BODY-4242",
                "4242",
                "777",
                "card",
                secret_header,
                "c0ffee",
            ];

            // Alice's first request holds the key, in flight.
            let first = {
                let (router, key) = (router.clone(), key.clone());
                tokio::spawn(async move {
                    send(
                        &router,
                        "alice",
                        &key,
                        secret_body,
                        &[("x-secret", secret_header), ("x-wait-for-gate", "1")],
                    )
                    .await
                })
            };
            app.started.notified().await;

            // Same request again: 409. A different one: 422. Neither mentions the first.
            let again = send(&router, "alice", &key, secret_body, &[]).await;
            assert_eq!(again.status, StatusCode::CONFLICT, "{}", f.name);
            let different = send(&router, "alice", &key, r#"{"amount":1}"#, &[]).await;
            assert_eq!(
                different.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{}",
                f.name
            );
            // Bob's request with the same key and body is not in conflict at all.
            let bob = send(&router, "bob", &key, secret_body, &[]).await;
            assert_eq!(bob.status, StatusCode::CREATED, "{}", f.name);
            assert!(!bob.mentions(secret_header), "{}", f.name);

            app.gate.add_permits(1);
            let first = first.await.unwrap();
            assert_eq!(first.status, StatusCode::CREATED, "{}", f.name);
            assert!(first.mentions("SECRET-BODY-4242") && first.mentions(secret_header));

            // Completed: the same key with another body is 422, and still reveals nothing.
            let reused = send(
                &router,
                "alice",
                &key,
                r#"{"amount":2}"#,
                &[("x-secret", "OTHER")],
            )
            .await;
            assert_eq!(
                reused.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{}",
                f.name
            );
            let first_id = String::from_utf8_lossy(&first.body)[7..27].to_owned();
            assert!(first_id.starts_with("pay_"), "{first_id}");
            for reply in [&again, &different, &reused] {
                assert_eq!(
                    reply.headers["content-type"], "application/problem+json",
                    "{}",
                    f.name
                );
                for marker in markers.iter().copied().chain([first_id.as_str()]) {
                    assert!(
                        !reply.mentions(marker),
                        "{}: a {} mentions {marker:?}: {:?} {:?}",
                        f.name,
                        reply.status,
                        reply.headers,
                        reply.body
                    );
                }
                assert!(!reply.replayed());
                refusals += 1;
            }
            // The original still replays, to alice only.
            let replay = send(&router, "alice", &key, secret_body, &[]).await;
            assert!(replay.replayed());
            assert_eq!(replay.body, first.body);
            assert_eq!(
                app.runs.load(SeqCst),
                2,
                "{}: alice's first and bob's",
                f.name
            );
        }
        eprintln!("isolation: {refusals} 409/422 replies checked for 7 markers of the other request: none found");
    }
}
