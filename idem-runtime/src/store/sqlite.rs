//! `SqliteStore`: an embedded, durable store in one SQLite file (feature `sqlite`).
//!
//! Records survive restarts, and several processes on one machine may share the file: the
//! database runs in WAL mode with a busy timeout, a claim is one `BEGIN IMMEDIATE` transaction,
//! and `complete`, `release` and `renew` are each one statement guarded by the fencing token
//! (and by the claim not being abandoned; its lease may have ended, see
//! [`ABANDONED_CLAIM_RETENTION`]).
//!
//! # Schema
//!
//! [`SqliteStore::open`] creates two tables if they are missing (the names are prefixed, so the
//! file may also hold an application's own tables):
//!
//! ```sql
//! -- One row: the schema version and the last fencing token handed out. Every claim that
//! -- acquires a key increments `last_token` in its own transaction, so tokens strictly increase
//! -- across keys, processes, restarts and deletions of records.
//! CREATE TABLE idem_meta (
//!     id             INTEGER PRIMARY KEY CHECK (id = 1),
//!     schema_version INTEGER NOT NULL,
//!     last_token     INTEGER NOT NULL
//! ) STRICT;
//!
//! -- One row per storage key (64 hex digits; never the raw user key).
//! CREATE TABLE idem_records (
//!     key         TEXT PRIMARY KEY NOT NULL,
//!     fingerprint BLOB,                               -- 32 bytes, or NULL: matches any
//!     token       INTEGER NOT NULL,                   -- fencing token of the claim
//!     state       INTEGER NOT NULL CHECK (state IN (0, 1)), -- 0 in flight, 1 completed
//!     expires_at  INTEGER NOT NULL,                   -- unix ms: lease end, or ttl end
//!     record      BLOB                                -- the encoded record once completed
//! ) STRICT;
//! CREATE INDEX idem_records_expires_at ON idem_records (expires_at);
//! ```
//!
//! A completed row whose `expires_at` has passed counts as absent. An in-flight row whose
//! `expires_at` (its lease) has passed may be taken over by [`Store::claim`], but until then it
//! stays its holder's, who may still complete, renew or release it, and [`Store::get`] reports
//! it; only once its lease ended more than [`ABANDONED_CLAIM_RETENTION`] ago does it count as
//! absent. [`Store::purge_expired`] deletes completed rows past their ttl and such abandoned
//! in-flight rows, using the index (one range scan up to now; in-flight rows whose lease ended
//! within the retention are read there and kept). Nothing purges on its own: call it now and
//! then (say, hourly) to keep the file small.
//!
//! # Concurrency
//!
//! Each `SqliteStore` (and its clones) holds one connection, used by one blocking task at a
//! time; SQLite itself serializes writers across connections and processes. A claim first
//! reads the row without a lock (replays and conflicts need nothing more); only to acquire does
//! it take the write lock (`BEGIN IMMEDIATE`), read again, take the next token and write the
//! row. A writer waits up to 5 s for the lock, then fails with [`Error::Store`]. So a process
//! that is stopped or hangs *inside* a write (microseconds, against the seconds of a lease)
//! holds up the other processes' writes until it resumes, where a server-based store would
//! not; SIGKILL and crashes release SQLite's locks at once.
//!
//! # Clock
//!
//! SQLite has no server clock, so expiry is measured on the system wall clock
//! ([`SystemTime`], milliseconds since the Unix epoch), read by every process that opens the
//! file. All processes of one machine share that clock, so they agree on expiry; do not share
//! the file between machines (network file systems also break SQLite's locking). A wall clock
//! stepped backwards lengthens leases and ttls by the step; one stepped forwards shortens them
//! (a lease that ends early only allows an early takeover: until one happens, its holder still
//! completes).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{Mutex, Notify};

use super::{Claim, FencingToken, RecordState, Store, StoredRecord, ABANDONED_CLAIM_RETENTION};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

const BACKEND: &str = "sqlite";

