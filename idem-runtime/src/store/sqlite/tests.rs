use bytes::Bytes;
use tempfile::TempDir;

use super::row::{STATE_COMPLETED, STATE_IN_FLIGHT};
use super::*;

/// A directory of its own, removed on drop.
fn temp_dir(label: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("idem-sqlite-{label}-"))
        .tempdir()
        .unwrap()
}

/// The database file in `dir`.
fn db(dir: &TempDir) -> PathBuf {
    dir.path().join("idem.sqlite")
}

fn key(k: &str) -> StorageKey {
    StorageKey::derive("sqlite-tests", k).unwrap()
}

const LONG: Duration = Duration::from_secs(60);

async fn acquire(store: &SqliteStore, k: &StorageKey) -> FencingToken {
    match store.claim(k, None, LONG).await.unwrap() {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

#[tokio::test]
async fn tokens_increase_across_deletion_and_reopening() {
    let dir = temp_dir("tokens");
    let k = key("k");
    let first = {
        let store = SqliteStore::open(db(&dir)).await.unwrap();
        let t = acquire(&store, &k).await;
        store.release(&k, t).await.unwrap();
        assert_eq!(
            store.get(&k).await.unwrap(),
            None,
            "release deletes the row"
        );
        t
    };
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let second = acquire(&store, &k).await;
    assert!(second > first, "{second:?} after {first:?}");
    assert!(matches!(
        store.complete(&k, first, b"stale", LONG).await,
        Err(Error::LeaseLost { .. })
    ));
    store.complete(&k, second, b"r", LONG).await.unwrap();
    drop(store);
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    assert_eq!(
        store.claim(&k, None, LONG).await.unwrap(),
        Claim::Completed(Bytes::from_static(b"r"))
    );
}

#[tokio::test]
async fn bad_rows_are_corrupt_errors_not_panics() {
    let dir = temp_dir("corrupt");
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let raw = Connection::open(db(&dir)).unwrap();
    let far = now_ms() + 3_600_000;
    // (label, fingerprint, token, state, record)
    type BadRow = (&'static str, Option<Vec<u8>>, i64, i64, Option<Vec<u8>>);
    let cases: [BadRow; 4] = [
        (
            "short fingerprint",
            Some(vec![1, 2, 3]),
            7,
            STATE_IN_FLIGHT,
            None,
        ),
        ("zero token", None, 0, STATE_IN_FLIGHT, None),
        (
            "negative token",
            None,
            -4,
            STATE_COMPLETED,
            Some(b"r".to_vec()),
        ),
        ("completed without record", None, 7, STATE_COMPLETED, None),
    ];
    for (label, fingerprint, token, state, record) in cases {
        let k = key(label);
        raw.execute(
            "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![k.as_str(), fingerprint, token, state, far, record],
        )
        .unwrap();
        let claim = store.claim(&k, None, LONG).await;
        assert!(
            matches!(claim, Err(Error::Corrupt { .. })),
            "{label}: claim gave {claim:?}"
        );
        let got = store.get(&k).await;
        assert!(
            matches!(got, Err(Error::Corrupt { .. })),
            "{label}: get gave {got:?}"
        );
    }
    // Other keys are unaffected, and purge removes bad rows once they expire.
    let t = acquire(&store, &key("fine")).await;
    store.complete(&key("fine"), t, b"ok", LONG).await.unwrap();
    raw.execute(
        "UPDATE idem_records SET expires_at = 0 WHERE key != ?1",
        [key("fine").as_str()],
    )
    .unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 4);
    assert!(store.get(&key("fine")).await.unwrap().is_some());
}

/// An in-flight row whose lease ended stays its holder's for ABANDONED_CLAIM_RETENTION;
/// after that it is gone for everyone, and purged.
#[tokio::test]
async fn claims_are_kept_until_abandoned() {
    let dir = temp_dir("abandoned");
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let raw = Connection::open(db(&dir)).unwrap();
    let retention = i64::try_from(ABANDONED_CLAIM_RETENTION.as_millis()).unwrap();
    let (gone, kept) = (key("gone"), key("kept"));
    let t_gone = acquire(&store, &gone).await;
    let t_kept = acquire(&store, &kept).await;
    let backdate = |k: &StorageKey, lease_ended_ms_ago: i64| {
        raw.execute(
            "UPDATE idem_records SET expires_at = ?1 WHERE key = ?2",
            params![now_ms() - lease_ended_ms_ago, k.as_str()],
        )
        .unwrap();
    };
    backdate(&gone, retention + 1_000);
    backdate(&kept, retention - 60_000);

    assert_eq!(store.get(&gone).await.unwrap(), None);
    for result in [
        store.complete(&gone, t_gone, b"too late", LONG).await,
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
    store.complete(&kept, t_kept, b"late", LONG).await.unwrap();
    assert_eq!(
        store.claim(&kept, None, LONG).await.unwrap(),
        Claim::Completed(Bytes::from_static(b"late"))
    );
}

#[tokio::test]
async fn an_unknown_schema_version_is_refused() {
    let dir = temp_dir("schema");
    drop(SqliteStore::open(db(&dir)).await.unwrap());
    let raw = Connection::open(db(&dir)).unwrap();
    raw.execute("UPDATE idem_meta SET schema_version = 99", [])
        .unwrap();
    let err = SqliteStore::open(db(&dir)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Store {
                backend: "sqlite",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("99"), "{err}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_store_error() {
    let dir = temp_dir("garbage");
    std::fs::write(db(&dir), vec![0x5a; 8192]).unwrap();
    let err = SqliteStore::open(db(&dir)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Store {
                backend: "sqlite",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_file_opened_by_many_at_once() {
    // Many rounds on fresh files: workers that start together race to create the schema
    // and switch to WAL, and the losers used to fail with "database is locked".
    for round in 0..20 {
        let dir = temp_dir(&format!("open-race-{round}"));
        let opens: Vec<_> = (0..16)
            .map(|_| tokio::spawn(SqliteStore::open(db(&dir))))
            .collect();
        for open in opens {
            open.await.unwrap().unwrap();
        }
    }
    let dir = temp_dir("open");
    let opens: Vec<_> = (0..8)
        .map(|_| tokio::spawn(SqliteStore::open(db(&dir))))
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().unwrap());
    }
    let mode: String = stores[0]
        .with_conn(|c| {
            c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .map_err(sql_err)
        })
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // All handles see one table and one token counter.
    let mut tokens = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        tokens.push(acquire(store, &key(&format!("open{i}"))).await.0);
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}
