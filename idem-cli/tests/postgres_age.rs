//! `idem in-flight --older-than` lists a stuck PostgreSQL claim by its real age: the table keeps
//! the claim time (`created_at`, issue 24), so a claim whose lease has not ended yet, and which
//! the listing could otherwise only age by its lease, is listed once it is old enough, with its
//! age, and not before.
//!
//! PostgreSQL (`IDEM_POSTGRES_URL`, a table of this test's own) is skipped with a printed reason
//! when unreachable, unless `IDEM_REQUIRE_SERVICES=1`.

use std::time::Duration;

use assert_cmd::Command;
use idem_runtime::{Claim, PostgresStore, StorageKey, Store};
use serde_json::Value;

/// `idem in-flight --json` on the table, with `args`.
fn in_flight(url: &str, table: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::cargo_bin("idem")
        .expect("the idem binary is built")
        .env_remove("IDEM_STORE")
        .args(["--store", url, "--table", table, "in-flight", "--json"])
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice::<Value>(&out)
        .expect("in-flight --json prints JSON")
        .as_array()
        .expect("an array")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_postgres_claim_is_listed_by_its_age() {
    let Some(table) = idem_support::postgres::fresh_table("cli_age").await else {
        return;
    };
    let url = idem_support::postgres::url();
    let store = PostgresStore::connect_with_table(&url, &table)
        .await
        .expect("connect to PostgreSQL");
    let key = StorageKey::derive("ops", "stuck-with-a-long-lease").unwrap();
    // A lease far longer than the test: only the claim time can make it old enough.
    let Claim::Acquired { token, .. } = store
        .claim(&key, None, Duration::from_secs(600))
        .await
        .unwrap()
    else {
        panic!("a fresh key is acquired");
    };
    let listed = |args: &[&str]| -> Vec<Value> {
        in_flight(&url, &table, args)
            .into_iter()
            .filter(|c| c["storage_key"] == key.as_str())
            .collect()
    };
    assert!(listed(&["--older-than", "2s"]).is_empty(), "not old yet");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let claims = listed(&["--older-than", "2s"]);
    assert_eq!(claims.len(), 1, "listed once 2 s old: {claims:?}");
    let claim = &claims[0];
    assert_eq!(claim["token"], token.0, "{claim}");
    let age = claim["age_ms"].as_u64().expect("the age is known");
    assert!((2000..60_000).contains(&age), "{claim}");
    assert_ne!(claim["lease_expired"], true, "{claim}");
    assert!(listed(&["--older-than", "1h"]).is_empty());
}