/// The schema version this code reads and writes, kept in `idem_meta.schema_version`.
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's (or process's) write lock before it
/// fails with [`Error::Store`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates what is missing; the `1` inserted is [`SCHEMA_VERSION`].
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idem_meta (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    last_token     INTEGER NOT NULL
) STRICT;
INSERT INTO idem_meta (id, schema_version, last_token) VALUES (1, 1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS idem_records (
    key         TEXT PRIMARY KEY NOT NULL,
    fingerprint BLOB,
    token       INTEGER NOT NULL,
    state       INTEGER NOT NULL CHECK (state IN (0, 1)),
    expires_at  INTEGER NOT NULL,
    record      BLOB
) STRICT;
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
";

const STATE_IN_FLIGHT: i64 = 0;
const STATE_COMPLETED: i64 = 1;

/// A store in one SQLite file: embedded, durable, shared by the processes of one machine.
///
/// Cloning gives another handle to the same connection. See the [module docs](self) for the
/// schema and the clock.
///
/// ```no_run
/// # use idem_runtime as idempotency;
/// # async fn demo() -> idempotency::Result<()> {
/// let store = idempotency::SqliteStore::open("idem.sqlite").await?;
/// idempotency::install(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    // One connection per store, behind an async mutex, rather than a pool: SQLite admits one
    // writer per file at a time, and every operation here but `get` (and a claim that finds a
    // live record) writes. Several connections in one process would only contend for the file's
    // write lock through `busy_timeout`, which sleeps and retries, unfairly and with added
    // latency; tasks queued on a fair async mutex wait their turn without sleeping and without
    // occupying a blocking thread. The blocking calls themselves run in `spawn_blocking`, each
    // owning the guard. Other processes contend through SQLite's own locks and `busy_timeout`.
    conn: Arc<Mutex<Connection>>,
    // Wakes `wait_for_change` of this process's waiters on complete and release. Changes made
    // by other processes are seen at the next claim, at most `max` later.
    changed: Notify,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens the store in the SQLite file at `path`, creating the file and its tables if
    /// missing, and switches the file to WAL mode (`synchronous = FULL`, so a completed record
    /// survives a power cut as well as a crash).
    ///
    /// Several processes may open the same file at once. Fails with [`Error::Store`] if the
    /// file cannot be opened, is not an SQLite database, or holds idem tables of another
    /// schema version.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        let open_path = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_connection(&open_path))
            .await
            .map_err(|e| Error::store(BACKEND, e))??;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conn: Arc::new(Mutex::new(conn)),
                changed: Notify::new(),
                path,
            }),
        })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the connection in a blocking thread, after waiting for the connection
    /// without blocking a thread. Once started, `f` runs to its end even if the caller is
    /// cancelled, so no statement or transaction is cut short.
    async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let mut conn = self.inner.conn.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(|e| Error::store(BACKEND, e))?
    }
}

/// Opens the file and prepares it (WAL, schema), retrying while another process or thread
/// holds the lock: several workers that start at once on a fresh file race to create the
/// schema and to switch it to WAL, and SQLite answers `SQLITE_BUSY` at once (without its busy
/// handler) to the losers of that race.
fn open_connection(path: &Path) -> Result<Connection> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match try_open(path) {
            Ok((conn, version)) if version == SCHEMA_VERSION => return Ok(conn),
            Ok((_, version)) => {
                return Err(Error::store(
                    BACKEND,
                    format!(
                        "`{}` holds idem schema version {version}; this build reads version {SCHEMA_VERSION}",
                        path.display()
                    ),
                ))
            }
            Err(e) if is_busy(&e) && std::time::Instant::now() + pause < deadline => {
                tracing::debug!(target: "idem", path = %path.display(), error = %e, "SQLite file busy while opening; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(sql_err(e)),
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// One attempt of [`open_connection`]: the connection and the file's schema version.
fn try_open(path: &Path) -> rusqlite::Result<(Connection, i64)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // An in-memory database (`:memory:`) reports `memory`; it is not shared anyway. Other
        // files keep working with a rollback journal, with less concurrency.
        tracing::warn!(target: "idem", path = %path.display(), mode, "SQLite store is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mut conn = conn;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row(
        "SELECT schema_version FROM idem_meta WHERE id = 1",
        [],
        |row| row.get(0),
    )?;
    tx.commit()?;
    Ok((conn, version))
}

/// Maps a rusqlite error: a value of the wrong type or range read from a row means the file
/// was altered, so it is [`Error::Corrupt`]; everything else is [`Error::Store`].
fn sql_err(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            Error::corrupt(format!("SQLite row: {e}"))
        }
        e => Error::store(BACKEND, e),
    }
}

