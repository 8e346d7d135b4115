//! `RedisStore` on a Redis Cluster (`IDEM_REDIS_CLUSTER_URL`, by default the six nodes
//! `.ci/redis-cluster` starts on 127.0.0.1:7000-7005): the conformance suite, the round trips
//! per call on the key's master, `idempotency::connect` with a `redis+cluster://` URL, and
//! waiters woken through sharded pub/sub. Without the cluster every test here is skipped with
//! a printed reason, or fails under `IDEM_REQUIRE_SERVICES=1`.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use idem_support::monitor::{self, Command, Monitor};
use idem_support::redis::{cluster_store, cluster_url};
use idem_support::unique;
use idempotency::redis::redis;
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, OnConflict, RedisStore, Store};

async fn fresh_store() -> Option<Arc<dyn Store>> {
    let store = cluster_store("idem-cluster").await?;
    assert!(store.is_cluster());
    Some(Arc::new(store))
}

idem_testkit::conformance!(fresh_store, native_expiry = true);

/// The `redis://127.0.0.1:<port>` URL of the master that serves `key`'s slot.
async fn master_of(store: &RedisStore, key: &str) -> String {
    let mut con = store.connection();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut con)
        .await
        .unwrap();
    for range in slots {
        let redis::Value::Array(items) = range else {
            continue;
        };
        let (first, last): (u16, u16) = (
            redis::from_redis_value(items[0].clone()).unwrap(),
            redis::from_redis_value(items[1].clone()).unwrap(),
        );
        if (first..=last).contains(&slot) {
            let redis::Value::Array(master) = &items[2] else {
                panic!("CLUSTER SLOTS: no master for {first}-{last}");
            };
            let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
            return format!("redis://127.0.0.1:{port}");
        }
    }
    panic!("slot {slot} has no master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_one_round_trip_and_a_miss_two_on_the_keys_master() {
    let Some(store) = cluster_store("idem-cluster-rt").await else {
        return;
    };
    let fp = Some(Fingerprint([7; 32]));
    let call =
        |key: &idempotency::StorageKey| Call::new(key.clone()).store(store.clone()).fingerprint(fp);
    let key = unique("cluster-roundtrips");
    // Warm up on this key's master: it learns the scripts (NOSCRIPT costs a SCRIPT LOAD once).
    let warm = unique("warm-up");
    for k in [&warm, &warm] {
        let _: u32 = call(k)
            .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
            .await
            .unwrap();
    }
    let node = master_of(&store, &store.record_key(&key)).await;
    let admin = idem_support::redis::connect(&node).await.unwrap();
    // The warm-up key may live on another master: load the scripts on this one too.
    let other = unique("warm-up-2");
    let _: u32 = call(&other)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let mut feed = Monitor::start(&node, admin).await.unwrap();
    feed.mark().await.unwrap();
    let first: u64 = call(&key)
        .run(ErrorPolicy::never(), async {
            Ok::<_, Error>(rand::random())
        })
        .await
        .unwrap();
    feed.mark().await.unwrap();
    let again: u64 = call(&key)
        .run::<Result<u64, Error>, _>(ErrorPolicy::never(), async { unreachable!("a hit") })
        .await
        .unwrap();
    assert_eq!(again, first);
    feed.mark().await.unwrap();
    let windows = feed.windows(Duration::from_secs(10)).await.unwrap();
    let sent = monitor::sent_by_store(&windows, store.prefix())
        .expect("the store's commands show in the master's MONITOR feed");
    let texts = |w: &[Command]| w.iter().map(Command::text).collect::<Vec<_>>();
    // A script met on this master for the first time costs a NOSCRIPT and a SCRIPT LOAD once:
    // count the EVALSHAs.
    let evalshas = |w: &[Command]| w.iter().filter(|c| c.is("EVALSHA")).count();
    assert_eq!(
        evalshas(&sent[0]),
        2,
        "a miss is claim + complete: {:#?}",
        texts(&sent[0])
    );
    assert_eq!(
        sent[1].len(),
        1,
        "a hit is one claim: {:#?}",
        texts(&sent[1])
    );
    assert!(sent[1][0].is("EVALSHA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_takes_a_cluster_url() {
    if cluster_store("idem-cluster-probe").await.is_none() {
        return;
    }
    let store = idempotency::connect(&cluster_url()).await.unwrap();
    let key = unique("cluster-connect");
    let out: u32 = Call::new(key.clone())
        .store(store.clone())
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(5) })
        .await
        .unwrap();
    let replay: u32 = Call::new(key)
        .store(store)
        .run::<Result<u32, Error>, _>(ErrorPolicy::never(), async { unreachable!("replayed") })
        .await
        .unwrap();
    assert_eq!((out, replay), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_another_connection_get_the_result() {
    let Some(holder) = cluster_store("idem-cluster-wait").await else {
        return;
    };
    // Two stores on one prefix: the waiters' connection learns of the completion only
    // through the cluster (sharded pub/sub, or the bounded poll behind it).
    let waiting = RedisStore::connect_with(
        &cluster_url(),
        &idempotency::redis::RedisOptions::new().prefix(holder.prefix()),
    )
    .await
    .unwrap();
    assert!(waiting.notifies_changes());
    let key = unique("cluster-wait");
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (k, h, s) = (key.clone(), holder.clone(), starts.clone());
    let body = tokio::spawn(async move {
        Call::new(k)
            .store(h)
            .run(ErrorPolicy::never(), async move {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, Error>(7u32)
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let (k, w, s) = (key.clone(), waiting.clone(), starts.clone());
            tokio::spawn(async move {
                Call::new(k)
                    .store(w)
                    .on_conflict(OnConflict::Wait(Duration::from_secs(10)))
                    .run(ErrorPolicy::never(), async move {
                        s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, Error>(0u32)
                    })
                    .await
            })
        })
        .collect();
    assert_eq!(body.await.unwrap().unwrap(), 7);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
    }
    assert_eq!(
        starts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one body start"
    );
}
