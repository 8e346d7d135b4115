//! `SqliteStore`: an embedded, durable store in one SQLite file (feature `sqlite`).
//!
//! Records survive restarts, and several processes on one machine may share the file: the
//! database runs in WAL mode with a busy timeout, a claim is one `BEGIN IMMEDIATE` transaction,
//! and `complete`, `release` and `renew` are each one statement guarded by the fencing token
//! (and by the claim not being abandoned; its lease may have ended, see
//! [`ABANDONED_CLAIM_RETENTION`]). [`Store::save_step`] is one `BEGIN IMMEDIATE` transaction
//! guarded the same way, [`Store::load_steps`] one guarded read.
//!
//! # Schema
//!
//! [`SqliteStore::open`] creates two tables if they are missing (the names are prefixed, so the
//! file may also hold an application's own tables); with
//! [`SqliteOptions::create_tables`]`(false)` it creates nothing and refuses a file without them:
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
//!     record      BLOB,                               -- the encoded record once completed
//!     claimed_at  INTEGER,                            -- unix ms of the claim, or NULL
//!     steps       BLOB,                               -- in flight: the call's steps, or NULL
//!     -- Readable columns, for operators (see "Reading records with SQL" in the README); the
//!     -- engine reads only the columns above, `record` being the source of truth:
//!     operation       TEXT,    -- the operation's name (NULL in flight and for plain calls)
//!     status          TEXT,    -- 'processing', 'completed', 'failed' (a kept error), 'unknown'
//!     result          TEXT,    -- the stored answer as JSON text, when it is JSON
//!     created_at      TEXT,    -- the claim time, ISO-8601 UTC ('2026-12-07T13:30:00.123Z')
//!     completed_at    TEXT,    -- the completion time, ISO-8601 UTC
//!     fingerprint_hex TEXT     -- the fingerprint in hex
//! ) STRICT;
//! CREATE INDEX idem_records_expires_at ON idem_records (expires_at);
//! CREATE INDEX idem_records_status ON idem_records (status, created_at);
//! ```
//!
//! The readable columns are derived from the record when it is written (by the record module,
//! the same way for every store) and never read back: rows written before they existed hold
//! `NULL` there and are still read, checked and replayed through `record`.
//!
//! `claimed_at` is only shown to operators ([`Store::scan`]). `steps` holds the steps a call in
//! flight saved ([`Store::save_step`]), in the row itself so that they share its life: a
//! takeover keeps them, any other claim that acquires the key and [`Store::complete`] set them
//! to `NULL`, and a release, a forget or a purge deletes them with the row. They are framed as
//! one value, a sequence of (u32 big-endian name length, name in UTF-8, u32 big-endian record
//! length, record), one per name; saving a step reads the value, replaces or appends its frame
//! and writes it back, in one write transaction. A claim that finds a live record never reads
//! the column, so replays cost what they did before steps existed.
//!
//! Opening a file whose table predates `claimed_at`, `steps` or the readable columns adds them
//! (`ALTER TABLE ... ADD COLUMN`, a change of the schema alone, no row rewritten); the schema
//! version stays 1, since builds of before name their columns and keep working on the file;
//! with [`SqliteOptions::create_tables`]`(false)` such a file is refused ([`Error::Config`],
//! naming the statements to run) and left as it was. Rows they claim, and rows claimed before, hold `NULL` (no claim time, no steps). Builds of
//! before steps neither keep nor clear the column: while both kinds of build share a file, a row
//! that an old build claims afresh over a completed one may still hold the steps of an earlier
//! call, which a takeover by a new build would then load.
//!
//! A completed row whose `expires_at` has passed counts as absent. An in-flight row whose
//! `expires_at` (its lease) has passed may be taken over by [`Store::claim`], but until then it
//! stays its holder's, who may still complete, renew or release it, and [`Store::get`] reports
//! it; only once its lease ended more than [`ABANDONED_CLAIM_RETENTION`] ago does it count as
//! absent. [`Store::purge_expired`] deletes completed rows past their ttl and such abandoned
//! in-flight rows, using the index (one range scan up to now; in-flight rows whose lease ended
//! within the retention are read there and kept). It deletes in batches of 10 000 rows, each a
//! transaction of its own, so other processes' writes get the lock in between;
//! [`Store::purge_expired_up_to`] is one such batch, of the size given. The store also purges
//! by itself: [`SqliteStore::open`] starts a background [`Purger`](crate::Purger) (one `DELETE` of at most
//! 1000 rows a minute while nothing is left over; see [`SqliteOptions`] for its cost and how to
//! turn it off).
//!
//! # Operators
//!
//! [`Store::forget`] reads the row and deletes it in one write transaction; fencing needs
//! nothing more, since `idem_meta.last_token` never goes back, so no later claim reuses the
//! token of a forgotten claim. [`Store::scan`] pages through the table in key order
//! (`WHERE key > <cursor> ORDER BY key LIMIT n`, the cursor being the last key of the page).
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
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{Mutex, Notify};

