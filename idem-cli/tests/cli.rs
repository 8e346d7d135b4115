//! The `idem` binary against each store: a recorded call shows in `idem get`, `idem forget`
//! makes the next call run its body, a claim whose holder is gone shows in `idem in-flight`,
//! `purge` and `stats` count right; and every way to call it wrong exits as documented.
//!
//! SQLite runs in a temporary directory. PostgreSQL (`IDEM_POSTGRES_URL`, a table of this run's
//! own) and Redis (`IDEM_REDIS_URL`, a key prefix of this test's own) are skipped with a
//! printed reason when unreachable, unless `IDEM_REQUIRE_SERVICES=1`.

use std::any::Any;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use assert_cmd::Command;
use idem_runtime::{
    Call, Claim, Error, ErrorPolicy, FencingToken, Operation, PostgresStore, RedisStore,
    StorageKey, Store,
};
use predicates::prelude::*;
use serde_json::{json, Value};

/// Where the command finds a test's store, and the test's own handle on it.
struct Fixture {
    /// `--store URL` and, for a table or prefix of the test's own, `--table`/`--prefix`.
    args: Vec<String>,
    store: Arc<dyn Store>,
    /// Whatever must live as long as the store (a temporary directory, a prefix to delete).
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    /// `idem` with the store's arguments, then `args`.
    fn idem(&self, args: &[&str]) -> assert_cmd::assert::Assert {
        idem(
            &self
                .args
                .iter()
                .map(String::as_str)
                .chain(args.iter().copied())
                .collect::<Vec<_>>(),
        )
    }

    /// `idem ... --json` that succeeded, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.idem(args).success().get_output().stdout.clone();
        serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)))
    }
}

/// The built `idem` with `args`, run to its end.
fn idem(args: &[&str]) -> assert_cmd::assert::Assert {
    Command::cargo_bin("idem")
        .expect("the idem binary is built")
        .env_remove("IDEM_STORE")
        .args(args)
        .assert()
}

/// A random label, so that tests on a shared server never meet.
fn random() -> String {
    idem_support::unique("cli").as_str()[..16].to_owned()
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("idem.sqlite");
    let url = format!("sqlite://{}", path.display());
    let store = idem_runtime::connect(&url)
        .await
        .expect("open the SQLite store");
    Fixture {
        args: vec!["--store".into(), url],
        store,
        _keep: Box::new(dir),
    }
}

async fn postgres() -> Option<Fixture> {
    let table = idem_support::postgres::fresh_table("cli").await?;
    let url = idem_support::postgres::url();
    let store = PostgresStore::connect_with_table(&url, &table)
        .await
        .expect("connect to PostgreSQL");
    Some(Fixture {
        args: vec!["--store".into(), url, "--table".into(), table],
        store: Arc::new(store),
        _keep: Box::new(()),
    })
}

async fn redis() -> Option<Fixture> {
    idem_support::redis::probe().await?;
    let prefix = format!("cli-{}", random());
    let url = idem_support::redis::url();
    let store = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .expect("connect to Redis");
    Some(Fixture {
        args: vec!["--store".into(), url, "--prefix".into(), prefix.clone()],
        store: Arc::new(store),
        _keep: Box::new(idem_support::redis::DeletePrefix(prefix)),
    })
}

const OPERATION: &str = "cli.charge";

/// The call of the tests: `cli.charge` of `key` in `scope`, counting its body's starts.
async fn charge(store: &Arc<dyn Store>, scope: &str, key: &str, starts: &AtomicU32) -> Value {
    Call::for_operation(Operation::named(OPERATION), scope, key)
        .expect("a valid key")
        .store(store.clone())
        .run(ErrorPolicy::never(), async {
            starts.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(json!({ "order": key, "amount_cents": 1250 }))
        })
        .await
        .expect("the call succeeds")
}

/// Claims `key` with `lease` and never completes: a holder that died.
async fn stuck(store: &dyn Store, key: &StorageKey, lease: Duration) -> FencingToken {
    match store.claim(key, None, lease).await.expect("claim") {
        Claim::Acquired { token, .. } => token,
        other => panic!("a fresh key is claimed, not {other:?}"),
    }
}

/// The storage keys `idem in-flight --json` lists with `args`.
fn in_flight_keys(fixture: &Fixture, args: &[&str]) -> Vec<String> {
    let listed = fixture.json(&[&["in-flight", "--json"], args].concat());
    listed
        .as_array()
        .expect("in-flight --json prints an array")
        .iter()
        .map(|c| c["storage_key"].as_str().expect("a storage key").to_owned())
        .collect()
}

