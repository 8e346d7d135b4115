use bytes::Bytes;
use tempfile::TempDir;

use super::row::{STATE_COMPLETED, STATE_IN_FLIGHT};
use super::*;
use crate::store::RecordState;

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

/// A file made before `claimed_at` existed gets the column when opened, keeps its rows (listed
/// without a claim time) and its schema version, and still takes rows written as builds of
/// before write them.
#[tokio::test]
async fn a_table_of_before_claimed_at_gets_the_column() {
    let dir = temp_dir("claimed-at");
    let old = key("old");
    {
        let raw = Connection::open(db(&dir)).unwrap();
        raw.execute_batch(
            "CREATE TABLE idem_meta (id INTEGER PRIMARY KEY CHECK (id = 1),
                 schema_version INTEGER NOT NULL, last_token INTEGER NOT NULL) STRICT;
             INSERT INTO idem_meta VALUES (1, 1, 7);
             CREATE TABLE idem_records (key TEXT PRIMARY KEY NOT NULL, fingerprint BLOB,
                 token INTEGER NOT NULL, state INTEGER NOT NULL CHECK (state IN (0, 1)),
                 expires_at INTEGER NOT NULL, record BLOB) STRICT;
             CREATE INDEX idem_records_expires_at ON idem_records (expires_at);",
        )
        .unwrap();
        raw.execute(
            "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record) VALUES (?1, NULL, 7, 1, ?2, x'72')",
            params![old.as_str(), now_ms() + 60_000],
        )
        .unwrap();
    }
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    drop(SqliteStore::open(db(&dir)).await.unwrap());
    let fresh = key("fresh");
    let before = SystemTime::now() - Duration::from_secs(1);
    let t = acquire(&store, &fresh).await;
    assert!(t.0 > 7, "the token counter of the file goes on");
    let page = store.scan(None, 10).await.unwrap();
    assert_eq!(page.next, None);
    let listed: std::collections::HashMap<_, _> =
        page.records.iter().map(|r| (r.key.clone(), r)).collect();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[&old].claimed_at, None, "claimed before the column");
    assert_eq!(listed[&old].size, 1);
    let claimed_at = listed[&fresh].claimed_at.expect("a claim of this build");
    assert!(
        claimed_at >= before && claimed_at <= SystemTime::now(),
        "{claimed_at:?}"
    );
    let raw = Connection::open(db(&dir)).unwrap();
    let version: i64 = raw.query_row(SCHEMA_VERSION_SQL, [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // A build of before writes its rows without the column.
    let older = key("older");
    raw.execute(
        "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record) VALUES (?1, NULL, 9, 0, ?2, NULL)",
        params![older.as_str(), now_ms() + 60_000],
    )
    .unwrap();
    assert_eq!(
        store.forget(&older, true).await.unwrap(),
        Forgotten::InFlight {
            token: FencingToken(9)
        }
    );
}

/// `purge_expired_up_to` removes at most its limit of the rows `purge_expired` removes per
/// call, and nothing live.
#[tokio::test]
async fn purge_up_to_removes_at_most_the_limit() {
    let dir = temp_dir("purge-up-to");
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    for i in 0..5 {
        let k = key(&format!("expired{i}"));
        let t = acquire(&store, &k).await;
        store.complete(&k, t, b"r", LONG).await.unwrap();
    }
    let live = key("live");
    acquire(&store, &live).await;
    let raw = Connection::open(db(&dir)).unwrap();
    raw.execute(
        "UPDATE idem_records SET expires_at = 0 WHERE key != ?1",
        [live.as_str()],
    )
    .unwrap();
    let mut steps = Vec::new();
    for _ in 0..4 {
        steps.push(store.purge_expired_up_to(2).await.unwrap());
    }
    assert_eq!(steps, [2, 2, 1, 0]);
    assert!(store.get(&live).await.unwrap().is_some());
}

/// `idem_records` as builds of before steps made it (with `claimed_at`, without `steps`), and
/// a row those builds wrote.
const TABLE_OF_BEFORE_STEPS: &str = "
    CREATE TABLE idem_meta (id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL, last_token INTEGER NOT NULL) STRICT;
    INSERT INTO idem_meta VALUES (1, 1, 7);
    CREATE TABLE idem_records (key TEXT PRIMARY KEY NOT NULL, fingerprint BLOB,
        token INTEGER NOT NULL, state INTEGER NOT NULL CHECK (state IN (0, 1)),
        expires_at INTEGER NOT NULL, record BLOB, claimed_at INTEGER) STRICT;
    CREATE INDEX idem_records_expires_at ON idem_records (expires_at);";

fn has_steps_column(path: &Path) -> bool {
    Connection::open(path)
        .unwrap()
        .query_row(HAS_COLUMN, ["steps"], |r| r.get(0))
        .unwrap()
}

/// A file made before `steps` existed gets the column when opened (its schema version stays),
/// its rows keep working, and a step saved there is loaded back; builds of before still write
/// their rows.
#[tokio::test]
async fn a_table_of_before_steps_gets_the_column() {
    let dir = temp_dir("steps-column");
    let old = key("old");
    {
        let raw = Connection::open(db(&dir)).unwrap();
        raw.execute_batch(TABLE_OF_BEFORE_STEPS).unwrap();
        raw.execute(
            "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record, claimed_at) VALUES (?1, NULL, 7, 0, ?2, NULL, ?3)",
            params![old.as_str(), now_ms() + 60_000, now_ms()],
        )
        .unwrap();
    }
    assert!(!has_steps_column(&db(&dir)));
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    assert!(has_steps_column(&db(&dir)));
    let raw = Connection::open(db(&dir)).unwrap();
    let version: i64 = raw.query_row(SCHEMA_VERSION_SQL, [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);

    // The claim an old build made has no steps yet, and takes them.
    let held = FencingToken(7);
    assert!(store.load_steps(&old, held).await.unwrap().is_empty());
    store.save_step(&old, held, "charge", b"c1").await.unwrap();
    store.save_step(&old, held, "ship", b"s1").await.unwrap();
    store.save_step(&old, held, "charge", b"c2").await.unwrap();
    let mut steps = store.load_steps(&old, held).await.unwrap();
    steps.sort();
    assert_eq!(
        steps,
        [
            ("charge".to_owned(), Bytes::from_static(b"c2")),
            ("ship".to_owned(), Bytes::from_static(b"s1")),
        ]
    );
    store.complete(&old, held, b"r", LONG).await.unwrap();
    let stored: Option<Vec<u8>> = raw
        .query_row(
            "SELECT steps FROM idem_records WHERE key = ?1",
            [old.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, None, "the result replaces the steps");

    // A claim of this build, on the upgraded file.
    let fresh = key("fresh");
    let t = acquire(&store, &fresh).await;
    assert!(t.0 > 7, "the token counter of the file goes on");
    store.save_step(&fresh, t, "a", b"1").await.unwrap();
    assert_eq!(
        store.load_steps(&fresh, t).await.unwrap(),
        [("a".to_owned(), Bytes::from_static(b"1"))]
    );

    // A build of before writes its rows without the column, and this one reads them.
    let older = key("older");
    raw.execute(
        "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record, claimed_at) VALUES (?1, NULL, 9, 0, ?2, NULL, ?3)",
        params![older.as_str(), now_ms() + 60_000, now_ms()],
    )
    .unwrap();
    assert!(store
        .load_steps(&older, FencingToken(9))
        .await
        .unwrap()
        .is_empty());
    // Reopening finds nothing more to add.
    drop(SqliteStore::open(db(&dir)).await.unwrap());
}

/// Without `create_tables`, a file made before `steps` existed is refused, naming the column
/// and the statement that adds it, and is left as it was.
#[tokio::test]
async fn without_creating_tables_a_table_of_before_steps_is_refused() {
    let no_ddl = SqliteOptions::new().create_tables(false);
    let dir = temp_dir("steps-no-ddl");
    Connection::open(db(&dir))
        .unwrap()
        .execute_batch(TABLE_OF_BEFORE_STEPS)
        .unwrap();
    let bytes = std::fs::read(db(&dir)).unwrap();
    let err = SqliteStore::open_with(db(&dir), &no_ddl).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    let message = err.to_string();
    // The readable columns came after steps: named too.
    assert!(
        message.contains("(no `steps` and `operation` and `status` and `result` and `created_at` and `completed_at` and `fingerprint_hex` columns)"),
        "{message}"
    );
    assert!(
        message.contains("run `ALTER TABLE idem_records ADD COLUMN steps BLOB; ALTER TABLE idem_records ADD COLUMN operation TEXT; "),
        "{message}"
    );
    assert!(
        std::fs::read(db(&dir)).unwrap() == bytes,
        "the file is unchanged"
    );
    assert!(!has_steps_column(&db(&dir)));

    // A table of before both added columns names both.
    let dir = temp_dir("columns-no-ddl");
    Connection::open(db(&dir))
        .unwrap()
        .execute_batch(&TABLE_OF_BEFORE_STEPS.replace(", claimed_at INTEGER", ""))
        .unwrap();
    let err = SqliteStore::open_with(db(&dir), &no_ddl).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("(no `claimed_at` and `steps` and `operation` and"),
        "{message}"
    );
    assert!(
        message.contains(
            "run `ALTER TABLE idem_records ADD COLUMN claimed_at INTEGER; ALTER TABLE idem_records ADD COLUMN steps BLOB; ALTER TABLE idem_records ADD COLUMN operation TEXT; "
        ),
        "{message}"
    );

    // Once opened with it, the same options open the file.
    drop(SqliteStore::open(db(&dir)).await.unwrap());
    SqliteStore::open_with(db(&dir), &no_ddl).await.unwrap();
}

/// Damaged steps are a corrupt error naming the key when loaded; a save keeps the damage (it
/// never drops steps silently), and a replay never reads them.
#[tokio::test]
async fn damaged_steps_are_corrupt_when_loaded_and_not_read_by_a_replay() {
    let dir = temp_dir("steps-corrupt");
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let raw = Connection::open(db(&dir)).unwrap();
    let k = key("k");
    let t = acquire(&store, &k).await;
    store.save_step(&k, t, "a", b"1").await.unwrap();
    // A frame whose name length runs past the end, after the good one.
    let mut damaged = steps_blob::append(None, "a", b"1");
    damaged.extend_from_slice(&[0, 0, 0, 0xff]);
    raw.execute(
        "UPDATE idem_records SET steps = ?1 WHERE key = ?2",
        params![damaged, k.as_str()],
    )
    .unwrap();
    for _ in 0..2 {
        let err = store.load_steps(&k, t).await.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { key: Some(at), .. } if *at == k),
            "{err:?}"
        );
        store.save_step(&k, t, "b", b"2").await.unwrap();
    }

    // A completed row that holds steps (as a build of before leaves them) replays as usual.
    let done = key("done");
    let t = acquire(&store, &done).await;
    store.complete(&done, t, b"r", LONG).await.unwrap();
    raw.execute(
        "UPDATE idem_records SET steps = x'ffffffff' WHERE key = ?1",
        [done.as_str()],
    )
    .unwrap();
    assert_eq!(
        store.claim(&done, None, LONG).await.unwrap(),
        Claim::Completed(Bytes::from_static(b"r"))
    );
}

