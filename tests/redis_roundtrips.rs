//! Round trips per call against Redis: a replayed call (hit) is one command, a first call
//! (miss: claim, complete) two, a call whose body fails (claim, release) two, `get` one.
//!
//! Counted exactly, by watching the server's `MONITOR` feed for the commands sent on the
//! store's own connection, so other clients of the same server (tests running in parallel,
//! other processes) do not disturb the count. This is what a benchmark reading `INFO
//! commandstats` on an otherwise idle server sees as well.
#![cfg(feature = "redis")]

// Only `unavailable` and `unique` are used here, not the suite.
#[allow(unused_imports)]
mod conformance;

use std::time::Duration;

use futures::StreamExt;
use idempotency::redis::redis;
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, RedisStore, StorageKey, Store};

fn url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// One line of the `MONITOR` feed: `<time> [<db> <client address>] "<command>" "<arg>" ...`.
struct Seen {
    client: String,
    line: String,
}

fn parse(line: &str) -> Option<Seen> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
    Some(Seen {
        client,
        line: line.to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_one_round_trip_and_a_miss_two() {
    let client = redis::Client::open(url()).unwrap();
    let admin = match client.get_multiplexed_async_connection().await {
        Ok(c) => c,
        Err(e) => {
            conformance::unavailable("Redis", e);
            return;
        }
    };
    let prefix = format!("idem-rt-{:016x}", rand::random::<u64>());
    let store = RedisStore::connect_with_prefix(&url(), &prefix)
        .await
        .unwrap();
    let fp = Some(Fingerprint([7; 32]));
    let call = |key: &StorageKey| Call::new(key.clone()).store(store.clone()).fingerprint(fp);

    // Warm up: the server learns the scripts (a NOSCRIPT answer costs a SCRIPT LOAD once).
    let warm = conformance::unique("warm-up");
    let _: u32 = call(&warm)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let _: u32 = call(&warm)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let failing = conformance::unique("warm-up-err");
    let _ = call(&failing)
        .run(ErrorPolicy::never(), async {
            Err::<u32, _>(Error::InFlight)
        })
        .await;

    let mut feed = client
        .get_async_monitor()
        .await
        .unwrap()
        .into_on_message::<String>();
    // Markers from another connection split the feed into one window per step.
    let marker = format!("idem-rt-mark-{:016x}", rand::random::<u64>());
    let mark = |n: usize| {
        let mut admin = admin.clone();
        let text = format!("{marker}-{n}");
        async move {
            redis::cmd("ECHO")
                .arg(text)
                .query_async::<String>(&mut admin)
                .await
                .unwrap()
        }
    };
    let key = conformance::unique("roundtrips");
    let err_key = conformance::unique("roundtrips-err");
    mark(0).await;
    let first: u64 = call(&key)
        .run(ErrorPolicy::never(), async {
            Ok::<_, Error>(rand::random())
        })
        .await
        .unwrap();
    mark(1).await;
    let again: Result<u64, Error> = call(&key)
        .run(ErrorPolicy::never(), async { unreachable!("a hit") })
        .await;
    assert_eq!(again.unwrap(), first);
    mark(2).await;
    let failed: Result<u64, Error> = call(&err_key)
        .run(ErrorPolicy::never(), async {
            Err(Error::InvalidKey {
                reason: "body".into(),
            })
        })
        .await;
    assert!(matches!(failed, Err(Error::InvalidKey { .. })));
    mark(3).await;
    assert!(store.get(&key).await.unwrap().is_some());
    mark(4).await;

    // Read the feed up to the last marker, splitting it into windows.
    let mut windows: Vec<Vec<Seen>> = Vec::new();
    let read = async {
        while let Some(line) = feed.next().await {
            if let Some(n) = (0..=4).find(|n| line.contains(&format!("{marker}-{n}\""))) {
                if n == 4 {
                    break;
                }
                windows.push(Vec::new());
                continue;
            }
            if let (Some(window), Some(seen)) = (windows.last_mut(), parse(&line)) {
                window.push(seen);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the MONITOR feed reached the last marker");
    assert_eq!(windows.len(), 4);

    // The store's connection is the client that sent commands naming this test's prefix.
    let ours = windows
        .iter()
        .flatten()
        .find(|s| s.client != "lua" && s.line.contains(&prefix))
        .map(|s| s.client.clone())
        .expect("the store's commands show in the MONITOR feed");
    let sent = |w: &[Seen]| -> Vec<String> {
        w.iter()
            .filter(|s| s.client == ours)
            .map(|s| s.line.clone())
            .collect()
    };
    let (miss, hit, error, get) = (
        sent(&windows[0]),
        sent(&windows[1]),
        sent(&windows[2]),
        sent(&windows[3]),
    );
    assert_eq!(miss.len(), 2, "a miss is claim + complete: {miss:#?}");
    assert_eq!(hit.len(), 1, "a hit is one claim: {hit:#?}");
    assert_eq!(
        error.len(),
        2,
        "a failed body is claim + release: {error:#?}"
    );
    assert_eq!(get.len(), 1, "get is one command: {get:#?}");
    for line in miss.iter().chain(&hit).chain(&error) {
        assert!(
            line.contains("\"EVALSHA\""),
            "scripts run by hash, not resent: {line}"
        );
    }
    assert!(get[0].contains("\"HGETALL\""), "{}", get[0]);
    eprintln!(
        "round trips: miss {}, hit {}, failed body {}, get {}",
        miss.len(),
        hit.len(),
        error.len(),
        get.len()
    );
}
