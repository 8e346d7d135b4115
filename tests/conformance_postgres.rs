//! The conformance suite against `PostgresStore`, plus what only PostgreSQL has: claims racing
//! on the server, the token sequence, server-side expiry times, rows a person altered, and
//! connections the server killed.
//!
//! Needs a server at `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! without one the tests print why and pass, unless `IDEM_REQUIRE_SERVICES=1`. Each run works
//! in its own schema `idem_test_<server epoch>_<pid>` with a table per test, and drops the
//! schemas of runs older than ten minutes.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use idem_support::postgres::{admin, url};
use idempotency::postgres::tokio_postgres;
use idempotency::store::{Claim, FencingToken, Forgotten, RecordState};
use idempotency::{Call, Error, ErrorPolicy, Fingerprint, PostgresStore, StorageKey, Store};

const LONG: Duration = Duration::from_secs(60);

/// A new table in this run's schema.
async fn fresh_table() -> Option<String> {
    idem_support::postgres::fresh_table("t").await
}

async fn fresh_postgres() -> Option<PostgresStore> {
    idem_support::postgres::store("t").await
}

async fn fresh_store() -> Option<Arc<dyn Store>> {
    idem_support::postgres::fresh("t").await
}

idem_testkit::conformance!(fresh_store, native_expiry = false);

