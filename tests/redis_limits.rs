//! Redis configurations that would break idem's promises, refused or reported at once: a
//! `maxmemory-policy` that may evict records (refused at connect, unless allowed explicitly),
//! read from `INFO` where `CONFIG` is blocked, and a full Redis (`noeviction` at `maxmemory`),
//! which fails a claim at once with `Error::StoreFull` and hands a result it cannot store back
//! to its caller at once. Each test runs a private `redis-server`.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;

use idem_support::unique;
use idem_support::PrivateRedis;
use idempotency::redis::{redis, RedisOptions};
use idempotency::store::RecordState;
use idempotency::{Call, Error, ErrorPolicy, RedisStore, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_unless_allowed() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let Some(server) = PrivateRedis::started_with(&["--maxmemory-policy", policy]).await else {
            return;
        };
        let refused = RedisStore::connect(&server.url()).await.unwrap_err();
        assert!(
            matches!(refused, Error::Config { .. }),
            "{policy}: {refused}"
        );
        let message = refused.to_string();
        assert!(
            message.contains(policy) && message.contains("noeviction"),
            "{policy}: the error names the policy and the fix: {message}"
        );
        assert!(!refused.is_retryable());
        // Through `connect` too, and allowed explicitly by the URL or the options.
        assert!(idempotency::connect(&server.url()).await.is_err());
        let allowed = format!("{}/?allow_eviction=true", server.url());
        idempotency::connect(&allowed).await.unwrap();
        let options = RedisOptions::new().allow_eviction(true);
        RedisStore::connect_with(&server.url(), &options)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_read_from_info_where_config_is_blocked() {
    // Managed services often rename or disable CONFIG.
    let args = [
        "--maxmemory-policy",
        "allkeys-lru",
        "--rename-command",
        "CONFIG",
        "",
    ];
    let Some(server) = PrivateRedis::started_with(&args).await else {
        return;
    };
    let refused = RedisStore::connect(&server.url()).await.unwrap_err();
    assert!(
        refused.to_string().contains("allkeys-lru"),
        "read from INFO memory: {refused}"
    );
    let args = ["--rename-command", "CONFIG", ""];
    let Some(server) = PrivateRedis::started_with(&args).await else {
        return;
    };
    RedisStore::connect(&server.url()).await.unwrap();
}

/// Fills the server with values under `filler:*` (keys of no store) until it refuses every
/// write: Redis refuses writes once its memory is over `maxmemory`, so smaller and smaller
/// values push it over.
async fn fill(admin: &mut redis::aio::MultiplexedConnection) {
    let mut i = 0;
    for size in [256 << 10, 16 << 10, 1 << 10, 64] {
        loop {
            i += 1;
            assert!(i < 10_000, "the server never filled up");
            let set: redis::RedisResult<()> = redis::cmd("SET")
                .arg(format!("filler:{i}"))
                .arg(vec![b'x'; size])
                .query_async(admin)
                .await;
            if set.is_err() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_fails_a_claim_at_once_and_runs_nothing() {
    let Some(server) = PrivateRedis::started_with(&["--maxmemory", "4mb"]).await else {
        return;
    };
    let mut admin = server.admin().await.unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    fill(&mut admin).await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let out: Result<u32, Error> = Call::new(unique("full"))
        .store(store.clone())
        .run(ErrorPolicy::never(), async move {
            r.fetch_add(1, SeqCst);
            Ok(1)
        })
        .await;
    let err = out.unwrap_err();
    assert!(matches!(err, Error::StoreFull { .. }), "{err}");
    assert_eq!(runs.load(SeqCst), 0, "no claim, no body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_a_full_redis_cannot_store_is_returned_at_once_and_stored_later() {
    let Some(server) = PrivateRedis::started_with(&["--maxmemory", "4mb"]).await else {
        return;
    };
    let mut admin = server.admin().await.unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let key = unique("full-result");
    let before = idempotency::counters().results_unstored;
    let mut filling = admin.clone();
    // The lease is long: a caller that waited for storing to succeed would wait for it.
    let out: Result<u32, Error> = Call::new(key.clone())
        .store(store.clone())
        .lease(std::time::Duration::from_secs(60))
        .run(ErrorPolicy::never(), async move {
            fill(&mut filling).await;
            Ok(9)
        })
        .await;
    assert_eq!(out.unwrap(), 9, "the body ran: its caller gets the result");
    assert!(idempotency::counters().results_unstored > before);
    assert!(matches!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(RecordState::InFlight { .. })
    ));
    // Room again: the background stores the result, and the next call replays it.
    let _: () = redis::cmd("EVAL")
        .arg("for _, k in ipairs(redis.call('KEYS', 'filler:*')) do redis.call('DEL', k) end")
        .arg(0)
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut replayed = None;
    for _ in 0..100 {
        if let Some(RecordState::Completed { .. }) = store.get(&key).await.unwrap().map(|r| r.state)
        {
            replayed = Some(
                Call::new(key.clone())
                    .store(store.clone())
                    .run::<Result<u32, Error>, _>(ErrorPolicy::never(), async {
                        unreachable!("replayed")
                    })
                    .await
                    .unwrap(),
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(replayed, Some(9));
}
