//! The conformance suite against `RedisStore`, plus what is particular to Redis: the key layout
//! and expiry, fencing across deleted records, takeover detection, bad data, reconnection.
//!
//! Needs a Redis server at `IDEM_REDIS_URL` (default `redis://127.0.0.1:6379`); without one
//! every test here is skipped with a printed reason, or fails under `IDEM_REQUIRE_SERVICES=1`.
//! Each test uses its own random key prefix, so tests run in parallel on one server.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::record::{Outcome, Record};
use idem_support::redis::url;
use idem_support::unique;
use idempotency::redis::redis;
use idempotency::store::ABANDONED_CLAIM_RETENTION;
use idempotency::store::{Claim, FencingToken, RecordState};
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, RedisStore, StorageKey, Store};
use redis::aio::MultiplexedConnection;

/// A plain connection for looking at what the store wrote, or `None` (skipped) without Redis.
async fn raw() -> Option<MultiplexedConnection> {
    idem_support::redis::probe().await
}

/// A store under a prefix no other test uses.
async fn redis_store() -> Option<RedisStore> {
    idem_support::redis::store("idem-test").await
}

async fn fresh_store() -> Option<Arc<dyn Store>> {
    Some(Arc::new(redis_store().await?))
}

idem_testkit::conformance!(fresh_store, native_expiry = true);

const LONG: Duration = Duration::from_secs(60);

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

async fn acquire(store: &RedisStore, key: &StorageKey, lease: Duration) -> (FencingToken, bool) {
    match store.claim(key, Some(&fp(1)), lease).await.unwrap() {
        Claim::Acquired { token, takeover } => (token, takeover),
        other => panic!("expected to acquire, got {other:?}"),
    }
}

async fn pttl(con: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(con).await.unwrap()
}

async fn server_time_us(con: &mut MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(con).await.unwrap();
    s * 1_000_000 + us
}

#[tokio::test]
async fn layout_is_one_hash_tag_with_server_side_expiry() {
    let (Some(store), Some(mut con)) = (redis_store().await, raw().await) else {
        return;
    };
    let key = unique("layout");
    let record_key = store.record_key(&key);
    assert_eq!(
        record_key,
        format!("{}:{{{}}}", store.prefix(), key.as_str())
    );
    let fence_key = format!("{record_key}:fence");

    let before = server_time_us(&mut con).await;
    let (token, takeover) = acquire(&store, &key, Duration::from_secs(10)).await;
    let after = server_time_us(&mut con).await;
    assert!(!takeover);
    assert!(
        token.0 >= before,
        "the token comes from the server's clock: {} < {before}",
        token.0
    );
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&record_key)
        .query_async(&mut con)
        .await
        .unwrap();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("state").as_deref(), Some(&b"in_flight"[..]));
    assert_eq!(field("token"), Some(token.0.to_string().into_bytes()));
    assert_eq!(
        field("fp"),
        Some(vec![1; 32]),
        "the fingerprint is stored as its raw bytes"
    );
    assert_eq!(field("record"), None);
    let lease_until: u64 = String::from_utf8(field("lease_until").expect("lease_until"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (before / 1000 + 10_000..=after / 1000 + 10_000).contains(&lease_until),
        "lease_until = the server's TIME in ms + the lease: {lease_until}, claimed within [{before}, {after}] us"
    );
    let retention = ABANDONED_CLAIM_RETENTION.as_millis() as i64;
    let lease_left = pttl(&mut con, &record_key).await;
    assert!(
        (retention + 9_000..=retention + 10_000).contains(&lease_left),
        "in flight: PX = lease + ABANDONED_CLAIM_RETENTION, got {lease_left}"
    );
    assert!(
        pttl(&mut con, &fence_key).await > lease_left + 3_000_000,
        "the fence outlives the record"
    );

    store
        .complete(&key, token, b"bytes", Duration::from_secs(120))
        .await
        .unwrap();
    let state: String = redis::cmd("HGET")
        .arg(&record_key)
        .arg("state")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(state, "completed");
    let has_lease_until: bool = redis::cmd("HEXISTS")
        .arg(&record_key)
        .arg("lease_until")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!has_lease_until, "a completed record has no lease");
    let ttl_left = pttl(&mut con, &record_key).await;
    assert!(
        (110_000..=120_000).contains(&ttl_left),
        "completed: PX = ttl, got {ttl_left}"
    );
    assert!(
        pttl(&mut con, &fence_key).await > ttl_left + 3_000_000,
        "the fence outlives the record"
    );

    // Both keys hash by the storage key alone, so they share a Redis Cluster slot.
    for k in [&record_key, &fence_key] {
        let tag = k
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(tag, _)| tag);
        assert_eq!(tag, Some(key.as_str()), "{k}");
    }
    // No fingerprint: no `fp` field.
    let key = unique("layout-nofp");
    store.claim(&key, None, LONG).await.unwrap();
    let has_fp: bool = redis::cmd("HEXISTS")
        .arg(store.record_key(&key))
        .arg("fp")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!has_fp);
}