fn key(label: &str) -> StorageKey {
    idem_support::unique(label)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

/// A record replaying `7u32`.
fn record(token: u64) -> Vec<u8> {
    idem_testkit::record_bytes(token, "7", "u32")
}

async fn acquire(
    store: &dyn Store,
    key: &StorageKey,
    fingerprint: u8,
    lease: Duration,
) -> FencingToken {
    match store
        .claim(key, Some(&fp(fingerprint)), lease)
        .await
        .unwrap()
    {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// Claims `key` (fingerprint 1) and completes it with [`record`] of its token.
async fn acquire_and_complete(store: &dyn Store, key: &StorageKey) {
    let t = acquire(store, key, 1, LONG).await;
    store.complete(key, t, &record(t.0), LONG).await.unwrap();
}

/// Runs `sql` on the store's own table through a separate connection (`{t}` = the table).
async fn sql(store: &PostgresStore, sql: &str) -> Vec<tokio_postgres::Row> {
    let (schema, table) = store.table().split_once('.').unwrap();
    let sql = sql.replace("{t}", &format!("\"{schema}\".\"{table}\""));
    admin().await.unwrap().query(&sql, &[]).await.unwrap()
}

/// Many claims of one key at the same instant: the server decides, and every loser learns what
/// the winner holds (in flight, or key reuse for another fingerprint) from the same statement,
/// including those whose snapshot had not seen the winner's row yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_have_one_winner_and_exact_answers() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let store = Arc::new(store);
    for round in 0..5 {
        let k = key(&format!("race{round}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(40));
        let tasks: Vec<_> = (0..40u8)
            .map(|i| {
                let (store, k, barrier) = (store.clone(), k.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    (
                        i % 2 + 1,
                        store.claim(&k, Some(&fp(i % 2 + 1)), LONG).await.unwrap(),
                    )
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let winners: Vec<_> = results
            .iter()
            .filter(|(_, c)| matches!(c, Claim::Acquired { .. }))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let (winner_fp, Claim::Acquired { token, takeover }) = winners[0] else {
            unreachable!()
        };
        assert!(!takeover);
        for (f, c) in &results {
            match c {
                Claim::Acquired { .. } => {}
                Claim::InFlight => assert_eq!(f, winner_fp, "round {round}: {results:?}"),
                Claim::KeyReuse => assert_ne!(f, winner_fp, "round {round}: {results:?}"),
                Claim::Completed(_) => panic!("nothing was completed: {results:?}"),
            }
        }
        let got = store.get(&k).await.unwrap().unwrap();
        assert_eq!(got.state, RecordState::InFlight { token: *token });
        assert_eq!(got.fingerprint, Some(fp(*winner_fp)));
    }
}

/// An expired lease raced by many: exactly one takes it over, with a token above the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_takeovers_have_one_winner() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let store = Arc::new(store);
    let k = key("race-takeover");
    let old = acquire(&*store, &k, 1, Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(30));
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (store, k, barrier) = (store.clone(), k.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&k, Some(&fp(1)), LONG).await.unwrap()
            })
        })
        .collect();
    let mut takeovers = 0;
    for t in tasks {
        match t.await.unwrap() {
            Claim::Acquired { token, takeover } => {
                assert!(takeover, "the expired claim was taken over");
                assert!(token > old);
                takeovers += 1;
            }
            Claim::InFlight => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(takeovers, 1);
}

/// Hits read, never write: no token is drawn and the row is not rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_draw_no_tokens() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let k = key("hits");
    acquire_and_complete(&store, &k).await;
    let before = seq_and_xmin(&store).await;
    for _ in 0..20 {
        assert!(matches!(
            store.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
            Claim::Completed(_)
        ));
        assert_eq!(
            store.claim(&k, Some(&fp(2)), LONG).await.unwrap(),
            Claim::KeyReuse
        );
    }
    assert_eq!(seq_and_xmin(&store).await, before);
}

/// The sequence's last value and the row's xmin (which changes when the row is rewritten).
async fn seq_and_xmin(store: &PostgresStore) -> (i64, String) {
    let (schema, table) = store.table().split_once('.').unwrap();
    let q = format!(
        "SELECT (SELECT last_value FROM \"{schema}\".\"{table}_token_seq\"), (SELECT xmin::text FROM \"{schema}\".\"{table}\")"
    );
    let row = admin().await.unwrap().query_one(&q, &[]).await.unwrap();
    (row.get(0), row.get(1))
}

/// Tokens come from one sequence: they keep increasing after records are released, purged, or
/// deleted by hand, and across stores (pools) sharing the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_deletes_and_stores() {
    let Some(a) = fresh_postgres().await else {
        return;
    };
    let b = PostgresStore::connect_with_table(&url(), a.table())
        .await
        .unwrap();
    let k = key("seq");
    let t1 = acquire(&a, &k, 1, LONG).await;
    a.release(&k, t1).await.unwrap();
    let t2 = acquire(&b, &k, 1, Duration::from_millis(100)).await;
    assert!(t2 > t1);
    // Completed with a short ttl: a claim whose lease merely ended is not purged.
    b.complete(&k, t2, &record(t2.0), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.purge_expired().await.unwrap(), 1);
    let t3 = acquire(&a, &k, 1, LONG).await;
    assert!(t3 > t2);
    sql(&a, "DELETE FROM {t}").await;
    let t4 = acquire(&b, &k, 1, LONG).await;
    assert!(t4 > t3, "{t4:?} after {t3:?}");
}

/// Leases and ttls are measured on the server's clock, in the right unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_the_servers_now_plus_the_duration() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let k = key("clock");
    let remaining = || async {
        sql(
            &store,
            "SELECT extract(epoch FROM expires_at - now())::float8 FROM {t}",
        )
        .await[0]
            .get::<_, f64>(0)
    };
    let t = acquire(&store, &k, 1, Duration::from_millis(45_500)).await;
    let left = remaining().await;
    assert!((44.0..=45.5).contains(&left), "lease: {left}s left");
    store.renew(&k, t, Duration::from_secs(90)).await.unwrap();
    let left = remaining().await;
    assert!((88.5..=90.0).contains(&left), "renewed lease: {left}s left");
    store
        .complete(&k, t, &record(t.0), Duration::from_secs(7200))
        .await
        .unwrap();
    let left = remaining().await;
    assert!((7198.5..=7200.0).contains(&left), "ttl: {left}s left");
    // A lease of a millisecond is over almost at once; sub-second leases are not rounded away.
    let short = key("clock-short");
    let st = acquire(&store, &short, 1, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Over, but nobody took over: still in flight under its token.
    assert_eq!(
        store.get(&short).await.unwrap().unwrap().state,
        RecordState::InFlight { token: st }
    );
    assert!(matches!(
        store.claim(&short, None, LONG).await.unwrap(),
        Claim::Acquired { takeover: true, .. }
    ));
}

/// An in-flight row whose lease ended stays its holder's for `ABANDONED_CLAIM_RETENTION`, by
/// the server's clock; after that it is gone for everyone, and purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_kept_until_abandoned() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let retention = idempotency::store::ABANDONED_CLAIM_RETENTION.as_secs();
    let (gone, kept) = (key("gone"), key("kept"));
    let t_gone = acquire(&store, &gone, 1, LONG).await;
    let t_kept = acquire(&store, &kept, 1, LONG).await;
    let backdate = |k: &StorageKey, lease_ended_secs_ago: u64| {
        let q = format!(
            "UPDATE {{t}} SET expires_at = now() - interval '{lease_ended_secs_ago} seconds' WHERE key = '{}'",
            k.as_str()
        );
        let store = &store;
        async move { sql(store, &q).await }
    };
    backdate(&gone, retention + 1).await;
    backdate(&kept, retention - 60).await;

    assert_eq!(store.get(&gone).await.unwrap(), None);
    for result in [
        store.complete(&gone, t_gone, &record(t_gone.0), LONG).await,
        store.renew(&gone, t_gone, LONG).await,
        store.release(&gone, t_gone).await,
    ] {
        assert!(matches!(result, Err(Error::LeaseLost { .. })), "{result:?}");
    }
    assert_eq!(
        store.get(&kept).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t_kept }
    );
    assert_eq!(store.purge_expired().await.unwrap(), 1, "only `gone`");
    store
        .complete(&kept, t_kept, &record(t_kept.0), LONG)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&kept, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(_)
    ));
}

