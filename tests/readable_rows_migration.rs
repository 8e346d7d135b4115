//! Issue 24, a migration and not a break: tables written by the code from before the readable
//! columns keep working. `tests/fixtures/readable-rows/` holds a SQLite file and PostgreSQL rows
//! written by that code (commit 1f69f58; see the fixtures' README): a stored `Ok`, a kept
//! `Err`, an unknown outcome, a plain call without operation or fingerprint, and a claim in
//! flight, all with ttls and leases of decades. The new code opens them (adding the columns),
//! replays every record with the answers the old code stored, finds the readable columns `NULL`
//! on the old rows, and writes them on the rows it changes.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::record::{Outcome, Record};
use idem_runtime::{FencingToken, RecordState};
use idempotency::postgres::PostgresOptions;
use idempotency::sqlite::SqliteOptions;
use idempotency::{
    Call, Error, ErrorPolicy, Fingerprint, OnConflict, Operation, PostgresStore, SqliteStore,
    StorageKey, Store,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Charge {
    order: u64,
    amount_cents: u64,
    status: String,
}

/// The fixtures' error type (its `Idem` variant carries idem's own errors).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Declined {
    Declined { reason: String },
    Idem(String),
}

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined::Idem(e.to_string())
    }
}

const CHARGE: Operation = Operation::named("billing.charge");
const FINGERPRINT: Fingerprint = Fingerprint([7; 32]);

fn fixtures() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/readable-rows"
    ))
}

fn order_key(order: &str) -> StorageKey {
    StorageKey::derive_for(&CHARGE, "acme", order).unwrap()
}

fn plain_key() -> StorageKey {
    StorageKey::derive("plain", "job-7").unwrap()
}

/// Replays every record of the fixtures through `store` and checks the answers the old code
/// stored; no body runs.
async fn replays_every_record(store: Arc<dyn Store>) {
    let ran = Arc::new(AtomicUsize::new(0));
    let body = |ran: &Arc<AtomicUsize>| {
        let ran = ran.clone();
        async move {
            ran.fetch_add(1, SeqCst);
            Ok(Charge {
                order: 0,
                amount_cents: 0,
                status: "ran again".into(),
            })
        }
    };
    let call = |order: &str| {
        Call::for_operation(CHARGE, "acme", order)
            .unwrap()
            .store(store.clone())
            .fingerprint(Some(FINGERPRINT))
    };

    let ok: Result<Charge, Declined> = call("order-42")
        .run(ErrorPolicy::always(), body(&ran))
        .await;
    assert_eq!(
        ok,
        Ok(Charge {
            order: 42,
            amount_cents: 1999,
            status: "captured".into()
        })
    );
    let kept: Result<Charge, Declined> = call("order-43")
        .run(ErrorPolicy::always(), body(&ran))
        .await;
    assert_eq!(
        kept,
        Err(Declined::Declined {
            reason: "insufficient funds".into()
        })
    );
    let unknown: Result<Charge, Error> = call("order-44")
        .run(ErrorPolicy::never(), async {
            ran.fetch_add(1, SeqCst);
            Ok(Charge {
                order: 0,
                amount_cents: 0,
                status: String::new(),
            })
        })
        .await;
    match unknown {
        Err(Error::OutcomeUnknown { reason, .. }) => {
            assert!(reason.contains("exceeds the record size limit"), "{reason}")
        }
        other => panic!("expected the unknown outcome, got {other:?}"),
    }
    let plain: Result<u64, Error> = Call::new(plain_key())
        .store(store.clone())
        .run(ErrorPolicy::never(), async {
            ran.fetch_add(1, SeqCst);
            Ok(0)
        })
        .await;
    assert_eq!(plain.unwrap(), 7);
    let in_flight: Result<Charge, Error> = call("order-45")
        .on_conflict(OnConflict::Reject)
        .run(ErrorPolicy::never(), async {
            ran.fetch_add(1, SeqCst);
            Ok(Charge {
                order: 0,
                amount_cents: 0,
                status: String::new(),
            })
        })
        .await;
    assert!(
        matches!(in_flight, Err(Error::InFlight { .. })),
        "{in_flight:?}"
    );
    assert_eq!(ran.load(SeqCst), 0, "every answer was replayed");
    // The old claim is still its holder's: token 5, with the fingerprint it was made with.
    let got = store.get(&order_key("order-45")).await.unwrap().unwrap();
    assert_eq!(got.fingerprint, Some(FINGERPRINT));
    assert!(
        matches!(got.state, RecordState::InFlight { token } if token.0 == 5),
        "{:?}",
        got.state
    );
}

/// The old claim's holder completes it with the new code: the row gets its readable columns.
async fn complete_the_old_claim(store: &dyn Store) -> StorageKey {
    let key = order_key("order-45");
    let payload = br#"{"order":45,"amount_cents":500,"status":"captured"}"#;
    let record = Record {
        operation: "billing.charge",
        fingerprint: Some(FINGERPRINT),
        ..Record::now(Outcome::Ok, 5, Duration::from_secs(3600), payload)
    }
    .encode();
    store
        .complete(&key, FencingToken(5), &record, Duration::from_secs(3600))
        .await
        .unwrap();
    key
}

