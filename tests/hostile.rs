//! Hostile and broken input, against every store (memory and SQLite always; Redis and PostgreSQL
//! when reachable, required under `IDEM_REQUIRE_SERVICES=1`):
//!
//! - hostile keys through `#[idempotent]` and `Call`: NUL bytes, bytes that are not UTF-8, keys
//!   that look like SQL, Redis commands, glob patterns, hash tags or Lua; 255-byte keys work,
//!   256-byte and 10 KB keys are `Error::InvalidKey` and store nothing; every key stays distinct,
//!   and no raw key reaches the backend (only 64 hex digits);
//! - records corrupted or truncated in each store's own storage (SQL `UPDATE` of the record
//!   column, Redis `HSET` of the record field, claim + complete with garbage in memory):
//!   `Error::Corrupt`, the body does not run, and the bad record is left as it is;
//! - two operations sharing a scope and a key: separate records (each runs its own body); a
//!   record whose payload does not decode as the caller's type: `Error::TypeMismatch`;
//! - results over `Call::max_record_bytes`: `Error::TooLarge` with both sizes in the message,
//!   nothing stored, a retry runs again. (`#[idempotent]` has no argument for the limit; through the
//!   attribute, the default of 8 MiB applies and is tested here too.)
//! - a proptest of the replay path: arbitrary and mutated record bytes planted in a store give
//!   `Ok`, `Error::Corrupt` or `Error::TypeMismatch`, never a panic and never a run of the body.
//!
//! ```text
//! cargo test --all-features --test hostile -- --nocapture
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::record::{Outcome, Record};
use idempotency::store::{Claim, RecordState, StoredRecord};
use idempotency::{
    idempotent, Call, Error, ErrorPolicy, Fingerprint, MemoryStore, OnUnknown, StorageKey, Store,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::{Deserialize, Serialize};

const LONG: Duration = Duration::from_secs(60);

/// The error type of the test functions.
#[derive(Debug)]
enum AppError {
    Idem(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    fn idem(self) -> Error {
        match self {
            AppError::Idem(e) => e,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One fresh store of each backend, with raw access to its storage.

enum Raw {
    Memory(MemoryStore),
    #[cfg(feature = "sqlite")]
    Sqlite {
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    },
    #[cfg(feature = "redis")]
    Redis(idempotency::RedisStore),
    #[cfg(feature = "postgres")]
    Postgres {
        client: idempotency::postgres::tokio_postgres::Client,
        /// The table, quoted.
        table: String,
    },
}

struct Fixture {
    name: &'static str,
    store: Arc<dyn Store>,
    raw: Raw,
}

#[cfg(feature = "sqlite")]
fn sqlite_conn(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

impl Fixture {
    /// How many records the backend holds (for Redis: record hashes, not fences).
    async fn count(&self) -> usize {
        match &self.raw {
            Raw::Memory(m) => m.len(),
            #[cfg(feature = "sqlite")]
            Raw::Sqlite { path, .. } => sqlite_conn(path)
                .query_row("SELECT count(*) FROM idem_records", [], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap() as usize,
            #[cfg(feature = "redis")]
            Raw::Redis(store) => self
                .redis_keys(store)
                .await
                .iter()
                .filter(|k| !k.ends_with(":fence"))
                .count(),
            #[cfg(feature = "postgres")]
            Raw::Postgres { client, table } => {
                let n: i64 = client
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await
                    .unwrap()
                    .get(0);
                n as usize
            }
        }
    }

    #[cfg(feature = "redis")]
    async fn redis_keys(&self, store: &idempotency::RedisStore) -> Vec<String> {
        let mut con = store.connection();
        idempotency::redis::redis::cmd("KEYS")
            .arg(format!("{}:*", store.prefix()))
            .query_async(&mut con)
            .await
            .unwrap()
    }

    /// The backend's own names for the records: 64 hex digits each (never the user's key).
    async fn stored_names(&self) -> Vec<String> {
        match &self.raw {
            Raw::Memory(_) => Vec::new(),
            #[cfg(feature = "sqlite")]
            Raw::Sqlite { path, .. } => {
                let conn = sqlite_conn(path);
                let mut stmt = conn.prepare("SELECT key FROM idem_records").unwrap();
                let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
                rows.map(Result::unwrap).collect()
            }
            #[cfg(feature = "redis")]
            Raw::Redis(store) => {
                let prefix = format!("{}:{{", store.prefix());
                self.redis_keys(store)
                    .await
                    .into_iter()
                    .map(|k| {
                        let rest = k.strip_prefix(&prefix).unwrap_or_else(|| panic!("{k}"));
                        let rest = rest.strip_suffix(":fence").unwrap_or(rest);
                        rest.strip_suffix('}')
                            .unwrap_or_else(|| panic!("{k}"))
                            .to_owned()
                    })
                    .collect()
            }
            #[cfg(feature = "postgres")]
            Raw::Postgres { client, table } => client
                .query(&format!("SELECT key FROM {table}"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect(),
        }
    }

    /// Puts `bytes` as the completed record of `key` in the backend's storage. Memory: claim and
    /// complete with those bytes (the key must be free). Others: overwrite the record column or
    /// field of the completed record already there.
    async fn plant(&self, key: &StorageKey, bytes: &[u8]) {
        match &self.raw {
            Raw::Memory(m) => {
                let Claim::Acquired { token, .. } = m.claim(key, None, LONG).await.unwrap() else {
                    panic!("the key is not free")
                };
                m.complete(key, token, bytes, LONG).await.unwrap();
            }
            #[cfg(feature = "sqlite")]
            Raw::Sqlite { path, .. } => {
                let n = sqlite_conn(path)
                    .execute(
                        "UPDATE idem_records SET record = ?1 WHERE key = ?2 AND state = 1",
                        rusqlite::params![bytes, key.as_str()],
                    )
                    .unwrap();
                assert_eq!(n, 1, "a completed row to overwrite");
            }
            #[cfg(feature = "redis")]
            Raw::Redis(store) => {
                let mut con = store.connection();
                let _: () = idempotency::redis::redis::cmd("HSET")
                    .arg(store.record_key(key))
                    .arg("record")
                    .arg(bytes)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            #[cfg(feature = "postgres")]
            Raw::Postgres { client, table } => {
                let n = client
                    .execute(
                        &format!(
                            "UPDATE {table} SET record = $1 WHERE key = $2 AND state = 'completed'"
                        ),
                        &[&bytes, &key.as_str()],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1, "a completed row to overwrite");
            }
        }
    }

    /// Removes the record bytes of a completed record, where the backend's schema allows it
    /// (SQL `NULL`, Redis `HDEL`). Returns whether it did.
    async fn drop_record_bytes(&self, key: &StorageKey) -> bool {
        let _ = key; // Unused with the memory store alone.
        match &self.raw {
            Raw::Memory(_) => false,
            #[cfg(feature = "sqlite")]
            Raw::Sqlite { path, .. } => {
                sqlite_conn(path)
                    .execute(
                        "UPDATE idem_records SET record = NULL WHERE key = ?1",
                        [key.as_str()],
                    )
                    .unwrap();
                true
            }
            #[cfg(feature = "redis")]
            Raw::Redis(store) => {
                let mut con = store.connection();
                let _: () = idempotency::redis::redis::cmd("HDEL")
                    .arg(store.record_key(key))
                    .arg("record")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                true
            }
            #[cfg(feature = "postgres")]
            Raw::Postgres { client, table } => {
                client
                    .execute(
                        &format!("UPDATE {table} SET record = NULL WHERE key = $1"),
                        &[&key.as_str()],
                    )
                    .await
                    .unwrap();
                true
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        #[cfg(feature = "redis")]
        if let Raw::Redis(store) = &self.raw {
            idem_support::delete_redis_prefix(store.prefix());
        }
    }
}

/// Memory and SQLite always; Redis and PostgreSQL when reachable (else skipped, or a failure
/// under `IDEM_REQUIRE_SERVICES=1`).
async fn fixtures() -> Vec<Fixture> {
    let memory = MemoryStore::new();
    #[allow(unused_mut)]
    let mut all = vec![Fixture {
        name: "memory",
        store: Arc::new(memory.clone()),
        raw: Raw::Memory(memory),
    }];
    #[cfg(feature = "sqlite")]
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.sqlite");
        let store = idempotency::SqliteStore::open(&path).await.unwrap();
        all.push(Fixture {
            name: "sqlite",
            store: Arc::new(store),
            raw: Raw::Sqlite { path, _dir: dir },
        });
    }
    #[cfg(feature = "redis")]
    if let Some(store) = redis_store().await {
        all.push(Fixture {
            name: "redis",
            store: Arc::new(store.clone()),
            raw: Raw::Redis(store),
        });
    }
    #[cfg(feature = "postgres")]
    if let Some((store, client, table)) = postgres_store().await {
        all.push(Fixture {
            name: "postgres",
            store: Arc::new(store),
            raw: Raw::Postgres { client, table },
        });
    }
    all
}

#[cfg(feature = "redis")]
async fn redis_store() -> Option<idempotency::RedisStore> {
    idem_support::redis::store("idem-hostile").await
}

#[cfg(feature = "postgres")]
async fn postgres_store() -> Option<(
    idempotency::PostgresStore,
    idempotency::postgres::tokio_postgres::Client,
    String,
)> {
    let schema = idem_support::postgres::run_schema().await?;
    let client = idem_support::postgres::admin().await.unwrap();
    let name = format!("hostile_{:016x}", rand::random::<u64>());
    let url = idem_support::postgres::url();
    let store = idempotency::PostgresStore::connect_with_table(&url, &format!("{schema}.{name}"))
        .await
        .unwrap();
    Some((store, client, format!("\"{schema}\".\"{name}\"")))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------------------------
// Hostile keys.

/// A result that shows whether it was replayed (same nonce) or recomputed, and for which key.
#[idempotent(name = "hostile.keyed", key = key, scope = "hostile", store = store.clone(), skip(store, runs))]
async fn keyed(
    store: Arc<dyn Store>,
    runs: Arc<AtomicUsize>,
    key: Vec<u8>,
) -> Result<(Vec<u8>, u64), AppError> {
    runs.fetch_add(1, SeqCst);
    Ok((key, rand::random()))
}

/// Keys that must each work and stay distinct.
fn hostile_keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = [
        "\0",
        "\0\0",
        "a\0b",
        "a\0\0b",
        "ab",
        "a b",
        "\0hostile\0",
        "'; DROP TABLE idem_records; --",
        "' OR '1'='1",
        "\"; DELETE FROM idem_records WHERE \"\"=\"",
        "$1",
        "%s%n%x",
        "*",
        "?",
        "[a-z]*",
        "{x}",
        "}{",
        "{",
        "idem:{0000000000000000000000000000000000000000000000000000000000000000}",
        "\r\nFLUSHALL\r\n",
        "*1\r\n$8\r\nFLUSHALL\r\n",
        "redis.call('FLUSHALL')",
        "]] .. redis.call('DEL', KEYS[1]) .. [[",
        "'); os.exit(1); --",
        "\\x00\\xff",
        "🔑",
        "key\u{202e}lanigiro",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    keys.extend([
        vec![0xff],
        vec![0xfe, 0xff],
        vec![0xc0, 0x80],       // an overlong NUL
        vec![0xed, 0xa0, 0x80], // a UTF-16 surrogate
        vec![0x80; 255],
        vec![0; 255],
        b"x".repeat(255),
        "€".repeat(85).into_bytes(), // 255 bytes
    ]);
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_work_and_stay_distinct_in_every_store() {
    let keys = hostile_keys();
    let mut checked = 0;
    for f in fixtures().await {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut firsts = Vec::new();
        for key in &keys {
            let first = keyed(f.store.clone(), runs.clone(), key.clone())
                .await
                .unwrap_or_else(|e| panic!("{}: key {key:?}: {e:?}", f.name));
            assert_eq!(&first.0, key, "{}", f.name);
            firsts.push(first);
        }
        assert_eq!(runs.load(SeqCst), keys.len(), "{}: one run per key", f.name);
        // Every key replays its own result: no two keys share a record.
        for (key, first) in keys.iter().zip(&firsts) {
            let again = keyed(f.store.clone(), runs.clone(), key.clone())
                .await
                .unwrap();
            assert_eq!(
                &again, first,
                "{}: key {key:?} replays its own result",
                f.name
            );
        }
        assert_eq!(runs.load(SeqCst), keys.len(), "{}: replays only", f.name);
        let nonces: std::collections::HashSet<u64> = firsts.iter().map(|f| f.1).collect();
        assert_eq!(nonces.len(), keys.len(), "{}: distinct results", f.name);

        // The same keys through `Call` (no fingerprint), in another scope: again all distinct.
        for (i, key) in keys.iter().enumerate() {
            let k = StorageKey::derive("hostile-call", key).unwrap();
            let out: Result<usize, Error> = Call::new(k.clone())
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async { Ok(i) })
                .await;
            assert_eq!(out.unwrap(), i);
            let replay: Result<usize, Error> = Call::new(k)
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async {
                    unreachable!("replayed, not run")
                })
                .await;
            assert_eq!(replay.unwrap(), i, "{}: key {key:?}", f.name);
        }
        // The backend only ever saw 64 hex digits per record, never the keys themselves.
        let names = f.stored_names().await;
        assert!(names.iter().all(|n| is_hex64(n)), "{}: {names:?}", f.name);
        if !matches!(f.raw, Raw::Memory(_)) {
            let distinct: std::collections::HashSet<_> = names.iter().collect();
            assert_eq!(
                distinct.len(),
                2 * keys.len(),
                "{}: one record per key",
                f.name
            );
        }
        assert!(f.count().await >= 2 * keys.len(), "{}", f.name);
        checked += 1;
    }
    eprintln!(
        "hostile keys: {} keys x 2 paths (#[idempotent], Call) x {checked} stores, all distinct",
        keys.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_keys_are_invalid_and_store_nothing() {
    for f in fixtures().await {
        let before = f.count().await;
        let runs = Arc::new(AtomicUsize::new(0));
        for (label, key) in [
            ("256 bytes", b"k".repeat(256)),
            ("10 KB", b"k".repeat(10 * 1024)),
            ("10 KB of NUL", vec![0; 10 * 1024]),
            ("256 bytes of emoji", "🔑".repeat(64).into_bytes()),
            ("empty", Vec::new()),
        ] {
            let err = keyed(f.store.clone(), runs.clone(), key.clone())
                .await
                .unwrap_err()
                .idem();
            let Error::InvalidKey { reason } = &err else {
                panic!("{}: {label}: {err:?}", f.name)
            };
            if !key.is_empty() {
                assert!(
                    reason.contains(&key.len().to_string()) && reason.contains("255"),
                    "{}: {label}: {reason}",
                    f.name
                );
            }
            // The plain builder cannot even be given such a key (above); the macro's form
            // carries the error into the call, which runs nothing.
            let call = idem_runtime::__private::keyed(
                idempotency::Operation::named("hostile.call"),
                "hostile-call",
                &key,
                Ok(None),
            );
            let out: Result<u8, Error> = call
                .store(f.store.clone())
                .run(ErrorPolicy::never(), async {
                    unreachable!("an invalid key runs nothing")
                })
                .await;
            assert!(
                matches!(out, Err(Error::InvalidKey { .. })),
                "{}: {label}",
                f.name
            );
        }
        assert_eq!(runs.load(SeqCst), 0, "{}: nothing ran", f.name);
        assert_eq!(f.count().await, before, "{}: nothing stored", f.name);
        // The longest key is accepted.
        keyed(f.store.clone(), runs.clone(), vec![b'k'; 255])
            .await
            .unwrap();
        assert_eq!(runs.load(SeqCst), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Corrupt and truncated records in each store's own storage.

fn record(payload: &[u8], type_name: &str) -> Vec<u8> {
    Record {
        outcome: Outcome::Ok,
        fingerprint: Some(Fingerprint([7; 32])),
        token: 42,
        completed_at_ms: 1_700_000_000_000,
        ttl_ms: 60_000,
        type_name,
        operation: "",
        result_version: 0,
        payload,
    }
    .encode()
}

/// Replaces the CRC at the end with the right one for the rest.
fn fix_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 4;
    let crc = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// CRC-32 (IEEE), bitwise: the test does not depend on the crate the library uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Offsets in a v2 record (see `idempotency::record`).
const VERSION_AT: usize = 4;
const OUTCOME_AT: usize = 5;
const FLAGS_AT: usize = 6;
const FP_AT: usize = 7;
const TOKEN_AT: usize = 39;
const COMPLETED_AT: usize = 47;
const TTL_AT: usize = 55;
const NAME_LEN_AT: usize = 63;
const NAME_AT: usize = 65;

/// Broken versions of the valid record `good` (of a `u64` result): each must be `Corrupt`.
fn corrupt_variants(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let n = good.len();
    let name_len = u16::from_be_bytes([good[NAME_LEN_AT], good[NAME_LEN_AT + 1]]) as usize;
    let op_len_at = NAME_AT + name_len;
    let op_len = u16::from_be_bytes([good[op_len_at], good[op_len_at + 1]]) as usize;
    let payload_len_at = op_len_at + 2 + op_len + 4;
    let payload_at = payload_len_at + 4;
    let mut v: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("text".into(), b"garbage".to_vec()),
        ("JSON of the value alone".into(), b"7".to_vec()),
        ("zeros".into(), vec![0; n]),
        ("0xff".into(), vec![0xff; n]),
        ("doubled".into(), [good, good].concat()),
        ("trailing byte".into(), [good, b"\0"].concat()),
        (
            "trailing byte, checksum fixed".into(),
            fix_crc([&good[..n - 4], b"\0", &good[n - 4..]].concat()),
        ),
    ];
    for cut in [
        1,
        4,
        5,
        6,
        7,
        TOKEN_AT,
        NAME_AT,
        payload_at,
        n / 2,
        n - 4,
        n - 1,
    ] {
        v.push((format!("truncated to {cut} bytes"), good[..cut].to_vec()));
    }
    for (field, at) in [
        ("magic", 0),
        ("version", VERSION_AT),
        ("outcome", OUTCOME_AT),
        ("flags", FLAGS_AT),
        ("fingerprint", FP_AT + 31),
        ("token", TOKEN_AT + 7),
        ("completed at", COMPLETED_AT),
        ("ttl", TTL_AT + 3),
        ("type name length", NAME_LEN_AT + 1),
        ("type name", NAME_AT),
        ("operation length", op_len_at + 1),
        ("payload length", payload_len_at + 3),
        ("payload", payload_at),
        ("checksum", n - 1),
    ] {
        let mut b = good.to_vec();
        b[at] ^= 0x10;
        v.push((format!("bit flipped in the {field}"), b));
    }
    let with = |at: usize, bytes: &[u8]| {
        let mut b = good.to_vec();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        fix_crc(b)
    };
    let name_len = name_len as u16;
    let payload_len = u32::from_be_bytes(good[payload_len_at..payload_at].try_into().unwrap());
    v.extend([
        ("version 3, checksum fixed".into(), with(VERSION_AT, &[3])),
        ("version 1, checksum fixed".into(), with(VERSION_AT, &[1])),
        ("version 0, checksum fixed".into(), with(VERSION_AT, &[0])),
        ("outcome 7, checksum fixed".into(), with(OUTCOME_AT, &[7])),
        ("flags 0x80, checksum fixed".into(), with(FLAGS_AT, &[0x80])),
        (
            "type name length + 1, checksum fixed".into(),
            with(NAME_LEN_AT, &(name_len + 1).to_be_bytes()),
        ),
        (
            "type name length - 1, checksum fixed".into(),
            with(NAME_LEN_AT, &(name_len - 1).to_be_bytes()),
        ),
        (
            "type name length 65535, checksum fixed".into(),
            with(NAME_LEN_AT, &u16::MAX.to_be_bytes()),
        ),
        (
            "payload length + 1, checksum fixed".into(),
            with(payload_len_at, &(payload_len + 1).to_be_bytes()),
        ),
        (
            "payload length - 1, checksum fixed".into(),
            with(payload_len_at, &(payload_len - 1).to_be_bytes()),
        ),
        (
            "payload length u32::MAX, checksum fixed".into(),
            with(payload_len_at, &u32::MAX.to_be_bytes()),
        ),
        (
            "type name not UTF-8, checksum fixed".into(),
            with(NAME_AT, &[0xff]),
        ),
        // Well-formed envelopes whose payload is not a `u64`: not JSON or empty (corrupt), or
        // JSON of another shape or range (`TypeMismatch`, accepted below).
        ("payload not JSON".into(), record(b"{not json", "u64")),
        ("payload of another shape".into(), record(br#""7""#, "u64")),
        ("payload out of range".into(), record(b"-1", "u64")),
        ("empty payload".into(), record(b"", "u64")),
    ]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_truncated_records_are_errors_and_nothing_runs() {
    let run = rand::random::<u64>();
    let mut tried = 0;
    for f in fixtures().await {
        let runs = AtomicUsize::new(0);
        let call = |label: &str| {
            Call::new(StorageKey::derive("corrupt", &format!("{run}:{label}")).unwrap())
                .store(f.store.clone())
                .fingerprint(Some(Fingerprint([7; 32])))
        };
        // A genuine record, as exec writes it, to take apart.
        let good = {
            let out: Result<u64, Error> = call("good")
                .run(ErrorPolicy::never(), async { Ok(7) })
                .await;
            assert_eq!(out.unwrap(), 7);
            let key = StorageKey::derive("corrupt", &format!("{run}:good")).unwrap();
            match f.store.get(&key).await.unwrap().unwrap().state {
                RecordState::Completed { record, .. } => record.to_vec(),
                other => panic!("{other:?}"),
            }
        };
        assert!(Record::decode(&good).is_ok());
        let mut variants = corrupt_variants(&good);
        variants.push(("missing record bytes".into(), Vec::new()));
        for (label, bytes) in &variants {
            let key = StorageKey::derive("corrupt", &format!("{run}:{label}")).unwrap();
            let missing = label == "missing record bytes";
            if missing && matches!(f.raw, Raw::Memory(_)) {
                continue;
            }
            if !matches!(f.raw, Raw::Memory(_)) {
                // A real completed row first, then its record overwritten in place.
                let out: Result<u64, Error> =
                    call(label).run(ErrorPolicy::never(), async { Ok(7) }).await;
                assert_eq!(out.unwrap(), 7);
            }
            if missing {
                assert!(f.drop_record_bytes(&key).await);
            } else {
                f.plant(&key, bytes).await;
            }
            for _ in 0..2 {
                let out: Result<u64, Error> = call(label)
                    .run(ErrorPolicy::never(), async {
                        runs.fetch_add(1, SeqCst);
                        Ok(8)
                    })
                    .await;
                match out {
                    Err(Error::Corrupt { reason, .. }) => assert!(!reason.is_empty()),
                    // Valid JSON of another shape is a result that does not fit this build.
                    Err(Error::TypeMismatch { .. }) if label.starts_with("payload o") => {}
                    other => panic!("{}: {label}: {other:?}", f.name),
                }
            }
            // Left as it is: not overwritten, not re-run.
            if !missing {
                match f.store.get(&key).await {
                    Ok(Some(StoredRecord {
                        state: RecordState::Completed { record, .. },
                        ..
                    })) => assert_eq!(&record[..], &bytes[..], "{}: {label}", f.name),
                    other => panic!("{}: {label}: {other:?}", f.name),
                }
            }
            tried += 1;
        }
        assert_eq!(runs.load(SeqCst), 0, "{}: no body ran", f.name);
    }
    eprintln!("corrupt records: {tried} variants planted across all stores, each Error::Corrupt twice, no body ran");
}

// ---------------------------------------------------------------------------------------------
// Records of another type.

#[idempotent(name = "hostile.as_number", key = id, scope = "shared-scope", store = store.clone(), skip(store))]
async fn as_number(store: Arc<dyn Store>, id: String) -> Result<u64, AppError> {
    Ok(id.len() as u64)
}

#[idempotent(name = "hostile.as_text", key = id, scope = "shared-scope", store = store.clone(), skip(store))]
async fn as_text(store: Arc<dyn Store>, id: String) -> Result<String, AppError> {
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_another_type_are_type_mismatch() {
    for f in fixtures().await {
        let id = format!("shared-{:016x}", rand::random::<u64>());
        assert_eq!(as_number(f.store.clone(), id.clone()).await.unwrap(), 23);
        // Two operations that share a scope and a key never share a record: the operation is
        // part of the storage key, so the second runs its own body.
        assert_eq!(
            as_text(f.store.clone(), id.clone()).await.unwrap(),
            id,
            "{}",
            f.name
        );
        assert_eq!(as_number(f.store.clone(), id.clone()).await.unwrap(), 23);
        assert_eq!(as_text(f.store.clone(), id.clone()).await.unwrap(), id);

        // Through `Call`, and with a struct written where a tuple is expected.
        #[derive(Serialize, Deserialize)]
        struct Receipt {
            id: u64,
        }
        let k = StorageKey::derive("type", &id).unwrap();
        let out: Result<Receipt, Error> = Call::new(k.clone())
            .store(f.store.clone())
            .run(ErrorPolicy::never(), async { Ok(Receipt { id: 1 }) })
            .await;
        assert_eq!(out.unwrap().id, 1);
        let out: Result<(u64,), Error> = Call::new(k.clone())
            .store(f.store.clone())
            .run(ErrorPolicy::never(), async { unreachable!() })
            .await;
        assert!(
            matches!(&out, Err(Error::TypeMismatch { found, .. }) if found.contains("Receipt`")),
            "{}: {out:?}",
            f.name
        );

        // A kept error, replayed to a caller that keeps no errors.
        let k = StorageKey::derive("type-err", &id).unwrap();
        let out: Result<u64, Kept> = Call::new(k.clone())
            .store(f.store.clone())
            .run(ErrorPolicy::always(), async {
                Err(Kept::Declined("declined".to_owned()))
            })
            .await;
        assert!(matches!(out, Err(Kept::Declined(_))), "{out:?}");
        let out: Result<u64, Error> = Call::new(k)
            .store(f.store.clone())
            .run(ErrorPolicy::never(), async { unreachable!() })
            .await;
        assert!(matches!(out, Err(Error::TypeMismatch { .. })), "{out:?}");
    }
}

/// An error type whose errors can be kept.
#[derive(Debug, Serialize, Deserialize)]
enum Kept {
    Declined(String),
    #[serde(skip)]
    #[allow(dead_code)]
    Idem(Error),
}

impl From<Error> for Kept {
    fn from(e: Error) -> Self {
        Kept::Idem(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Huge results.

#[idempotent(name = "hostile.huge", key = id, store = store.clone(), skip(store, runs))]
async fn huge(
    store: Arc<dyn Store>,
    runs: Arc<AtomicUsize>,
    id: String,
    len: usize,
) -> Result<String, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok("x".repeat(len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_the_limit_are_too_large_and_not_stored() {
    for f in fixtures().await {
        let id = format!("huge-{:016x}", rand::random::<u64>());
        let key = StorageKey::derive("huge", &id).unwrap();
        let runs = AtomicUsize::new(0);
        let before = f.count().await;
        let call = |limit: usize, len: usize| {
            let runs = &runs;
            // At least once: a result that cannot be kept releases the claim.
            Call::new(key.clone())
                .store(f.store.clone())
                .max_record_bytes(limit)
                .on_unknown(OnUnknown::Rerun)
                .run(ErrorPolicy::never(), async move {
                    runs.fetch_add(1, SeqCst);
                    Ok::<_, Error>("y".repeat(len))
                })
        };
        // The size of the record of a 10 000-byte string, as the error reports it.
        let size = match call(0, 10_000).await {
            Err(Error::TooLarge { size, limit: 0 }) => size,
            other => panic!("{}: {other:?}", f.name),
        };
        assert!(size > 10_000, "{}: {size}", f.name);
        let err = call(size - 1, 10_000).await.unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { size: s, limit } if s == size && limit == size - 1),
            "{}: {err:?}",
            f.name
        );
        let message = err.to_string();
        assert!(
            message.contains(&size.to_string()) && message.contains(&(size - 1).to_string()),
            "{}: {message}",
            f.name
        );
        assert_eq!(runs.load(SeqCst), 2, "{}: each try ran", f.name);
        assert_eq!(
            f.store.get(&key).await.unwrap(),
            None,
            "{}: nothing stored, the claim released",
            f.name
        );
        assert_eq!(f.count().await, before, "{}: nothing stored", f.name);
        // A retry runs again; at exactly the limit it is stored, then replayed.
        assert_eq!(call(size, 10_000).await.unwrap().len(), 10_000);
        assert_eq!(runs.load(SeqCst), 3);
        assert_eq!(call(0, 0).await.unwrap().len(), 10_000, "replayed");
        assert_eq!(runs.load(SeqCst), 3);

        // Through the attribute, the default limit of 8 MiB, at most once (the default): the
        // body ran, its result could not be kept, so its outcome is unknown and the key refuses
        // to run it again.
        let runs = Arc::new(AtomicUsize::new(0));
        let err = huge(f.store.clone(), runs.clone(), id.clone(), 8 << 20)
            .await
            .unwrap_err()
            .idem();
        match &err {
            Error::TooLarge { size, limit } => {
                assert_eq!(*limit, 8 << 20);
                assert!(*size > 8 << 20);
                assert!(err.to_string().contains(&size.to_string()));
            }
            other => panic!("{}: {other:?}", f.name),
        }
        let retry = huge(f.store.clone(), runs.clone(), id.clone(), 8 << 20)
            .await
            .unwrap_err()
            .idem();
        assert!(
            matches!(retry, Error::OutcomeUnknown { ref reason, .. } if reason.contains("not stored")),
            "{}: {retry:?}",
            f.name
        );
        assert_eq!(runs.load(SeqCst), 1, "{}: not run again", f.name);
    }
}

// ---------------------------------------------------------------------------------------------
// The replay path under arbitrary bytes.

/// Mutations of a valid record.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Set(usize, u8, bool),
    Append(Vec<u8>, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>(), any::<bool>()).prop_map(|(i, v, f)| Mutation::Set(i, v, f)),
        (prop::collection::vec(any::<u8>(), 1..16), any::<bool>())
            .prop_map(|(b, f)| Mutation::Append(b, f)),
    ]
}

fn apply(good: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = good.to_vec();
    match m {
        Mutation::Truncate(n) => b.truncate(n % good.len()),
        Mutation::Flip(i, bit) => b[i % good.len()] ^= 1 << bit,
        Mutation::Set(i, v, fix) => {
            // Within the body, so that fixing the checksum keeps the change.
            b[i % (good.len() - 4)] = *v;
            if *fix {
                b = fix_crc(b);
            }
        }
        Mutation::Append(extra, fix) => {
            if *fix {
                b.splice(good.len() - 4..good.len() - 4, extra.iter().copied());
                b = fix_crc(b);
            } else {
                b.extend_from_slice(extra);
            }
        }
    }
    b
}

#[derive(Clone, Debug)]
enum Planted {
    Arbitrary(Vec<u8>),
    /// `IDEM`, version 1, then arbitrary bytes and a correct checksum: past the first checks.
    Framed(Vec<u8>),
    Mutated(Vec<u8>, Mutation),
}

#[test]
fn replay_of_arbitrary_record_bytes_never_panics_nor_runs() {
    let planted = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Planted::Arbitrary),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Planted::Framed),
        (prop::collection::vec(any::<u8>(), 0..40), mutation())
            .prop_map(|(p, m)| Planted::Mutated(p, m)),
    ];
    let counts = [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&planted, |planted| {
        let bytes = match &planted {
            Planted::Arbitrary(b) => b.clone(),
            Planted::Framed(tail) => fix_crc([&b"IDEM\x01"[..], tail, &[0; 4]].concat()),
            Planted::Mutated(payload, m) => {
                // Valid JSON for a `u64` sometimes, arbitrary bytes mostly.
                let payload = if payload.len() % 3 == 0 {
                    payload.len().to_string().into_bytes()
                } else {
                    payload.clone()
                };
                apply(&record(&payload, "u64"), m)
            }
        };
        rt.block_on(async {
            let store = MemoryStore::new();
            let key = StorageKey::derive("fuzz", "k").unwrap();
            let Claim::Acquired { token, .. } = store.claim(&key, None, LONG).await.unwrap() else {
                unreachable!()
            };
            store.complete(&key, token, &bytes, LONG).await.unwrap();
            let out: Result<u64, Error> = Call::new(key)
                .store(store.clone())
                .run(ErrorPolicy::never(), async {
                    Err(Error::corrupt("the body ran"))
                })
                .await;
            let i = match &out {
                Ok(_) => 0,
                Err(Error::Corrupt { reason, .. }) => {
                    prop_assert_ne!(reason.as_str(), "the body ran");
                    1
                }
                Err(Error::TypeMismatch { .. }) => 2,
                Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            counts[i].fetch_add(1, SeqCst);
            if let Planted::Mutated(_, Mutation::Truncate(_) | Mutation::Flip(..)) = planted {
                prop_assert!(
                    out.is_err(),
                    "a truncated or bit-flipped record was accepted"
                );
            }
            counts[3].fetch_add(bytes.len() as u64, SeqCst);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let [ok, corrupt, mismatch, bytes] = counts.map(|c| c.load(SeqCst));
    assert!(ok > 0 && corrupt > 0, "both outcomes were reached");
    eprintln!(
        "replay fuzz: {} planted records ({bytes} bytes): {ok} replayed a value, {corrupt} Error::Corrupt, \
         {mismatch} Error::TypeMismatch, 0 panics, 0 runs of the body",
        ok + corrupt + mismatch
    );
}