/// `purge_expired_up_to` deletes at most its limit of the rows `purge_expired` deletes per
/// statement (completed past their ttl, abandoned claims), and nothing else; `forget` finds
/// such rows absent already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_up_to_removes_at_most_the_limit() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let retention = idempotency::store::ABANDONED_CLAIM_RETENTION.as_secs();
    for i in 0..3 {
        acquire_and_complete(&store, &key(&format!("done{i}"))).await;
    }
    let abandoned = key("abandoned");
    acquire(&store, &abandoned, 1, LONG).await;
    let ended = key("ended");
    acquire(&store, &ended, 1, LONG).await;
    let live = key("live");
    acquire_and_complete(&store, &live).await;
    sql(
        &store,
        &format!(
            "UPDATE {{t}} SET expires_at = now() - interval '1 second' WHERE state = 'completed' AND key <> '{}'",
            live.as_str()
        ),
    )
    .await;
    for (k, secs_ago) in [(&abandoned, retention + 1), (&ended, 1)] {
        let q = format!(
            "UPDATE {{t}} SET expires_at = now() - interval '{secs_ago} seconds' WHERE key = '{}'",
            k.as_str()
        );
        sql(&store, &q).await;
    }
    assert_eq!(
        store.forget(&abandoned, true).await.unwrap(),
        Forgotten::Absent
    );
    let mut steps = Vec::new();
    for _ in 0..3 {
        steps.push(store.purge_expired_up_to(3).await.unwrap());
    }
    assert_eq!(
        steps,
        [3, 1, 0],
        "3 results past their ttl and 1 abandoned claim"
    );
    assert!(store.get(&live).await.unwrap().is_some());
    assert!(
        store.get(&ended).await.unwrap().is_some(),
        "a lease that just ended is no abandoned claim"
    );
}

/// Rows altered by hand are errors, never panics and never silent re-runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_rows_are_errors_not_panics() {
    let Some(store) = fresh_postgres().await else {
        return;
    };
    let k = key("altered");
    acquire_and_complete(&store, &k).await;

    sql(&store, "UPDATE {t} SET record = NULL").await;
    assert!(matches!(
        store.claim(&k, Some(&fp(1)), LONG).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(store.get(&k).await, Err(Error::Corrupt { .. })));
    let out: Result<u32, Error> = Call::new(k.clone())
        .store(store.clone())
        .fingerprint(Some(fp(1)))
        .run(ErrorPolicy::never(), async {
            unreachable!("never re-run silently")
        })
        .await;
    assert!(matches!(out, Err(Error::Corrupt { .. })), "{out:?}");

    sql(
        &store,
        "UPDATE {t} SET record = '\\x00', fingerprint = '\\x0102'",
    )
    .await;
    assert!(matches!(store.get(&k).await, Err(Error::Corrupt { .. })));
    assert_eq!(
        store.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::KeyReuse
    );
    assert_eq!(
        store.claim(&k, None, LONG).await.unwrap(),
        Claim::Completed(vec![0].into())
    );

    sql(&store, "UPDATE {t} SET token = -3, fingerprint = NULL").await;
    assert!(matches!(store.get(&k).await, Err(Error::Corrupt { .. })));
    assert!(matches!(
        store.claim(&k, None, LONG).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store.complete(&k, FencingToken(u64::MAX), b"x", LONG).await,
        Err(Error::LeaseLost { .. })
    ));
}