/// The whole life of a record, through the command, on one store.
async fn lifecycle(fixture: Fixture) {
    let store = &fixture.store;
    let backend = store.backend();
    let (scope, key) = ("tenant-1", format!("order-{}", random()));
    let starts = AtomicU32::new(0);
    let first = charge(store, scope, &key, &starts).await;
    assert_eq!(charge(store, scope, &key, &starts).await, first);
    assert_eq!(starts.load(Ordering::SeqCst), 1, "the second call replays");
    let named = ["--scope", scope, "--key", &key, "--name", OPERATION];
    let storage_key = StorageKey::derive_for(&Operation::named(OPERATION), scope, key.as_str())
        .expect("a valid key");

    // `get` shows the record, in a table and as JSON.
    fixture
        .idem(&[&["get"], &named[..]].concat())
        .success()
        .stdout(
            predicate::str::is_match(r"(?m)^state\s+completed$")
                .unwrap()
                .and(predicate::str::contains(storage_key.as_str()))
                .and(predicate::str::is_match(r"(?m)^operation\s+cli\.charge$").unwrap())
                .and(predicate::str::contains("\"amount_cents\": 1250")),
        );
    let got = fixture.json(&[&["get", "--json"], &named[..]].concat());
    assert_eq!(got["state"], "completed", "{got}");
    assert_eq!(got["storage_key"], storage_key.as_str());
    assert_eq!(got["outcome"], "ok");
    assert_eq!(got["operation"], OPERATION);
    assert_eq!(got["value"], first);
    assert!(got["token"].as_u64().is_some(), "{got}");
    assert!(got["ttl_ms"].as_u64().is_some_and(|ms| ms > 0), "{got}");
    assert!(
        humantime::parse_rfc3339(got["expires_at"].as_str().expect("a time")).is_ok(),
        "{got}"
    );
    // The same record by its storage key; none without the operation's name (another key).
    let mut by_storage_key =
        fixture.json(&["get", "--json", "--storage-key", storage_key.as_str()]);
    // Everything but the time left, which moved on between the two commands.
    by_storage_key["expires_in_ms"] = got["expires_in_ms"].clone();
    assert_eq!(by_storage_key, got);
    fixture
        .idem(&["get", "--scope", scope, "--key", &key])
        .code(1)
        .stderr(predicate::str::contains("no record").and(predicate::str::contains("--name")));

    // `forget` removes it: the next call runs the body.
    fixture
        .idem(&[&["forget"], &named[..]].concat())
        .success()
        .stdout(predicate::str::contains("forgot the completed record"));
    fixture.idem(&[&["get"], &named[..]].concat()).code(1);
    fixture
        .idem(&[&["forget"], &named[..]].concat())
        .code(1)
        .stderr(predicate::str::contains("no record"));
    charge(store, scope, &key, &starts).await;
    assert_eq!(starts.load(Ordering::SeqCst), 2, "the body ran again");

    // A claim whose holder is gone shows once it is older than 1 s (and not with a longer bar).
    let dead = StorageKey::derive("ops", format!("stuck-{}", random()).as_str()).unwrap();
    let token = stuck(&**store, &dead, Duration::from_secs(1)).await;
    assert!(!in_flight_keys(&fixture, &["--older-than", "1h"]).contains(&dead.as_str().to_owned()));
    let mut listed = false;
    for _ in 0..100 {
        if in_flight_keys(&fixture, &["--older-than", "1s"]).contains(&dead.as_str().to_owned()) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        listed,
        "the dead claim shows in `idem in-flight --older-than 1s`"
    );
    let claims = fixture.json(&["in-flight", "--json"]);
    let claim = claims
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["storage_key"] == dead.as_str())
        .expect("listed")
        .clone();
    assert_eq!(claim["token"], token.0, "{claim}");
    // Its age where the store keeps the time of the claim; else its lease has ended.
    let old_enough = claim["age_ms"]
        .as_u64()
        .map_or(claim["lease_expired"] == true, |ms| ms >= 1000);
    assert!(old_enough, "{claim}");
    fixture
        .idem(&["in-flight", "--older-than", "1s"])
        .success()
        .stdout(
            predicate::str::is_match(r"(?m)^STORAGE KEY\s+TOKEN\s+LEASE\s+AGE$")
                .unwrap()
                .and(predicate::str::contains(dead.as_str())),
        );

    // `forget` refuses an in-flight record without --force; forced, it fences the holder off.
    fixture
        .idem(&["forget", "--storage-key", dead.as_str()])
        .code(4)
        .stderr(predicate::str::contains("in flight").and(predicate::str::contains("--force")));
    fixture
        .idem(&["forget", "--storage-key", dead.as_str(), "--force"])
        .success()
        .stdout(predicate::str::contains("forgot the in-flight record"));
    let late = store
        .complete(&dead, token, b"late", Duration::from_secs(60))
        .await;
    assert!(matches!(late, Err(Error::LeaseLost { .. })), "{late:?}");
    assert!(!in_flight_keys(&fixture, &[]).contains(&dead.as_str().to_owned()));

    // `stats`: the completed record and a live claim.
    let live = StorageKey::derive("ops", format!("live-{}", random()).as_str()).unwrap();
    stuck(&**store, &live, Duration::from_secs(60)).await;
    let stats = fixture.json(&["stats", "--json"]);
    assert_eq!(stats["backend"], backend, "{stats}");
    assert_eq!(stats["records"], 2, "{stats}");
    assert_eq!(stats["completed"], 1, "{stats}");
    assert_eq!(stats["outcomes"]["ok"], 1, "{stats}");
    assert_eq!(stats["in_flight"], 1, "{stats}");
    assert_eq!(stats["lease_expired"], 0, "{stats}");
    assert!(stats["bytes"].as_u64().is_some_and(|b| b > 0), "{stats}");
    fixture.idem(&["stats"]).success().stdout(
        predicate::str::is_match(r"(?m)^records\s+2$")
            .unwrap()
            .and(predicate::str::is_match(r"(?m)^in flight\s+1$").unwrap()),
    );

    // `purge`: a result past its ttl is removed (Redis expires it itself, and says 0).
    let brief = StorageKey::derive("ops", format!("brief-{}", random()).as_str()).unwrap();
    let token = stuck(&**store, &brief, Duration::from_secs(60)).await;
    let record = idem_testkit::record_bytes(token.0, "7", "u32");
    store
        .complete(&brief, token, &record, Duration::from_secs(1))
        .await
        .expect("complete");
    let mut expired = false;
    for _ in 0..100 {
        if store.get(&brief).await.expect("get").is_none() {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "a result with a ttl of 1 s expires");
    let removed = if backend == "redis" { 0 } else { 1 };
    assert_eq!(
        fixture.json(&["purge", "--json"]),
        json!({ "removed": removed })
    );
    fixture
        .idem(&["purge"])
        .success()
        .stdout(predicate::str::is_match(r"^removed 0 expired records").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lifecycle() {
    lifecycle(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lifecycle() {
    if let Some(fixture) = postgres().await {
        lifecycle(fixture).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lifecycle() {
    if let Some(fixture) = redis().await {
        lifecycle(fixture).await;
    }
}

#[test]
fn an_unknown_scheme_is_a_usage_error() {
    idem(&["--store", "foo://x", "stats"])
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("unknown store URL `foo://x`"));
}

#[test]
fn an_unreachable_server_is_a_usage_error_without_the_password() {
    idem(&["--store", "redis://app:hunter22@127.0.0.1:1", "stats"])
        .code(2)
        .stderr(
            predicate::str::contains("cannot open the store at `redis://***@127.0.0.1:1`")
                .and(predicate::str::contains("hunter22").not()),
        );
    idem(&[
        "--store",
        "postgres://app:hunter22@127.0.0.1:1/db",
        "get",
        "--key",
        "k",
    ])
    .code(2)
    .stderr(
        predicate::str::contains("cannot open the store at `postgres://***@127.0.0.1:1/db`")
            .and(predicate::str::contains("hunter22").not()),
    );
}

#[test]
fn a_missing_sqlite_file_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sqlite");
    let url = format!("sqlite://{}", path.display());
    idem(&["--store", &url, "stats"])
        .code(2)
        .stderr(predicate::str::contains("no SQLite database at"));
    assert!(!path.exists());
}

#[test]
fn bad_usage_exits_2() {
    // Missing --key (clap), a missing store, a storage key that is none, a bad duration, an
    // option for another store, and the memory store, which lives in its own process.
    idem(&["--store", "sqlite:///x", "get"])
        .code(2)
        .stderr(predicate::str::contains("--key"));
    idem(&["get", "--key", "k"])
        .code(2)
        .stderr(predicate::str::contains("--store"));
    idem(&[
        "--store",
        "sqlite:///x",
        "get",
        "--key",
        "k",
        "--storage-key",
        "ab",
    ])
    .code(2)
    .stderr(predicate::str::contains("cannot be used with"));
    idem(&[
        "--store",
        "sqlite:///x",
        "in-flight",
        "--older-than",
        "soon",
    ])
    .code(2)
    .stderr(predicate::str::contains("--older-than"));
    idem(&["--store", "sqlite:///x", "--table", "t", "stats"])
        .code(2)
        .stderr(predicate::str::contains("--table is for PostgreSQL"));
    idem(&["--store", "memory", "stats"])
        .code(2)
        .stderr(predicate::str::contains("memory store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_storage_key_and_an_absent_key() {
    let fixture = sqlite().await;
    fixture
        .idem(&["get", "--storage-key", "not-hex"])
        .code(2)
        .stderr(predicate::str::contains("64 hex digits"));
    fixture
        .idem(&["get", "--key", "nobody"])
        .code(1)
        .stdout("")
        .stderr(predicate::str::contains("no record under storage key"));
    fixture
        .idem(&["forget", "--key", "nobody", "--scope", "http"])
        .code(1);
    // An empty store: nothing in flight, all counts zero.
    fixture
        .idem(&["in-flight"])
        .success()
        .stdout("no claims in flight\n");
    assert_eq!(fixture.json(&["in-flight", "--json"]), json!([]));
    let stats = fixture.json(&["stats", "--json"]);
    assert_eq!(stats["records"], 0, "{stats}");
    assert_eq!(stats["oldest_in_flight_age_ms"], Value::Null, "{stats}");
}

#[test]
fn help_documents_the_exit_codes_and_how_to_name_a_record() {
    idem(&["--help"]).success().stdout(
        predicate::str::contains("Exit codes:").and(predicate::str::contains("4  refused")),
    );
    idem(&["get", "--help"])
        .success()
        .stdout(predicate::str::contains("--storage-key").and(predicate::str::contains("--name")));
}

/// The relations and schemas whose names start with `prefix`, as the catalog lists them.
async fn catalog(
    client: &idem_runtime::store::postgres::tokio_postgres::Client,
    prefix: &str,
) -> Vec<String> {
    let pattern = format!("{prefix}%");
    client
        .query(
            "SELECT 'relation ' || n.nspname || '.' || c.relname FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname LIKE $1
             UNION ALL
             SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname LIKE $1
             ORDER BY 1",
            &[&pattern],
        )
        .await
        .expect("read the catalog")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_the_table_name_creates_nothing() {
    let Some(_) = idem_support::postgres::run_schema().await else {
        return;
    };
    let client = idem_support::postgres::admin()
        .await
        .expect("connect to PostgreSQL");
    let url = idem_support::postgres::url();
    let typo = format!("typo_{}", random().to_lowercase());
    let before = catalog(&client, &typo).await;
    assert_eq!(before, Vec::<String>::new());
    idem(&["--store", &url, "--table", &typo, "stats"])
        .code(2)
        .stdout("")
        .stderr(
            predicate::str::contains(format!("table `{typo}` does not exist"))
                .and(predicate::str::contains("nothing was created")),
        );
    // A schema that does not exist is not created either.
    let qualified = format!("{typo}.idem_records");
    idem(&["--store", &url, "--table", &qualified, "purge"])
        .code(2)
        .stderr(predicate::str::contains(format!(
            "table `{qualified}` does not exist"
        )));
    assert_eq!(
        catalog(&client, &typo).await,
        before,
        "no table, sequence, index or schema"
    );
}

#[test]
fn a_sqlite_file_without_the_tables_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sqlite");
    {
        let app = rusqlite::Connection::open(&path).unwrap();
        app.execute_batch(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY); INSERT INTO orders VALUES (1);",
        )
        .unwrap();
    }
    let files = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let (bytes, listing) = (std::fs::read(&path).unwrap(), files());
    let url = format!("sqlite://{}", path.display());
    for command in ["stats", "purge", "in-flight"] {
        idem(&["--store", &url, command]).code(2).stdout("").stderr(
            predicate::str::contains("has no idem table `idem_records`")
                .and(predicate::str::contains(path.display().to_string())),
        );
    }
    assert_eq!(files(), listing, "no file made beside it");
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the file is unchanged, byte for byte"
    );
    let app = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = app
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tables, ["orders"]);
}
