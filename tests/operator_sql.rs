//! The README's "Reading records with SQL" runs as written: a PostgreSQL table and a SQLite file
//! are filled through `#[idempotent]` (a stored `Ok`, a kept `Err`, an unknown outcome, a claim
//! in flight) and through the HTTP layer (a kept 201, a 500 as an unknown outcome, a request in
//! flight), each `sql` block of that section is taken from the README (so README and test
//! cannot drift) and run with plain SQL on the store's table, and the rows it returns are
//! checked; every readable column is also read with plain SQL.
//!
//! PostgreSQL (`IDEM_POSTGRES_URL`, a table of this test's own) is skipped with a printed reason
//! when unreachable, unless `IDEM_REQUIRE_SERVICES=1`.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "http"))]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::routing::post as post_route;
use axum::{Json, Router};
use http::{Request, StatusCode};
use idempotency::http::IdempotencyLayer;
use idempotency::postgres::tokio_postgres::SimpleQueryMessage;
use idempotency::{idempotent, Error, PostgresStore, SqliteStore, StorageKey, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower::ServiceExt;

const HEADING: &str = "### Reading records with SQL";

/// The `sql` blocks of the README section, by their first line (`-- PostgreSQL: ...`).
fn readme_blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let start = readme
        .find(&format!("\n{HEADING}\n"))
        .unwrap_or_else(|| panic!("README has the section `{HEADING}`"));
    let section = &readme[start + HEADING.len() + 2..];
    let end = [section.find("\n## "), section.find("\n### ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(section.len());
    section[..end]
        .split("```sql\n")
        .skip(1)
        .map(|block| {
            let block = &block[..block.find("```").expect("a closed block")];
            let title = block.lines().next().unwrap().to_owned();
            (title, block.to_owned())
        })
        .collect()
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Receipt {
    order: u64,
    amount_cents: u64,
    note: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum PayError {
    Declined { reason: String },
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

/// What the body does.
#[derive(Clone, Copy)]
enum How {
    Pay,
    Decline,
    /// Returns a receipt larger than `max_record_bytes`: not kept, an unknown outcome.
    TooLarge,
    /// Never ends: the claim stays in flight.
    Hang,
}

#[idempotent(name = "billing.charge", key = order, scope = tenant, store = store.clone(),
             cache_errors = true, max_record_bytes = 512, skip(store, how))]
async fn charge(
    store: &Arc<dyn Store>,
    tenant: &str,
    order: u64,
    how: How,
) -> Result<Receipt, PayError> {
    match how {
        How::Pay => Ok(Receipt {
            order,
            amount_cents: 1999,
            note: "captured".into(),
        }),
        How::Decline => Err(PayError::Declined {
            reason: "insufficient funds".into(),
        }),
        How::TooLarge => Ok(Receipt {
            order,
            amount_cents: 1,
            note: "x".repeat(1000),
        }),
        How::Hang => std::future::pending().await,
    }
}

fn storage_key(order: u64) -> String {
    StorageKey::derive_named("billing.charge", "acme", &order)
        .unwrap()
        .as_str()
        .to_owned()
}

/// Fills the store: order 42 paid, 43 declined (kept), 44 an unknown outcome, 45 in flight
/// (its task is returned, to be aborted at the end).
async fn fill(store: &Arc<dyn Store>) -> tokio::task::JoinHandle<()> {
    assert_eq!(charge(store, "acme", 42, How::Pay).await.unwrap().order, 42);
    assert_eq!(
        charge(store, "acme", 43, How::Decline).await,
        Err(PayError::Declined {
            reason: "insufficient funds".into()
        })
    );
    let unknown = charge(store, "acme", 44, How::TooLarge).await;
    assert!(matches!(unknown, Err(PayError::Idem(_))), "{unknown:?}");
    let hanging = {
        let store = store.clone();
        tokio::spawn(async move {
            let _ = charge(&store, "acme", 45, How::Hang).await;
        })
    };
    // Until the claim is there.
    let key = StorageKey::from_hex(&storage_key(45)).unwrap();
    for _ in 0..200 {
        if store.get(&key).await.unwrap().is_some() {
            return hanging;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the hanging call claimed its key");
}

/// Sends a POST through `IdempotencyLayer` on `store`: alice's request to `path` under the
/// idempotency key `key`.
async fn post(store: &Arc<dyn Store>, path: &str, key: &str) -> StatusCode {
    let layer = IdempotencyLayer::per_client(store.clone(), |req| {
        Some(req.headers.get("x-principal")?.to_str().ok()?.to_owned())
    });
    let app = Router::new()
        .route(
            "/pay",
            post_route(|| async { (StatusCode::CREATED, Json(json!({"id": "pay_1"}))) }),
        )
        .route(
            "/boom",
            post_route(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route("/hang", post_route(std::future::pending::<StatusCode>))
        .layer(layer);
    let request = Request::post(path)
        .header("idempotency-key", key)
        .header("x-principal", "alice")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    app.oneshot(request).await.unwrap().status()
}

/// Fills the store through the HTTP layer: a 201 kept, a 500 (an unknown outcome), a request
/// in flight (its task is returned, to be aborted at the end).
async fn fill_http(store: &Arc<dyn Store>) -> tokio::task::JoinHandle<()> {
    assert_eq!(post(store, "/pay", "http-1").await, StatusCode::CREATED);
    assert_eq!(
        post(store, "/boom", "http-2").await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let hanging = {
        let store = store.clone();
        tokio::spawn(async move {
            post(&store, "/hang", "http-3").await;
        })
    };
    // Until it is in flight, beside the attribute's claim.
    for _ in 0..200 {
        let page = store.scan(None, 100).await.unwrap();
        if page.records.iter().filter(|r| r.in_flight()).count() == 2 {
            return hanging;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the hanging request claimed its key");
}

/// Rows as text (`None` for NULL).
type Rows = Vec<Vec<Option<String>>>;

/// The `sql` block of the README section whose first line starts with `prefix`.
fn titled(prefix: &str) -> String {
    readme_blocks()
        .into_iter()
        .find(|(t, _)| t.starts_with(prefix))
        .unwrap_or_else(|| panic!("the README has a block `{prefix}...`"))
        .1
}

/// The checks common to both stores, on the rows of each README block.
fn checks(run: impl Fn(&str) -> Rows, backend: &str) {
    // A key's answer: status, result, created_at, completed_at, expires_at.
    let rows = run(&titled(&format!("-- {backend}: a key's answer")));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0].as_deref(), Some("completed"));
    let result: serde_json::Value =
        serde_json::from_str(rows[0][1].as_deref().expect("a result")).unwrap();
    assert_eq!(
        result,
        serde_json::json!({"order": 42, "amount_cents": 1999, "note": "captured"})
    );
    assert!(rows[0][2..].iter().all(Option::is_some), "{rows:?}");

    // Stuck claims: the claim of order 45, made "10 minutes ago".
    let rows = run(&titled(&format!("-- {backend}: stuck claims")));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0].as_deref(), Some(storage_key(45).as_str()));
    // Its fingerprint (the attribute's, of the arguments) in hex, the last column.
    let fingerprint = rows[0].last().unwrap().as_deref().expect("a fingerprint");
    assert!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fingerprint}"
    );

    // Unknown outcomes of the last hour: order 44, and the HTTP request answered 500.
    let rows = run(&titled(&format!("-- {backend}: unknown outcomes")));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r[0].as_deref() == Some(storage_key(44).as_str())),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| r[1].is_some() && r[2].is_some()),
        "{rows:?}"
    );

    // The HTTP layer's kept response, by status and body.
    let rows = run(&titled(&format!("-- {backend}: HTTP responses")));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][1].as_deref(), Some("201"), "{rows:?}");
    let body: serde_json::Value =
        serde_json::from_str(rows[0][2].as_deref().expect("a body")).unwrap();
    assert_eq!(body, json!({"id": "pay_1"}));

    // Counts per operation and status.
    let rows = run(&titled(&format!("-- {backend}: counts")));
    let counts: BTreeSet<(Option<String>, Option<String>, Option<String>)> = rows
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect();
    let one = || Some("1".to_owned());
    let op = || Some("billing.charge".to_owned());
    assert_eq!(
        counts,
        BTreeSet::from([
            (op(), Some("completed".into()), one()),
            (op(), Some("failed".into()), one()),
            // The HTTP layer's 201: no operation name.
            (None, Some("completed".into()), one()),
            // The attribute's unknown outcome names its operation; the layer's has none.
            (op(), Some("unknown".into()), one()),
            (None, Some("unknown".into()), one()),
            (None, Some("processing".into()), Some("2".into())),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_queries_run_on_postgres() {
    let Some(table) = idem_support::postgres::fresh_table("operator_sql").await else {
        return;
    };
    let url = idem_support::postgres::url();
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_table(&url, &table)
            .await
            .unwrap(),
    );
    let hanging = fill(&store).await;
    let hanging_http = fill_http(&store).await;
    let (schema, name) = table.split_once('.').unwrap();
    let quoted = format!("\"{schema}\".\"{name}\"");
    let client = idem_support::postgres::admin().await.unwrap();
    // The claim of order 45 is "10 minutes old".
    client
        .execute(
            &format!(
                "UPDATE {quoted} SET created_at = created_at - interval '10 minutes' WHERE key = $1"
            ),
            &[&storage_key(45)],
        )
        .await
        .unwrap();

    let rows = |sql: &str| -> Rows {
        let sql = sql.replace("idem_records", &quoted);
        let messages = futures::executor::block_on(client.simple_query(&sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    };
    tokio::task::block_in_place(|| checks(rows, "PostgreSQL"));

    // Every documented column, with plain SQL and its type.
    let row = client
        .query_one(
            &format!(
                "SELECT operation, status, result, created_at, completed_at, expires_at,
                        fingerprint_hex
                 FROM {quoted} WHERE key = $1"
            ),
            &[&storage_key(43)],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), Some("billing.charge"));
    assert_eq!(row.get::<_, &str>(1), "failed");
    let result: serde_json::Value = serde_json::from_str(
        &client
            .query_one(
                &format!("SELECT result::text FROM {quoted} WHERE key = $1"),
                &[&storage_key(43)],
            )
            .await
            .unwrap()
            .get::<_, String>(0),
    )
    .unwrap();
    assert_eq!(
        result,
        serde_json::json!({"Declined": {"reason": "insufficient funds"}})
    );
    let created: std::time::SystemTime = row.get(3);
    let completed: std::time::SystemTime = row.get(4);
    let expires: std::time::SystemTime = row.get(5);
    assert!(created <= completed && completed < expires);
    // The attribute fingerprints the arguments: 64 hex digits.
    let fingerprint: &str = row.get(6);
    assert!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fingerprint}"
    );
    hanging.abort();
    hanging_http.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_queries_run_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.sqlite");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let hanging = fill(&store).await;
    let hanging_http = fill_http(&store).await;
    let raw = rusqlite::Connection::open(&path).unwrap();
    // The claim of order 45 is "10 minutes old".
    raw.execute(
        "UPDATE idem_records
         SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '-10 minutes')
         WHERE key = ?1",
        [storage_key(45)],
    )
    .unwrap();

    let rows = |sql: &str| -> Rows {
        let mut stmt = raw.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                        rusqlite::types::Value::Null => None,
                        rusqlite::types::Value::Integer(i) => Some(i.to_string()),
                        rusqlite::types::Value::Real(f) => Some(f.to_string()),
                        rusqlite::types::Value::Text(t) => Some(t),
                        rusqlite::types::Value::Blob(b) => Some(format!("{b:?}")),
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<rusqlite::Result<Rows>>()
        .unwrap()
    };
    checks(rows, "SQLite");

    // Every documented column, with plain SQL.
    let (operation, status, declined, created, completed, expires, fingerprint): (
        String,
        String,
        String,
        String,
        String,
        i64,
        String,
    ) = raw
        .query_row(
            "SELECT operation, status, json_extract(result, '$.Declined.reason'), created_at,
                    completed_at, expires_at, fingerprint_hex
             FROM idem_records WHERE key = ?1",
            [storage_key(43)],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        (operation.as_str(), status.as_str(), declined.as_str()),
        ("billing.charge", "failed", "insufficient funds")
    );
    // ISO-8601 UTC text, sortable as text.
    assert!(created.len() == 24 && created.ends_with('Z'), "{created}");
    assert!(created <= completed, "{created} {completed}");
    assert!(expires > 0);
    assert!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fingerprint}"
    );
    hanging.abort();
    hanging_http.abort();
}