#[tokio::test]
async fn a_sqlite_file_of_before_is_read_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.sqlite");
    std::fs::copy(fixtures().join("before.sqlite"), &path).unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().len() <= 32 * 1024,
        "the fixture is small"
    );

    // Without creating, the file of before is refused, naming the readable columns.
    let err = SqliteStore::open_with(&path, &SqliteOptions::new().create_tables(false))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(
        message.contains("(no `operation` and `status` and `result` and `created_at` and `completed_at` and `fingerprint_hex` columns)"),
        "{message}"
    );

    let store = SqliteStore::open_with(&path, &SqliteOptions::new().purge_in_background(false))
        .await
        .unwrap();
    replays_every_record(Arc::new(store.clone())).await;

    // The old rows hold NULL in every readable column; the engine read them through the envelope.
    let raw = rusqlite::Connection::open(&path).unwrap();
    let readable: i64 = raw
        .query_row(
            "SELECT count(*) FROM idem_records WHERE operation IS NULL AND status IS NULL
                AND result IS NULL AND created_at IS NULL AND completed_at IS NULL
                AND fingerprint_hex IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(readable, 5);
    let key = complete_the_old_claim(&store).await;
    let (operation, status, amount, completed_at): (String, String, i64, String) = raw
        .query_row(
            "SELECT operation, status, json_extract(result, '$.amount_cents'), completed_at
             FROM idem_records WHERE key = ?1",
            [key.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (operation.as_str(), status.as_str(), amount),
        ("billing.charge", "completed", 500)
    );
    assert!(
        completed_at.ends_with('Z') && completed_at.len() == 24,
        "{completed_at}"
    );
    // Opening again without creating now works: the columns are there.
    drop(store);
    SqliteStore::open_with(&path, &SqliteOptions::new().create_tables(false))
        .await
        .unwrap();
}

#[tokio::test]
async fn postgres_rows_of_before_are_read_and_replayed() {
    let Some(table) = idem_support::postgres::fresh_table("readable_before").await else {
        return;
    };
    let (schema, name) = table.split_once('.').unwrap();
    let quoted = format!("\"{schema}\".\"{name}\"");
    let sequence = format!("\"{schema}\".\"{name}_token_seq\"");
    let fill = |sql: &str| {
        sql.replace("{table}", &quoted)
            .replace("{sequence}", &sequence)
            .replace("{index}", &format!("\"{name}_expires_idx\""))
    };
    let old_schema =
        std::fs::read_to_string(fixtures().join("postgres_schema_before.sql")).unwrap();
    let rows = std::fs::read_to_string(fixtures().join("postgres_rows.sql")).unwrap();
    assert!(rows.len() <= 8 * 1024, "the fixture is small");
    let admin = idem_support::postgres::admin().await.unwrap();
    admin.batch_execute(&fill(&old_schema)).await.unwrap();
    admin.batch_execute(&fill(&rows)).await.unwrap();
    admin
        .batch_execute(&fill(
            "SELECT setval('{sequence}', (SELECT max(token) FROM {table}))",
        ))
        .await
        .unwrap();

    // Without DDL, the table of before is refused, naming the readable columns and the
    // statement that adds them; nothing is changed.
    let url = idem_support::postgres::url();
    let no_ddl = PostgresOptions::default()
        .table(table.as_str())
        .create_table(false)
        .purge_in_background(false);
    let err = PostgresStore::connect_with(&url, &no_ddl)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(
        message.contains("has no readable columns (`operation`, `status`"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS operation text"
        )),
        "{message}"
    );

    let store = PostgresStore::connect_with(
        &url,
        &PostgresOptions::default()
            .table(table.as_str())
            .purge_in_background(false),
    )
    .await
    .unwrap();
    replays_every_record(Arc::new(store.clone())).await;

    let readable: i64 = admin
        .query_one(
            &fill(
                "SELECT count(*) FROM {table} WHERE operation IS NULL AND status IS NULL
                    AND result IS NULL AND created_at IS NULL AND completed_at IS NULL
                    AND fingerprint_hex IS NULL",
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(readable, 5);
    let key = complete_the_old_claim(&store).await;
    let row = admin
        .query_one(
            &fill(
                "SELECT operation, status, (result->>'amount_cents')::bigint,
                        completed_at IS NOT NULL
                 FROM {table} WHERE key = $1",
            ),
            &[&key.as_str()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "billing.charge");
    assert_eq!(row.get::<_, &str>(1), "completed");
    assert_eq!(row.get::<_, i64>(2), 500);
    assert!(row.get::<_, bool>(3));
    // Now complete, the table is opened without DDL.
    PostgresStore::connect_with(&url, &no_ddl).await.unwrap();
}