/// A claim that acquires over a completed row past its ttl starts with no steps, even where a
/// build of before left some in the row; a takeover of an in-flight row keeps them.
#[tokio::test]
async fn only_a_takeover_keeps_the_steps_of_the_row() {
    let dir = temp_dir("steps-claim");
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let raw = Connection::open(db(&dir)).unwrap();
    let left = steps_blob::append(None, "stale", b"x");
    let (expired, taken) = (key("expired"), key("taken"));

    let t = acquire(&store, &expired).await;
    store.complete(&expired, t, b"r", LONG).await.unwrap();
    raw.execute(
        "UPDATE idem_records SET steps = ?1, expires_at = 0 WHERE key = ?2",
        params![left, expired.as_str()],
    )
    .unwrap();
    let Claim::Acquired { token, takeover } = store.claim(&expired, None, LONG).await.unwrap()
    else {
        panic!("acquires")
    };
    assert!(!takeover);
    assert!(store.load_steps(&expired, token).await.unwrap().is_empty());

    let t = acquire(&store, &taken).await;
    store.save_step(&taken, t, "kept", b"k").await.unwrap();
    store.renew(&taken, t, Duration::ZERO).await.unwrap();
    let Claim::Acquired { token, takeover } = store.claim(&taken, None, LONG).await.unwrap() else {
        panic!("takes over")
    };
    assert!(takeover);
    assert_eq!(
        store.load_steps(&taken, token).await.unwrap(),
        [("kept".to_owned(), Bytes::from_static(b"k"))]
    );
    assert!(matches!(
        store.load_steps(&taken, t).await,
        Err(Error::LeaseLost { .. })
    ));
}