#[tokio::test]
async fn tokens_increase_across_deleted_records_and_clock_steps() {
    let (Some(store), Some(mut con)) = (redis_store().await, raw().await) else {
        return;
    };
    let key = unique("fence-deleted");
    let record_key = store.record_key(&key);
    let (first, _) = acquire(&store, &key, LONG).await;
    let _: () = redis::cmd("DEL")
        .arg(&record_key)
        .query_async(&mut con)
        .await
        .unwrap();
    let (second, _) = acquire(&store, &key, LONG).await;
    assert!(second > first, "{second:?} after {first:?}");
    assert!(matches!(
        store.complete(&key, first, b"old", LONG).await,
        Err(Error::LeaseLost { .. })
    ));

    // A token handed out "in the future" (as if the server's clock had since stepped back):
    // the fence still keeps the key's tokens increasing.
    let ahead = server_time_us(&mut con).await + 3_600_000_000;
    let _: () = redis::cmd("HSET")
        .arg(format!("{record_key}:fence"))
        .arg("last")
        .arg(ahead)
        .query_async(&mut con)
        .await
        .unwrap();
    store.release(&key, second).await.unwrap();
    let (third, _) = acquire(&store, &key, LONG).await;
    assert_eq!(third.0, ahead + 1);
}

#[tokio::test]
async fn takeover_is_reported_only_when_a_lease_ran_out() {
    let Some(store) = redis_store().await else {
        return;
    };
    let short = Duration::from_millis(200);
    let key = unique("takeover-flag");
    acquire(&store, &key, short).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t, takeover) = acquire(&store, &key, LONG).await;
    assert!(takeover, "the first holder's lease expired");
    store.release(&key, t).await.unwrap();
    let (t, takeover) = acquire(&store, &key, LONG).await;
    assert!(!takeover, "after a release");
    store.complete(&key, t, b"r", short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, takeover) = acquire(&store, &key, LONG).await;
    assert!(!takeover, "after the ttl ran out");
}

/// Writes an in-flight record as idem did before `lease_until` existed: no `lease_until`,
/// `PX` = the lease, and the fence open.
async fn write_legacy_claim(
    con: &mut MultiplexedConnection,
    store: &RedisStore,
    key: &StorageKey,
    token: u64,
    px: u64,
) {
    let record_key = store.record_key(key);
    let _: () = redis::cmd("HSET")
        .arg(&record_key)
        .arg("state")
        .arg("in_flight")
        .arg("token")
        .arg(token)
        .arg("fp")
        .arg(&[1u8; 32][..])
        .query_async(con)
        .await
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg(&record_key)
        .arg(px)
        .query_async(con)
        .await
        .unwrap();
    let fence_key = format!("{record_key}:fence");
    let _: () = redis::cmd("HSET")
        .arg(&fence_key)
        .arg("last")
        .arg(token)
        .arg("open")
        .arg("1")
        .query_async(con)
        .await
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg(&fence_key)
        .arg(px + 3_600_000)
        .query_async(con)
        .await
        .unwrap();
}

