//! Fixtures shared by the tests, benches and `examples/bench_report` of `idempotency` (not
//! published): the rule for unreachable services, probes and fresh stores of each backend, a
//! private `redis-server`, PostgreSQL schemas and databases of a run's own, Redis `MONITOR`
//! and PostgreSQL statement counting, a slow TCP proxy, worker processes, and the bench workload.
//!
//! The backends' parts follow the features of the same names (`sqlite`, `redis`, `postgres`,
//! `dynamodb`), which the facade's features of those names turn on for its tests.
#![warn(missing_docs)]

use std::sync::Arc;

use idem_runtime::{MemoryStore, Store};

pub use idem_testkit::unique;

mod down;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "redis")]
pub mod monitor;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(all(feature = "redis", unix))]
mod private_redis;
#[cfg(unix)]
pub mod process;
#[cfg(feature = "redis")]
pub mod redis;
pub mod slow_proxy;
pub mod workload;

pub use down::DownStore;
#[cfg(all(feature = "redis", unix))]
pub use private_redis::PrivateRedis;
#[cfg(feature = "redis")]
pub use redis::delete_prefix as delete_redis_prefix;

/// The error type of the test functions: idem's errors, or the body's own.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum AppError {
    /// idem's error (never stored: a stored `Err` is one of the others).
    #[serde(skip)]
    Idem(idem_runtime::Error),
    /// A refusal the body returns, kept under `cache_errors`.
    Declined(String),
    /// A failure worth a retry.
    Transient(String),
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    /// The idem error inside, if this is one.
    pub fn idem(&self) -> Option<&idem_runtime::Error> {
        match self {
            AppError::Idem(e) => Some(e),
            _ => None,
        }
    }
}

/// Reports an unreachable service: a failure under `IDEM_REQUIRE_SERVICES=1` (CI), else a
/// printed skip, so a newcomer without Redis or PostgreSQL still gets a green `cargo test`.
pub fn unavailable(what: &str, why: impl std::fmt::Display) {
    if std::env::var("IDEM_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{what} is required (IDEM_REQUIRE_SERVICES=1) but unreachable: {why}");
    }
    eprintln!(
        "SKIPPED: {what} unreachable ({why}); set IDEM_REQUIRE_SERVICES=1 to make this a failure"
    );
}

/// Appends `line` to the file at `path` with a single `write` on an `O_APPEND` file, so lines
/// that concurrent processes append (ledgers of body starts) never interleave.
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open the ledger");
    let written = file.write(line.as_bytes()).expect("append to the ledger");
    assert_eq!(written, line.len(), "one write per ledger line");
}

/// `IDEM_REDIS_URL`, or the loopback default.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A fresh in-memory store.
pub async fn memory() -> Option<Arc<dyn Store>> {
    Some(Arc::new(MemoryStore::new()))
}

/// A `SqliteStore` in a temporary directory of its own, removed when the store is dropped.
#[cfg(feature = "sqlite")]
pub async fn sqlite() -> Option<Arc<dyn Store>> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = idem_runtime::SqliteStore::open(dir.path().join("idem.sqlite"))
        .await
        .expect("open the SQLite store");
    Some(Arc::new(idem_testkit::Intercept::new(store).keeping(dir)))
}