/// The system wall clock in milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `now + d` in milliseconds, saturating (a ttl of `Duration::MAX` means "forever").
fn after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The lease end (`expires_at`) that an in-flight row must be past to be abandoned at `now`:
/// rows in flight with `expires_at > abandoned_before(now)` still exist for their holder.
fn abandoned_before(now: i64) -> i64 {
    now.saturating_sub(i64::try_from(ABANDONED_CLAIM_RETENTION.as_millis()).unwrap_or(i64::MAX))
}

/// A token as stored. A token too large for SQLite was never handed out by this store, so it
/// holds nothing: [`Error::LeaseLost`].
fn sql_token(token: FencingToken) -> Result<i64> {
    i64::try_from(token.0).map_err(|_| Error::LeaseLost)
}

/// A row of `idem_records`, decoded and checked.
struct Row {
    fingerprint: Option<Fingerprint>,
    token: FencingToken,
    expires_at: i64,
    /// `None` while in flight; the encoded record once completed.
    record: Option<Bytes>,
}

type RawRow = (Option<Vec<u8>>, i64, i64, i64, Option<Vec<u8>>);

impl Row {
    fn decode((fingerprint, token, state, expires_at, record): RawRow) -> Result<Row> {
        let fingerprint = match fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|b: Vec<u8>| {
                Error::corrupt(format!(
                    "SQLite row: fingerprint of {} bytes, expected 32",
                    b.len()
                ))
            })?)),
        };
        let token = match u64::try_from(token) {
            Ok(t) if t > 0 => FencingToken(t),
            _ => {
                return Err(Error::corrupt(format!(
                    "SQLite row: invalid fencing token {token}"
                )))
            }
        };
        let record = match (state, record) {
            (STATE_IN_FLIGHT, _) => None,
            (STATE_COMPLETED, Some(bytes)) => Some(Bytes::from(bytes)),
            (STATE_COMPLETED, None) => {
                return Err(Error::corrupt("SQLite row: completed without a record"))
            }
            (other, _) => return Err(Error::corrupt(format!("SQLite row: unknown state {other}"))),
        };
        Ok(Row {
            fingerprint,
            token,
            expires_at,
            record,
        })
    }

    /// Whether the row stands in a claim's way: completed within its ttl, or in flight within
    /// its lease.
    fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Whether the row still exists for `get`: completed within its ttl, or in flight and not
    /// abandoned (its lease may have ended).
    fn exists(&self, now: i64) -> bool {
        match self.record {
            Some(_) => self.expires_at > now,
            None => self.expires_at > abandoned_before(now),
        }
    }

    /// What a claim reports for this live row.
    fn live_claim(self, fingerprint: Option<&Fingerprint>) -> Claim {
        Claim::on_live_record(self.fingerprint.as_ref(), fingerprint, self.record)
    }
}