use super::{
    steps_blob, Claim, FencingToken, Forgotten, ScanPage, Store, StoredRecord,
    ABANDONED_CLAIM_RETENTION,
};
use crate::engine::PurgerHandle;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::record::{Readable, STATUS_PROCESSING};

mod options;
mod row;
pub use options::SqliteOptions;
use row::{read_row, scan_rows};

const BACKEND: &str = "sqlite";

/// The schema version this code reads and writes, kept in `idem_meta.schema_version`.
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's (or process's) write lock before it
/// fails with [`Error::Store`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates what is missing; the `1` it inserts is [`SCHEMA_VERSION`].
const SCHEMA: &str = include_str!("schema.sql");
/// The file's schema version, once [`SCHEMA`] ran.
const SCHEMA_VERSION_SQL: &str = include_str!("schema_version.sql");
/// Whether the table has a column (a table made before it existed lacks it).
const HAS_COLUMN: &str = include_str!("has_column.sql");
/// The columns added to `idem_records` after it was first released, in the order they were
/// added: opening a file made before one of them adds it.
const ADDED_COLUMNS: [AddedColumn; 8] = [
    AddedColumn {
        name: "claimed_at",
        add: include_str!("add_claimed_at.sql"),
    },
    AddedColumn {
        name: "steps",
        add: include_str!("add_steps.sql"),
    },
    AddedColumn {
        name: "operation",
        add: include_str!("add_operation.sql"),
    },
    AddedColumn {
        name: "status",
        add: include_str!("add_status.sql"),
    },
    AddedColumn {
        name: "result",
        add: include_str!("add_result.sql"),
    },
    AddedColumn {
        name: "created_at",
        add: include_str!("add_created_at.sql"),
    },
    AddedColumn {
        name: "completed_at",
        add: include_str!("add_completed_at.sql"),
    },
    AddedColumn {
        name: "fingerprint_hex",
        add: include_str!("add_fingerprint_hex.sql"),
    },
];
/// The index of the readable `status` column, made once the columns are there.
const STATUS_INDEX: &str = include_str!("status_index.sql");
/// How many of idem's two tables the file holds.
const HAS_TABLES: &str = include_str!("has_tables.sql");
/// The next fencing token.
const NEXT_TOKEN: &str = include_str!("next_token.sql");
/// Writes an acquired claim over an absent or expired row.
const CLAIM: &str = include_str!("claim.sql");
/// Stores a result, guarded by the claim's token.
const COMPLETE: &str = include_str!("complete.sql");
/// Deletes a claim, guarded by its token.
const RELEASE: &str = include_str!("release.sql");
/// Gives a claim a new lease, guarded by its token.
const RENEW: &str = include_str!("renew.sql");
/// Deletes completed rows past their ttl and abandoned claims, up to a number of them.
const PURGE: &str = include_str!("purge.sql");
/// Deletes the row of a key (forget has judged it under the write lock).
const FORGET: &str = include_str!("forget.sql");
/// Reads the steps of a claim, guarded by its token.
const LOAD_STEPS: &str = include_str!("load_steps.sql");
/// Writes the steps of a claim, guarded by its token.
const SAVE_STEP: &str = include_str!("save_step.sql");

