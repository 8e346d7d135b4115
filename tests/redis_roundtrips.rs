//! Round trips per call against Redis: a replayed call (hit) is one command, a first call
//! (miss: claim, complete) two, a call whose body fails (claim, release) two, `get` one. Durable
//! steps cost one round trip each on a first run (a body of three steps: claim, three
//! `save_step`, complete, five in all) and nothing on a replay of the completed call (its claim
//! alone, one).
//!
//! Counted exactly, by watching the server's `MONITOR` feed for the commands sent on the
//! store's own connection (`idem_support::monitor`), so other clients of the same server (tests
//! running in parallel, other processes) do not disturb the count. This is what a benchmark
//! reading `INFO commandstats` on an otherwise idle server sees as well.
#![cfg(feature = "redis")]

use std::time::Duration;

use idem_support::monitor::{self, Command, Monitor};
use idem_support::unique;
use idempotency::{step, Call, Error, ErrorPolicy, Fingerprint, StorageKey, Store};

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

/// The body of the steps test: three steps, then a value.
async fn three_steps() -> Result<u32, Error> {
    let a = step("a", async { Ok::<_, Error>(1u32) }).await?;
    let b = step("b", async { Ok::<_, Error>(2u32) }).await?;
    let c = step("c", async { Ok::<_, Error>(3u32) }).await?;
    Ok(a + b + c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_cost_one_round_trip_each_on_a_first_run_and_none_on_a_replay() {
    let Some(admin) = idem_support::redis::probe().await else {
        return;
    };
    let Some(store) = idem_support::redis::store("idem-rt-steps").await else {
        return;
    };
    let _cleanup = idem_support::redis::DeletePrefix(store.prefix().to_owned());
    let fp = Some(Fingerprint([7; 32]));
    let call = |key: &StorageKey| Call::new(key.clone()).store(store.clone()).fingerprint(fp);

    // Warm up: the server learns the claim, save_step and complete scripts.
    let warm = unique("warm-up-steps");
    assert_eq!(
        call(&warm)
            .run(ErrorPolicy::never(), three_steps())
            .await
            .unwrap(),
        6
    );

    let url = idem_support::redis::url();
    let mut feed = Monitor::start(&url, admin).await.unwrap();
    let key = unique("roundtrips-steps");
    feed.mark().await.unwrap();
    let first: u32 = call(&key)
        .run(ErrorPolicy::never(), three_steps())
        .await
        .unwrap();
    assert_eq!(first, 6);
    feed.mark().await.unwrap();
    let again: Result<u32, Error> = call(&key)
        .run(ErrorPolicy::never(), async { unreachable!("a replay") })
        .await;
    assert_eq!(again.unwrap(), first);
    feed.mark().await.unwrap();

    let windows = feed
        .windows(Duration::from_secs(10))
        .await
        .expect("the MONITOR feed reached the last marker");
    assert_eq!(windows.len(), 2);
    let sent = monitor::sent_by_store(&windows, store.prefix())
        .expect("the store's commands show in the MONITOR feed");
    let texts = |w: &[Command]| w.iter().map(Command::text).collect::<Vec<_>>();
    let (first_run, replay) = (&sent[0], &sent[1]);
    assert_eq!(
        first_run.len(),
        5,
        "a first run of three steps is claim + 3 save_step + complete: {:#?}",
        texts(first_run)
    );
    assert_eq!(
        replay.len(),
        1,
        "a replay of a completed call is its claim alone: {:#?}",
        texts(replay)
    );
    for command in first_run.iter().chain(replay) {
        assert!(
            command.is("EVALSHA"),
            "scripts run by hash, not resent: {:?}",
            command.text()
        );
    }
    // EVALSHA <sha> 2 <record> <fence> <token> <name> <step record>: the three saves run one
    // script, neither the claim's nor the complete's, in the body's order.
    let sha = |c: &Command| c.args[1].clone();
    let saves = &first_run[1..4];
    for (save, name) in saves.iter().zip(["a", "b", "c"]) {
        assert_eq!(sha(save), sha(&saves[0]), "{:?}", save.text());
        assert_eq!(save.args.get(6).map(Vec::as_slice), Some(name.as_bytes()));
    }
    assert_ne!(
        sha(&saves[0]),
        sha(&first_run[0]),
        "the claim is not a save"
    );
    assert_ne!(
        sha(&saves[0]),
        sha(&first_run[4]),
        "the complete is not a save"
    );
    assert_ne!(sha(&first_run[0]), sha(&first_run[4]));
    assert_eq!(sha(&replay[0]), sha(&first_run[0]), "a replay is a claim");
    eprintln!(
        "round trips with 3 steps: first run {}, replay {}",
        first_run.len(),
        replay.len()
    );
}