fn read_row(conn: &Connection, key: &str) -> Result<Option<Row>> {
    let raw: Option<RawRow> = conn
        .prepare_cached(
            "SELECT fingerprint, token, state, expires_at, record FROM idem_records WHERE key = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(sql_err)?;
    raw.map(Row::decode).transpose()
}

fn claim_blocking(
    conn: &mut Connection,
    key: &str,
    fingerprint: Option<Fingerprint>,
    lease: Duration,
) -> Result<Claim> {
    // Look first without the write lock: a replay or a conflict (the common cases of a retry)
    // is answered by one read, which WAL lets run beside other processes' writes. The read is
    // one consistent snapshot, so its answer was true at that instant.
    if let Some(row) = read_row(conn, key)? {
        if row.is_live(now_ms()) {
            return Ok(row.live_claim(fingerprint.as_ref()));
        }
    }
    // Absent or expired: decide and write under the file's write lock, so no other connection
    // or process can claim in between. Dropping `tx` without commit rolls back.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    // The clock is read after the lock is held: waiting for it may have taken a while.
    let now = now_ms();
    let takeover = match read_row(&tx, key)? {
        Some(row) if row.is_live(now) => return Ok(row.live_claim(fingerprint.as_ref())),
        Some(row) => row.record.is_none(),
        None => false,
    };
    let raw_token: i64 = tx
        .prepare_cached(
            "UPDATE idem_meta SET last_token = last_token + 1 WHERE id = 1 RETURNING last_token",
        )
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(sql_err)?;
    let token = match u64::try_from(raw_token) {
        Ok(t) if t > 0 => FencingToken(t),
        _ => {
            return Err(Error::corrupt(format!(
                "SQLite idem_meta: invalid last token {raw_token}"
            )))
        }
    };
    tx.prepare_cached(
        "INSERT INTO idem_records (key, fingerprint, token, state, expires_at, record)
         VALUES (?1, ?2, ?3, 0, ?4, NULL)
         ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, token = excluded.token,
             state = 0, expires_at = excluded.expires_at, record = NULL",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            key,
            fingerprint.as_ref().map(|f| &f.0[..]),
            raw_token,
            after(now, lease)
        ])
    })
    .map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    Ok(Claim::Acquired { token, takeover })
}

/// Runs one statement guarded by `key`, `token` and an in-flight row that is not abandoned (its
/// lease may have ended); no matching row means the claim was lost (taken over, completed,
/// released or purged).
fn guarded(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<()> {
    let changed = conn
        .prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(params))
        .map_err(sql_err)?;
    if changed == 0 {
        Err(Error::LeaseLost)
    } else {
        Ok(())
    }
}