/// The most rows one statement of [`Store::purge_expired`] deletes: each batch is a
/// transaction of its own, short enough not to hold up other processes' writes.
const PURGE_BATCH: u64 = 10_000;

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
    // writer per file at a time, and every operation here but `get`, `load_steps` and `scan`
    // (and a claim that finds a live record) writes. Several connections in one process would only contend for the file's
    // write lock through `busy_timeout`, which sleeps and retries, unfairly and with added
    // latency; tasks queued on a fair async mutex wait their turn without sleeping and without
    // occupying a blocking thread. The blocking calls themselves run in `spawn_blocking`, each
    // owning the guard. Other processes contend through SQLite's own locks and `busy_timeout`.
    conn: Arc<Mutex<Connection>>,
    // Wakes `wait_for_change` of this process's waiters on complete, release and forget.
    // Changes made by other processes are seen at the next claim, at most `max` later.
    changed: Notify,
    path: PathBuf,
    // The background purger, if the options asked for one: dropped (so stopped) with the last
    // clone of the store. Its task holds only a `Weak` of this `Inner`.
    purger: std::sync::OnceLock<PurgerHandle>,
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
    /// missing, switches the file to WAL mode (`synchronous = FULL`, so a completed record
    /// survives a power cut as well as a crash), and starts purging expired records in the
    /// background: [`open_with`](Self::open_with) with the default [`SqliteOptions`].
    ///
    /// Several processes may open the same file at once. Fails with [`Error::Store`] if the
    /// file cannot be opened, is not an SQLite database, or holds idem tables of another
    /// schema version.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with(path, &SqliteOptions::default()).await
    }

    /// Like [`open`](Self::open), with `options`: whether to create the file and its tables
    /// ([`SqliteOptions::create_tables`]), and whether and how often to purge in the background
    /// ([`SqliteOptions::purge_in_background`], [`SqliteOptions::purger`]).
    ///
    /// Without `create_tables`, a file that does not exist, or lacks idem's tables, is
    /// [`Error::Config`] naming the file and the table, and nothing is written to it. A bad
    /// purger schedule is [`Error::Config`].
    pub async fn open_with(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        let open_path = path.clone();
        let create = options.create_tables;
        let conn = tokio::task::spawn_blocking(move || open_connection(&open_path, create))
            .await
            .map_err(|e| Error::store(BACKEND, e))??;
        let inner = Arc::new(Inner {
            conn: Arc::new(Mutex::new(conn)),
            changed: Notify::new(),
            path,
            purger: std::sync::OnceLock::new(),
        });
        if options.purge_in_background {
            let weak = Arc::downgrade(&inner);
            let handle = options
                .purger
                .spawn_upgrading(move || weak.upgrade().map(|inner| SqliteStore { inner }))?;
            // Just made: nobody else can have set it.
            let _ = inner.purger.set(handle);
        }
        Ok(SqliteStore { inner })
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

/// Opens the file and prepares it (WAL, schema, unless `create` is off), retrying while another
/// process or thread holds the lock: several workers that start at once on a fresh file race to
/// create the schema and to switch it to WAL, and SQLite answers `SQLITE_BUSY` at once (without
/// its busy handler) to the losers of that race.
fn open_connection(path: &Path, create: bool) -> Result<Connection> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match try_open(path, create) {
            Ok(Opened::Ready(conn, version)) if version == SCHEMA_VERSION => return Ok(conn),
            Ok(Opened::Missing(what)) => return Err(missing(path, what)),
            Ok(Opened::Ready(_, version)) => {
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
            Err(e) if !create && e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen) => {
                return Err(missing(path, Missing::File))
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

/// What [`try_open`] found.
enum Opened {
    /// The connection and the file's schema version.
    Ready(Connection, i64),
    /// Opening without creating found this missing; nothing was written.
    Missing(Missing),
}

/// A column of `idem_records` that a file made before it existed lacks.
#[derive(Debug)]
struct AddedColumn {
    name: &'static str,
    /// The `ALTER TABLE` statement (after comment lines) that adds it.
    add: &'static str,
}

impl AddedColumn {
    /// The statement that adds the column, without its comments.
    fn statement(&self) -> String {
        self.add
            .lines()
            .filter(|l| !l.starts_with("--"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The [`ADDED_COLUMNS`] that the file's `idem_records` lacks.
fn absent_columns(conn: &Connection) -> rusqlite::Result<Vec<&'static AddedColumn>> {
    let mut absent = Vec::new();
    for column in &ADDED_COLUMNS {
        if !conn.query_row(HAS_COLUMN, [column.name], |row| row.get::<_, bool>(0))? {
            absent.push(column);
        }
    }
    Ok(absent)
}

/// What a file opened without creating lacks.
#[derive(Debug)]
enum Missing {
    File,
    Tables,
    /// Columns of `idem_records` added after the file's table was made (never empty).
    Columns(Vec<&'static AddedColumn>),
}

/// The [`Error::Config`] of a file opened without creating that lacks `what`.
fn missing(path: &Path, what: Missing) -> Error {
    let path = path.display();
    let advice = "open it with `SqliteOptions::create_tables(true)` (the default, as `SqliteStore::open` does) to create it";
    Error::config(match what {
        Missing::File => format!(
            "no SQLite database at `{path}`, and creating it is off: check the path, or {advice}"
        ),
        Missing::Tables => format!(
            "the SQLite database `{path}` has no idem table `idem_records` (or `idem_meta`), and creating tables is off: check the path (is it the application's idem store?), or {advice}; nothing was written"
        ),
        Missing::Columns(columns) => {
            let names = columns
                .iter()
                .map(|c| format!("`{}`", c.name))
                .collect::<Vec<_>>()
                .join(" and ");
            let plural = if columns.len() == 1 { "" } else { "s" };
            let statements = columns
                .iter()
                .map(|c| c.statement())
                .collect::<Vec<_>>()
                .join("; ");
            format!(
                "the table `idem_records` in `{path}` was made by an older build (no {names} column{plural}), and changing the schema is off: {advice}, or run `{statements}`; nothing was written"
            )
        }
    })
}

/// One attempt of [`open_connection`]. With `create` off the file must exist and hold both
/// tables (checked before anything is written), and no schema statement runs.
fn try_open(path: &Path, create: bool) -> rusqlite::Result<Opened> {
    let conn = if create {
        Connection::open(path)?
    } else {
        // `Connection::open`'s flags without `CREATE`.
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Without `create`, the file's schema version, once checked. Everything a file must hold
    // is checked before the switch to WAL below, which writes the file's header: a refused file
    // is left exactly as it was.
    let checked_version = if create {
        None
    } else {
        let tables: i64 = conn.query_row(HAS_TABLES, [], |row| row.get(0))?;
        if tables != 2 {
            return Ok(Opened::Missing(Missing::Tables));
        }
        let version: i64 = conn.query_row(SCHEMA_VERSION_SQL, [], |row| row.get(0))?;
        if version == SCHEMA_VERSION {
            let absent = absent_columns(&conn)?;
            if !absent.is_empty() {
                return Ok(Opened::Missing(Missing::Columns(absent)));
            }
        }
        Some(version)
    };
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // An in-memory database (`:memory:`) reports `memory`; it is not shared anyway. Other
        // files keep working with a rollback journal, with less concurrency.
        tracing::warn!(target: "idem", path = %path.display(), mode, "SQLite store is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mut conn = conn;
    if let Some(version) = checked_version {
        return Ok(Opened::Ready(conn, version));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row(SCHEMA_VERSION_SQL, [], |row| row.get(0))?;
    if version == SCHEMA_VERSION {
        for column in absent_columns(&tx)? {
            tx.execute_batch(column.add)?;
        }
        tx.execute_batch(STATUS_INDEX)?;
    }
    tx.commit()?;
    Ok(Opened::Ready(conn, version))
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
fn sql_token(key: &StorageKey, token: FencingToken) -> Result<i64> {
    i64::try_from(token.0).map_err(|_| Error::lease_lost(key))
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
        .prepare_cached(NEXT_TOKEN)
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
    tx.prepare_cached(CLAIM)
        .and_then(|mut stmt| {
            stmt.execute(params![
                key,
                fingerprint.as_ref().map(|f| &f.0[..]),
                raw_token,
                after(now, lease),
                now,
                takeover,
                STATUS_PROCESSING,
                fingerprint.as_ref().map(Fingerprint::to_hex)
            ])
        })
        .map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    Ok(Claim::Acquired { token, takeover })
}

/// Removes the row of `key` if it exists (see [`Row::exists`](row::Row::exists)) and is
/// completed, or in flight and `force` is set, judged and deleted under the write lock.
fn forget_blocking(conn: &mut Connection, key: &StorageKey, force: bool) -> Result<Forgotten> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let now = now_ms();
    let row = read_row(&tx, key.as_str()).map_err(|e| e.with_key(key))?;
    let Some(row) = row.filter(|row| row.exists(now)) else {
        return Ok(Forgotten::Absent);
    };
    let forgotten = match row.record {
        Some(_) => Forgotten::Completed { token: row.token },
        None if force => Forgotten::InFlight { token: row.token },
        None => {
            return Err(Error::InFlight {
                key: Some(key.clone()),
            })
        }
    };
    tx.prepare_cached(FORGET)
        .and_then(|mut stmt| stmt.execute([key.as_str()]))
        .map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    Ok(forgotten)
}

/// The steps of the claim `key`/`token` as stored (`None` for none yet), or
/// [`Error::LeaseLost`] if it no longer holds the key (see [`guarded`]).
fn held_steps(
    conn: &Connection,
    key: &StorageKey,
    token: i64,
    now: i64,
) -> Result<Option<Vec<u8>>> {
    conn.prepare_cached(LOAD_STEPS)
        .and_then(|mut stmt| {
            stmt.query_row(params![key.as_str(), token, abandoned_before(now)], |r| {
                r.get(0)
            })
            .optional()
        })
        .map_err(sql_err)?
        .ok_or_else(|| Error::lease_lost(key))
}

/// Sets the step `name` of the claim `key`/`token` to `record`: reads its steps, replaces or
/// appends the step, and writes them back, all under the write lock so that no other save (or
/// a takeover, a completion) comes in between.
fn save_step_blocking(
    conn: &mut Connection,
    key: &StorageKey,
    token: i64,
    name: &str,
    record: &[u8],
) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    // The clock is read after the lock is held, as in a claim.
    let now = now_ms();
    let steps = held_steps(&tx, key, token, now)?;
    let steps = steps_blob::append(steps.as_deref(), name, record);
    guarded(
        &tx,
        key,
        SAVE_STEP,
        params![steps, key.as_str(), token, abandoned_before(now)],
    )?;
    tx.commit().map_err(sql_err)
}

/// Runs one statement guarded by `key`, `token` and an in-flight row that is not abandoned (its
/// lease may have ended); no matching row means the claim was lost (taken over, completed,
/// released or purged).
fn guarded(
    conn: &Connection,
    key: &StorageKey,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<()> {
    let changed = conn
        .prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(params))
        .map_err(sql_err)?;
    if changed == 0 {
        Err(Error::lease_lost(key))
    } else {
        Ok(())
    }
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
        let token = sql_token(key, token)?;
        // The readable columns, derived from the record by the record module (NULL for bytes
        // that are not a record).
        let readable = Readable::of(record);
        let operation = readable.and_then(|r| r.operation).map(str::to_owned);
        let status = readable.map(|r| r.status);
        let result = readable.and_then(|r| r.result).map(str::to_owned);
        let (key, record) = (key.clone(), record.to_vec());
        self.with_conn(move |conn| {
            let now = now_ms();
            guarded(
                conn,
                &key,
                COMPLETE,
                params![
                    record,
                    after(now, ttl),
                    key.as_str(),
                    token,
                    abandoned_before(now),
                    operation,
                    status,
                    result,
                    now
                ],
            )
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let token = sql_token(key, token)?;
        let key = key.clone();
        self.with_conn(move |conn| {
            guarded(
                conn,
                &key,
                RELEASE,
                params![key.as_str(), token, abandoned_before(now_ms())],
            )
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let token = sql_token(key, token)?;
        let key = key.clone();
        self.with_conn(move |conn| {
            let now = now_ms();
            guarded(
                conn,
                &key,
                RENEW,
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
        Ok(row.filter(|r| r.exists(now_ms())).map(row::Row::stored))
    }

    /// Deletes in batches of 10 000 rows, each a transaction of its own.
    async fn purge_expired(&self) -> Result<u64> {
        let mut removed = 0;
        loop {
            let n = self.purge_expired_up_to(PURGE_BATCH).await?;
            removed += n;
            if n < PURGE_BATCH {
                return Ok(removed);
            }
        }
    }

    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            let now = now_ms();
            // One range scan of the index up to now; in flight, only abandoned rows go.
            let removed = conn
                .prepare_cached(PURGE)
                .and_then(|mut stmt| stmt.execute([now, abandoned_before(now), limit]))
                .map_err(sql_err)?;
            Ok(removed as u64)
        })
        .await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let key = key.clone();
        let forgotten = self
            .with_conn(move |conn| forget_blocking(conn, &key, force))
            .await?;
        if forgotten != Forgotten::Absent {
            self.inner.changed.notify_waiters();
        }
        Ok(forgotten)
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let after = cursor.unwrap_or_default().to_owned();
        let (records, next) = self
            .with_conn(move |conn| scan_rows(conn, &after, limit, now_ms()))
            .await?;
        Ok(ScanPage { records, next })
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        let token = sql_token(key, token)?;
        if name.len().max(record.len()) > steps_blob::MAX_PART_LEN {
            // SQLite refuses such a value anyway (its limit is 1 GB); say so before framing it.
            return Err(Error::store(
                BACKEND,
                format!(
                    "the step `{}` is too large to keep: {} bytes of name, {} of record",
                    name.chars().take(64).collect::<String>(),
                    name.len(),
                    record.len()
                ),
            ));
        }
        let (key, name, record) = (key.clone(), name.to_owned(), record.to_vec());
        self.with_conn(move |conn| save_step_blocking(conn, &key, token, &name, &record))
            .await
    }

    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        let token = sql_token(key, token)?;
        let key = key.clone();
        self.with_conn(move |conn| match held_steps(conn, &key, token, now_ms())? {
            None => Ok(Vec::new()),
            Some(steps) => steps_blob::decode(&steps).map_err(|e| e.with_key(&key)),
        })
        .await
    }
}

#[cfg(test)]
mod tests;