/// A terminated backend surfaces as at most one `Error::Store`; the next call works, and so do
/// all after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_backends_are_terminated() {
    let Some(table) = fresh_table().await else {
        return;
    };
    let app = format!("idem_kill_{:016x}", rand::random::<u64>());
    let sep = if url().contains('?') { '&' } else { '?' };
    let store =
        PostgresStore::connect_with_table(&format!("{}{sep}application_name={app}", url()), &table)
            .await
            .unwrap();
    let admin = admin().await.unwrap();
    let kill = || async {
        admin
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) k",
                &[&app],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    for round in 0..6 {
        let k = key(&format!("kill{round}"));
        // Keep several connections busy so the pool holds more than one.
        let keys: Vec<StorageKey> = (0..4).map(|i| key(&format!("warm{i}"))).collect();
        let warm: Vec<_> = keys.iter().map(|k| store.get(k)).collect();
        for r in futures::future::join_all(warm).await {
            r.unwrap();
        }
        assert!(
            kill().await >= 1,
            "round {round}: the store's connections were found"
        );
        if round % 2 == 1 {
            // Give the client time to notice, so the pool drops the connections on checkout.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut errors = 0;
        let token = loop {
            match store.claim(&k, Some(&fp(1)), LONG).await {
                Ok(Claim::Acquired { token, .. }) => break token,
                Ok(other) => panic!("round {round}: {other:?}"),
                Err(Error::Store {
                    backend: "postgres",
                    ..
                }) if errors == 0 => errors += 1,
                Err(e) => panic!("round {round}: a second failure after a kill: {e}"),
            }
        };
        store
            .complete(&k, token, &record(token.0), LONG)
            .await
            .unwrap();
        assert!(matches!(
            store.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
            Claim::Completed(_)
        ));
    }
}

/// A TCP proxy to the server that can be taken down (refusing connections and cutting those
/// open) and brought back on the same port, to play a server restart without restarting it.
struct Proxy {
    port: u16,
    target: String,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut proxy = Proxy {
            port,
            target,
            accept: None,
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target.clone();
        self.accept = Some(tokio::spawn(async move {
            // Dropped with the accept task, which aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    fn down(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(listener);
    }
}

/// The server goes away (connections cut, new ones refused) and comes back: meanwhile every
/// call fails with `Error::Store`, promptly; once it is back, at most one more call fails and
/// then all work, with the records kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_when_the_server_comes_back() {
    use idempotency::postgres::tokio_postgres::config::Host;

    let Some(table) = fresh_table().await else {
        return;
    };
    let config: tokio_postgres::Config = url().parse().unwrap();
    let Some(Host::Tcp(host)) = config.get_hosts().first() else {
        eprintln!("SKIPPED: the server URL is not TCP");
        return;
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut proxy = Proxy::start(format!("{host}:{port}")).await;
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let proxied = format!(
        "postgres://{}{password}@127.0.0.1:{}/{}",
        config.get_user().unwrap_or("postgres"),
        proxy.port,
        config.get_dbname().unwrap_or("postgres"),
    );
    let store = PostgresStore::connect_with_table(&proxied, &table)
        .await
        .unwrap();
    let done = key("restart-done");
    let t = acquire(&store, &done, 1, LONG).await;
    store.complete(&done, t, &record(t.0), LONG).await.unwrap();

    for round in 0..3 {
        proxy.down();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let err = store
                .claim(&key("down"), Some(&fp(1)), LONG)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Store {
                        backend: "postgres",
                        ..
                    }
                ),
                "round {round}: {err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "round {round}: fails promptly"
            );
        }
        proxy.up().await;
        let mut errors = 0;
        let got = loop {
            match store.claim(&done, Some(&fp(1)), LONG).await {
                Ok(claim) => break claim,
                Err(Error::Store { .. }) if errors == 0 => errors += 1,
                Err(e) => panic!("round {round}: a second failure after the server came back: {e}"),
            }
        };
        assert!(matches!(got, Claim::Completed(_)), "round {round}: {got:?}");
        let k = key(&format!("after{round}"));
        acquire_and_complete(&store, &k).await;
    }
}

/// Processes starting together all create (or find) the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_create_the_table_once() {
    let Some(table) = fresh_table().await else {
        return;
    };
    let url = url();
    let connects: Vec<_> = (0..6)
        .map(|_| PostgresStore::connect_with_table(&url, &table))
        .collect();
    let stores: Vec<PostgresStore> = futures::future::try_join_all(connects).await.unwrap();
    let k = key("connects");
    let t = acquire(&stores[0], &k, 1, LONG).await;
    assert_eq!(
        stores[5].claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    stores[3].complete(&k, t, &record(t.0), LONG).await.unwrap();
}

#[tokio::test]
async fn bad_table_names_are_refused_before_connecting() {
    for bad in ["", "x; DROP TABLE y", "a.b.c", "1x", "x\"y", "tab-le"] {
        // Port 1 is never a PostgreSQL server: the name is checked first.
        let err = PostgresStore::connect_with_table("postgres://postgres@127.0.0.1:1/none", bad)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config { .. }) && !err.is_retryable(),
            "{bad}: {err}"
        );
        assert!(
            err.to_string().contains("invalid PostgreSQL table name"),
            "{bad}: {err}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_store_error() {
    let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/none")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Store {
                backend: "postgres",
                ..
            }
        ),
        "{err}"
    );
}