/// In-flight records written by the previous release (no `lease_until`, `PX` = the lease) are
/// live until Redis removes them, their holders can complete, renew and release them, and
/// once removed the key is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_written_without_lease_until_still_work() {
    let (Some(store), Some(mut con)) = (redis_store().await, raw().await) else {
        return;
    };
    let token = server_time_us(&mut con).await;
    let t = FencingToken(token);

    // Live by its PX: in flight, key reuse for another fingerprint; its holder completes.
    let key = unique("legacy-complete");
    write_legacy_claim(&mut con, &store, &key, token, 60_000).await;
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    assert_eq!(
        store.claim(&key, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t }
    );
    store.complete(&key, t, b"legacy", LONG).await.unwrap();
    assert_eq!(
        store.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(b"legacy".to_vec().into())
    );

    // Its holder releases.
    let key = unique("legacy-release");
    write_legacy_claim(&mut con, &store, &key, token, 60_000).await;
    store.release(&key, t).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);

    // A renew gives it a lease_until and the in-flight expiry; then it expires like any claim.
    let key = unique("legacy-renew");
    write_legacy_claim(&mut con, &store, &key, token, 60_000).await;
    store
        .renew(&key, t, Duration::from_millis(300))
        .await
        .unwrap();
    let lease_until: Option<String> = redis::cmd("HGET")
        .arg(store.record_key(&key))
        .arg("lease_until")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(lease_until.is_some(), "renew sets lease_until");
    assert!(
        pttl(&mut con, &store.record_key(&key)).await
            > ABANDONED_CLAIM_RETENTION.as_millis() as i64
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t },
        "lease ended, not taken over: still there"
    );
    let (newer, takeover) = acquire(&store, &key, LONG).await;
    assert!(takeover && newer > t, "{newer:?} after {t:?}");

    // Left alone, Redis removes it at the end of its PX, and the key is taken over.
    let key = unique("legacy-expired");
    write_legacy_claim(&mut con, &store, &key, token, 300).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (newer, takeover) = acquire(&store, &key, LONG).await;
    assert!(takeover && newer > t, "{newer:?} after {t:?}");
    assert!(matches!(
        store.complete(&key, t, b"old", LONG).await,
        Err(Error::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn hashes_idem_did_not_write_are_errors_not_panics_or_reruns() {
    let (Some(store), Some(mut con)) = (redis_store().await, raw().await) else {
        return;
    };
    type Fields = &'static [(&'static str, &'static [u8])];
    type Expect = fn(&Result<u32, Error>) -> bool;
    // (fields, what a call over them gets): a hash the claim script cannot use is corrupt; one
    // whose state and record it can read replays (and the bytes then fail to decode) or is in
    // flight. Never a run, never a panic.
    let corrupt: Expect = |out| matches!(out, Err(Error::Corrupt { .. }));
    let in_flight: Expect = |out| matches!(out, Err(Error::InFlight { .. }));
    let cases: [(Fields, Expect); 5] = [
        (&[("junk", b"1")], corrupt),
        (&[("state", b"done"), ("token", b"1")], corrupt),
        (&[("state", b"completed"), ("token", b"1")], corrupt),
        (
            &[
                ("state", b"completed"),
                ("token", b"1"),
                ("record", b"r"),
                ("fp", b"short"),
            ],
            corrupt,
        ),
        (
            &[("state", b"in_flight"), ("token", b"not a number")],
            in_flight,
        ),
    ];
    for (fields, expected) in cases {
        let key = unique("bad-hash");
        let mut cmd = redis::cmd("HSET");
        cmd.arg(store.record_key(&key));
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let _: () = cmd.query_async(&mut con).await.unwrap();
        let _: () = redis::cmd("PEXPIRE")
            .arg(store.record_key(&key))
            .arg(60_000)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(
            matches!(store.get(&key).await, Err(Error::Corrupt { .. })),
            "get {fields:?}"
        );
        let out: Result<u32, Error> = Call::new(key.clone())
            .store(&store)
            .run(ErrorPolicy::never(), async {
                unreachable!("never run over a bad record")
            })
            .await;
        assert!(expected(&out), "claim {fields:?}: {out:?}");
    }
    // A key of another type is the server's WRONGTYPE error.
    let key = unique("wrong-type");
    let _: () = redis::cmd("SET")
        .arg(store.record_key(&key))
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, None, LONG).await,
        Err(Error::Store {
            backend: "redis",
            ..
        })
    ));
    assert!(matches!(
        store.get(&key).await,
        Err(Error::Store {
            backend: "redis",
            ..
        })
    ));
}