fn release_blocking(conn: &Connection, key: &str, token: FencingToken) -> Result<()> {
    let token = sql_token(token)?;
    guarded(
        conn,
        "DELETE FROM idem_records WHERE key = ?1 AND token = ?2 AND state = 0 AND expires_at > ?3",
        params![key, token, abandoned_before(now_ms())],
    )
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let key = key.clone();
        let fingerprint = fingerprint.copied();
        self.with_conn(move |conn| claim_blocking(conn, key.as_str(), fingerprint, lease))
            .await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let token = sql_token(token)?;
        let (key, record) = (key.clone(), record.to_vec());
        self.with_conn(move |conn| {
            let now = now_ms();
            guarded(
                conn,
                "UPDATE idem_records SET state = 1, record = ?1, expires_at = ?2
                 WHERE key = ?3 AND token = ?4 AND state = 0 AND expires_at > ?5",
                params![
                    record,
                    after(now, ttl),
                    key.as_str(),
                    token,
                    abandoned_before(now)
                ],
            )
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let key = key.clone();
        self.with_conn(move |conn| release_blocking(conn, key.as_str(), token))
            .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let token = sql_token(token)?;
        let key = key.clone();
        self.with_conn(move |conn| {
            let now = now_ms();
            guarded(
                conn,
                "UPDATE idem_records SET expires_at = ?1
                 WHERE key = ?2 AND token = ?3 AND state = 0 AND expires_at > ?4",
                params![
                    after(now, lease),
                    key.as_str(),
                    token,
                    abandoned_before(now)
                ],
            )
        })
        .await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let key = key.clone();
        let row = self
            .with_conn(move |conn| read_row(conn, key.as_str()))
            .await?;
        Ok(row.filter(|r| r.exists(now_ms())).map(|r| StoredRecord {
            fingerprint: r.fingerprint,
            state: match r.record {
                None => RecordState::InFlight { token: r.token },
                Some(record) => RecordState::Completed {
                    token: r.token,
                    record,
                },
            },
        }))
    }

    async fn purge_expired(&self) -> Result<u64> {
        self.with_conn(|conn| {
            let now = now_ms();
            // One range scan of the index up to now; in flight, only abandoned rows go.
            let removed = conn
                .prepare_cached(
                    "DELETE FROM idem_records
                     WHERE expires_at <= ?1 AND (state = 1 OR expires_at <= ?2)",
                )
                .and_then(|mut stmt| stmt.execute([now, abandoned_before(now)]))
                .map_err(sql_err)?;
            Ok(removed as u64)
        })
        .await
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn release_in_background(&self, key: StorageKey, token: FencingToken) {
        fn report(key: &StorageKey, token: FencingToken, result: Result<()>) {
            match result {
                Ok(()) => {
                    tracing::debug!(target: "idem", key = %key, token = token.0, "released in the background")
                }
                Err(e) => tracing::debug!(target: "idem", key = %key, token = token.0, error = %e,
                    "background release failed; the lease will expire"),
            }
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let store = self.clone();
                handle.spawn(async move {
                    let result = store.release(&key, token).await;
                    report(&key, token, result);
                });
            }
            Err(_) => {
                // No runtime (dropped outside one): release on a thread of its own rather than
                // block the dropping thread on the connection.
                let inner = self.inner.clone();
                let spawned = std::thread::Builder::new()
                    .name("idem-sqlite-release".into())
                    .spawn(move || {
                        let result =
                            release_blocking(&inner.conn.blocking_lock(), key.as_str(), token);
                        if result.is_ok() {
                            inner.changed.notify_waiters();
                        }
                        report(&key, token, result);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(target: "idem", error = %e, "could not start a release thread; the lease will expire");
                }
            }
        }
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "idem-sqlite-{label}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("idem.sqlite")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
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
        let dir = TempDir::new("tokens");
        let k = key("k");
        let first = {
            let store = SqliteStore::open(dir.db()).await.unwrap();
            let t = acquire(&store, &k).await;
            store.release(&k, t).await.unwrap();
            assert_eq!(
                store.get(&k).await.unwrap(),
                None,
                "release deletes the row"
            );
            t
        };
        let store = SqliteStore::open(dir.db()).await.unwrap();
        let second = acquire(&store, &k).await;
        assert!(second > first, "{second:?} after {first:?}");
        assert!(matches!(
            store.complete(&k, first, b"stale", LONG).await,
            Err(Error::LeaseLost)
        ));
        store.complete(&k, second, b"r", LONG).await.unwrap();
        drop(store);
        let store = SqliteStore::open(dir.db()).await.unwrap();
        assert_eq!(
            store.claim(&k, None, LONG).await.unwrap(),
            Claim::Completed(Bytes::from_static(b"r"))
        );
    }

    #[tokio::test]
    async fn bad_rows_are_corrupt_errors_not_panics() {
        let dir = TempDir::new("corrupt");
        let store = SqliteStore::open(dir.db()).await.unwrap();
        let raw = Connection::open(dir.db()).unwrap();
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
        let dir = TempDir::new("abandoned");
        let store = SqliteStore::open(dir.db()).await.unwrap();
        let raw = Connection::open(dir.db()).unwrap();
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
            assert!(matches!(result, Err(Error::LeaseLost)), "{result:?}");
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
        let dir = TempDir::new("schema");
        drop(SqliteStore::open(dir.db()).await.unwrap());
        let raw = Connection::open(dir.db()).unwrap();
        raw.execute("UPDATE idem_meta SET schema_version = 99", [])
            .unwrap();
        let err = SqliteStore::open(dir.db()).await.unwrap_err();
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
        let dir = TempDir::new("garbage");
        std::fs::write(dir.db(), vec![0x5a; 8192]).unwrap();
        let err = SqliteStore::open(dir.db()).await.unwrap_err();
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
            let dir = TempDir::new(&format!("open-race-{round}"));
            let opens: Vec<_> = (0..16)
                .map(|_| tokio::spawn(SqliteStore::open(dir.db())))
                .collect();
            for open in opens {
                open.await.unwrap().unwrap();
            }
        }
        let dir = TempDir::new("open");
        let opens: Vec<_> = (0..8)
            .map(|_| tokio::spawn(SqliteStore::open(dir.db())))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_release_works_outside_a_runtime() {
        let dir = TempDir::new("background");
        let store = SqliteStore::open(dir.db()).await.unwrap();
        let k = key("bg");
        let t = acquire(&store, &k).await;
        let (s, k2) = (store.clone(), k.clone());
        // A plain thread has no tokio runtime: the store releases on a thread of its own.
        std::thread::spawn(move || s.release_in_background(k2, t))
            .join()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.get(&k).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the claim was not released"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
