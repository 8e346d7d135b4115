//! Round trips per call against Redis: a replayed call (hit) is one command, a first call
//! (miss: claim, complete) two, a call whose body fails (claim, release) two, `get` one.
//!
//! Counted exactly, by watching the server's `MONITOR` feed for the commands sent on the
//! store's own connection (`idem_support::monitor`), so other clients of the same server (tests
//! running in parallel, other processes) do not disturb the count. This is what a benchmark
//! reading `INFO commandstats` on an otherwise idle server sees as well.
#![cfg(feature = "redis")]

use std::time::Duration;

use idem_support::monitor::{self, Command, Monitor};
use idem_support::unique;
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, StorageKey, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_one_round_trip_and_a_miss_two() {
    let Some(admin) = idem_support::redis::probe().await else {
        return;
    };
    let Some(store) = idem_support::redis::store("idem-rt").await else {
        return;
    };
    let _cleanup = idem_support::redis::DeletePrefix(store.prefix().to_owned());
    let fp = Some(Fingerprint([7; 32]));
    let call = |key: &StorageKey| Call::new(key.clone()).store(store.clone()).fingerprint(fp);

    // Warm up: the server learns the scripts (a NOSCRIPT answer costs a SCRIPT LOAD once).
    let warm = unique("warm-up");
    let _: u32 = call(&warm)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let _: u32 = call(&warm)
        .run(ErrorPolicy::never(), async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let failing = unique("warm-up-err");
    let _ = call(&failing)
        .run(ErrorPolicy::never(), async {
            Err::<u32, _>(Error::InFlight { key: None })
        })
        .await;

    // Markers from another connection split the feed into one window per step.
    let url = idem_support::redis::url();
    let mut feed = Monitor::start(&url, admin).await.unwrap();
    let key = unique("roundtrips");
    let err_key = unique("roundtrips-err");
    feed.mark().await.unwrap();
    let first: u64 = call(&key)
        .run(ErrorPolicy::never(), async {
            Ok::<_, Error>(rand::random())
        })
        .await
        .unwrap();
    feed.mark().await.unwrap();
    let again: Result<u64, Error> = call(&key)
        .run(ErrorPolicy::never(), async { unreachable!("a hit") })
        .await;
    assert_eq!(again.unwrap(), first);
    feed.mark().await.unwrap();
    let failed: Result<u64, Error> = call(&err_key)
        .run(ErrorPolicy::never(), async {
            Err(Error::InvalidKey {
                reason: "body".into(),
            })
        })
        .await;
    assert!(matches!(failed, Err(Error::InvalidKey { .. })));
    feed.mark().await.unwrap();
    assert!(store.get(&key).await.unwrap().is_some());
    feed.mark().await.unwrap();

    let windows = feed
        .windows(Duration::from_secs(10))
        .await
        .expect("the MONITOR feed reached the last marker");
    assert_eq!(windows.len(), 4);
    // The store's connection is the client that sent commands naming this test's prefix.
    let sent = monitor::sent_by_store(&windows, store.prefix())
        .expect("the store's commands show in the MONITOR feed");
    let texts = |w: &[Command]| w.iter().map(Command::text).collect::<Vec<_>>();
    let (miss, hit, error, get) = (&sent[0], &sent[1], &sent[2], &sent[3]);
    assert_eq!(
        miss.len(),
        2,
        "a miss is claim + complete: {:#?}",
        texts(miss)
    );
    assert_eq!(hit.len(), 1, "a hit is one claim: {:#?}", texts(hit));
    assert_eq!(
        error.len(),
        2,
        "a failed body is claim + release: {:#?}",
        texts(error)
    );
    assert_eq!(get.len(), 1, "get is one command: {:#?}", texts(get));
    for command in miss.iter().chain(hit).chain(error) {
        assert!(
            command.is("EVALSHA"),
            "scripts run by hash, not resent: {:?}",
            command.text()
        );
    }
    assert!(get[0].is("HGETALL"), "{:?}", get[0].text());
    eprintln!(
        "round trips: miss {}, hit {}, failed body {}, get {}",
        miss.len(),
        hit.len(),
        error.len(),
        get.len()
    );
}