#[tokio::test]
async fn prefixes_isolate_and_are_checked() {
    let (Some(a), Some(b)) = (redis_store().await, redis_store().await) else {
        return;
    };
    let key = unique("prefix");
    let (t, _) = acquire(&a, &key, LONG).await;
    a.complete(&key, t, b"a", LONG).await.unwrap();
    assert_eq!(b.get(&key).await.unwrap(), None);
    assert!(matches!(
        b.claim(&key, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Acquired { .. }
    ));
    for bad in ["", "x{y", "}"] {
        assert!(
            matches!(
                RedisStore::connect_with_prefix(&url(), bad).await,
                Err(Error::Config { .. })
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn connect_by_url_gives_a_redis_store() {
    if raw().await.is_none() {
        return;
    }
    let store = idempotency::connect(&url()).await.unwrap();
    assert_eq!(store.backend(), "redis");
    let key = unique("by-url");
    let out: u32 = Call::new(key.clone())
        .store(&store)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(5) })
        .await
        .unwrap();
    assert_eq!(out, 5);
    let got = store.get(&key).await.unwrap().unwrap();
    let RecordState::Completed { record, .. } = got.state else {
        panic!("{got:?}")
    };
    let record = Record::decode(&record).unwrap();
    assert_eq!((record.outcome, record.payload), (Outcome::Ok, &b"5"[..]));
    // Clean up: this store uses the default prefix.
    let _: () = redis::cmd("DEL")
        .arg(RedisStore::connect(&url()).await.unwrap().record_key(&key))
        .query_async(&mut raw().await.unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn unreachable_server_is_a_store_error() {
    // Port 1 on loopback: nothing listens there, so the connection is refused.
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Store {
                backend: "redis",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_its_connection_is_killed() {
    let (Some(store), Some(mut admin)) = (redis_store().await, raw().await) else {
        return;
    };
    let key = unique("reconnect");
    let replayed = |store: RedisStore, key: StorageKey| async move {
        Call::new(key)
            .store(&store)
            .run(ErrorPolicy::never(), async {
                Ok::<u64, Error>(rand::random())
            })
            .await
    };
    let first = replayed(store.clone(), key.clone()).await.unwrap();

    let mut con = store.connection();
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);

    // The store reconnects by itself; within a few seconds calls replay again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match replayed(store.clone(), key.clone()).await {
            Ok(v) => break v,
            Err(Error::Store { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    };
    assert_eq!(
        again, first,
        "the record survived the reconnect and was replayed"
    );
    let new_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_ne!(new_id, id, "a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_while_redis_is_down_and_recovers_after_a_restart() {
    // The shared server is never restarted: other tests use it.
    let Some(mut server) = idem_support::PrivateRedis::started().await else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let call = |key: StorageKey| {
        Call::new(key)
            .store(&store)
            .run(ErrorPolicy::never(), async {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<u32, Error>(1)
            })
    };
    call(unique("before")).await.unwrap();

    server.stop(false);
    for _ in 0..3 {
        let out = call(unique("down")).await;
        assert!(
            matches!(
                out,
                Err(Error::Store {
                    backend: "redis",
                    ..
                })
            ),
            "{out:?}"
        );
    }
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no body runs without a claim"
    );

    server.spawn().unwrap();
    assert!(
        server.admin().await.is_some(),
        "the private redis-server did not come back"
    );
    // The first call after the server is back succeeds: its refused connection was retried on
    // the connection the manager opened meanwhile.
    call(unique("after")).await.unwrap();
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
}
