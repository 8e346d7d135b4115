//! A `maxmemory-policy` that may evict records, set after the store connected: the Redis store
//! checks the policy again while it runs (at most once per
//! `RedisOptions::eviction_check_interval`) and then refuses new claims with the same
//! `Error::Config` as at connect, until the policy is `noeviction` again. Each test runs a
//! private `redis-server` (never the shared one, whose policy other tests rely on).
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_support::{unique, PrivateRedis};
use idempotency::redis::{redis, RedisOptions};
use idempotency::{Call, Error, ErrorPolicy, RedisStore};

/// A short interval, so that the tests wait little.
const INTERVAL: Duration = Duration::from_millis(200);

/// A private `redis-server` without persistence.
async fn server(extra: &[&str]) -> Option<PrivateRedis> {
    let mut args = vec!["--appendonly", "no", "--save", ""];
    args.extend_from_slice(extra);
    PrivateRedis::started_with(&args).await
}

/// Runs a call of a fresh key whose body counts its starts in `runs` (first line).
async fn call(store: &RedisStore, runs: &Arc<AtomicU32>) -> Result<u32, Error> {
    let r = runs.clone();
    Call::new(unique("evict"))
        .store(store.clone())
        .run(ErrorPolicy::never(), async move {
            r.fetch_add(1, SeqCst);
            Ok(7)
        })
        .await
}

async fn set_policy(admin: &mut redis::aio::MultiplexedConnection, policy: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg(policy)
        .query_async::<()>(admin)
        .await
        .unwrap();
}

/// How many `CONFIG` commands the server has run (`INFO commandstats`).
async fn config_calls(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_config"))
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_policy_set_after_connect_refuses_new_claims_until_fixed() {
    let Some(server) = server(&[]).await else {
        return;
    };
    let mut admin = server.admin().await.unwrap();
    let options = RedisOptions::new().eviction_check_interval(INTERVAL);
    let store = RedisStore::connect_with(&server.url(), &options)
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));

    assert_eq!(call(&store, &runs).await.unwrap(), 7);
    assert_eq!(runs.load(SeqCst), 1);

    set_policy(&mut admin, "allkeys-lru").await;
    tokio::time::sleep(INTERVAL * 2).await;
    let refused = call(&store, &runs).await.unwrap_err();
    assert!(matches!(refused, Error::Config { .. }), "{refused}");
    assert_eq!(runs.load(SeqCst), 1, "the body did not run");
    // The same message as a store connecting now gets.
    let at_connect = RedisStore::connect(&server.url()).await.unwrap_err();
    assert_eq!(refused.to_string(), at_connect.to_string());
    assert!(refused.to_string().contains("allkeys-lru"), "{refused}");
    // Every claim is refused while the policy stays, not only the one that checked.
    assert!(matches!(
        call(&store, &runs).await,
        Err(Error::Config { .. })
    ));
    assert_eq!(runs.load(SeqCst), 1);

    // Fixing the policy heals the store at the next check.
    set_policy(&mut admin, "noeviction").await;
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(call(&store, &runs).await.unwrap(), 7);
    assert_eq!(runs.load(SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_read_at_most_once_per_interval() {
    let Some(server) = server(&[]).await else {
        return;
    };
    let mut admin = server.admin().await.unwrap();
    let options = RedisOptions::new().eviction_check_interval(INTERVAL);
    let store = RedisStore::connect_with(&server.url(), &options)
        .await
        .unwrap();
    let before = config_calls(&mut admin).await;
    let runs = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    // Many concurrent claims for about three intervals.
    while started.elapsed() < INTERVAL * 3 {
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (store, runs) = (store.clone(), runs.clone());
                tokio::spawn(async move { call(&store, &runs).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
    }
    let elapsed = started.elapsed();
    let checks = config_calls(&mut admin).await - before;
    let most = elapsed.as_millis() / INTERVAL.as_millis() + 1;
    assert!(
        (1..=most as u64).contains(&checks),
        "{checks} CONFIG GETs in {elapsed:?} for {} claims (at most {most}, one per interval)",
        runs.load(SeqCst)
    );
    assert!(runs.load(SeqCst) >= 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_config_is_checked_at_connect_only() {
    // Managed services often rename or disable CONFIG: the policy is read from INFO at
    // connect, and claims go on afterwards without further checks.
    let Some(server) = server(&["--rename-command", "CONFIG", ""]).await else {
        return;
    };
    let options = RedisOptions::new().eviction_check_interval(Duration::ZERO);
    let store = RedisStore::connect_with(&server.url(), &options)
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    for _ in 0..3 {
        assert_eq!(call(&store, &runs).await.unwrap(), 7);
    }
    assert_eq!(runs.load(SeqCst), 3);
}
