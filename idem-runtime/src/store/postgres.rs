//! `PostgresStore`: records in a PostgreSQL table, for many processes when the data already
//! lives in PostgreSQL (feature `postgres`).
//!
//! ```no_run
//! # use idem_runtime as idempotency;
//! # async fn demo() -> idempotency::Result<()> {
//! use idempotency::PostgresStore;
//!
//! let store = PostgresStore::connect("postgres://app@db.internal/app").await?;
//! idempotency::install(store);
//! # Ok(()) }
//! ```
//!
//! # Schema
//!
//! PostgreSQL 12 or newer (the claim uses `WITH ... AS MATERIALIZED`).
//!
//! [`PostgresStore::connect`] creates the table, its token sequence and its expiry index if they
//! are missing (`idem_records` by default; [`PostgresStore::schema_sql`] gives the statements for
//! a migration tool):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS idem_records (
//!     key         text        PRIMARY KEY,  -- hex(SHA-256(scope, 0x00, user key)), never raw user input
//!     token       bigint      NOT NULL,     -- fencing token of the latest claim
//!     fingerprint bytea,                    -- NULL: matches any request
//!     state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
//!     record      bytea,                    -- the encoded record, once completed
//!     expires_at  timestamptz NOT NULL      -- end of the lease while in flight, of the ttl once completed
//! );
//! -- Fencing tokens: strictly increasing across the whole table, across takeovers and deletes.
//! -- Not owned by the table, so `TRUNCATE ... RESTART IDENTITY` cannot rewind it.
//! CREATE SEQUENCE IF NOT EXISTS idem_records_token_seq AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
//! -- For purging: `DELETE ... WHERE expires_at <= now() AND ...` walks this index, not the table.
//! CREATE INDEX IF NOT EXISTS idem_records_expires_idx ON idem_records (expires_at);
//! ```
//!
//! A record is live (stands in a claim's way) while `expires_at > now()`. A completed row past
//! its ttl counts as absent. An in-flight row past its lease may be taken over by
//! [`claim`](Store::claim), but until then it stays its holder's: `complete`, `renew` and
//! `release` with its token still work, and [`get`](Store::get) reports it. Only once its lease
//! ended more than [`ABANDONED_CLAIM_RETENTION`] ago is it abandoned and counts as absent.
//! [`purge_expired`](Store::purge_expired) removes completed rows past their ttl and abandoned
//! in-flight rows; run it from a periodic job.
//!
//! # One statement per step
//!
//! Every [`Store`] method is a single prepared statement (cached per pooled connection), so a
//! replayed call costs one statement and a first call two (claim, then complete). The claim is
//! one `INSERT ... ON CONFLICT (key) DO UPDATE ... RETURNING` inside a statement that also
//! reports what it found:
//!
//! 1. `cur` reads the row under the key;
//! 2. only if no live row is visible, `next` draws a token from the sequence (so hits consume no
//!    tokens and write nothing);
//! 3. `ins` inserts the claim; on a conflict it overwrites the row if it has expired (a takeover)
//!    and otherwise leaves it as it is, returning the latest committed version either way, so a
//!    claim that lost a race to a concurrent one still sees that claim's token, state and
//!    fingerprint;
//! 4. the final `SELECT` tells acquired (the row carries the drawn token), key reuse (both
//!    fingerprints present and different), completed (with the record bytes) and in flight apart.
//!
//! `complete`, `release` and `renew` are each one `UPDATE`/`DELETE` guarded by
//! `token = $token AND state = 'in_flight' AND expires_at > now() - <retention>` (the lease may
//! have ended, as long as nobody took over and the claim is not abandoned); no row means the
//! claim was lost ([`Error::LeaseLost`]) and nothing changed.
//!
//! # Time
//!
//! All times are the server's. Comparisons use `now()`, the start of the statement's own
//! transaction (each statement runs alone): one instant for the whole statement, so all its
//! conditions agree, and a statement that waited for a row lock judges expiry as of its start,
//! which errs towards "still live", never towards an early takeover. New expiry times are counted
//! from `clock_timestamp()`, the moment the row is written, so a lock wait never shortens a lease
//! or a ttl.
//!
//! # Connections
//!
//! [`PostgresStore::connect`] builds a [deadpool](deadpool_postgres) pool without TLS; for TLS
//! or other pool settings build your own pool and use [`PostgresStore::from_pool`]. Connections
//! are recycled with [`RecyclingMethod::Fast`] (no test query, which would cost a statement per
//! call): a connection the server closed (`pg_terminate_backend`, a restart) is dropped when it
//! is next taken from the pool. A connection found broken during a call is removed from the
//! pool, and the statement runs once more on another connection if that is safe: always when it
//! had not reached the server yet, and for `claim`, `get`, `renew` and `purge_expired` in any
//! case (a repeated claim that had reached the server finds that claim in flight, as a retrying
//! caller would). `complete` and `release` that may have reached the server are not repeated:
//! the call fails with [`Error::Store`] (for `complete`, exec then returns the result unstored;
//! a repeat would report a lost lease for a stored result). While the server is down every
//! call fails with [`Error::Store`]; the first call after it is back works.
//!
//! The statements are prepared once per connection, so a pooler in between (PgBouncer) must
//! run in session mode, or in transaction mode with prepared-statement support (1.21+).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{Claim, FencingToken, RecordState, Store, StoredRecord, ABANDONED_CLAIM_RETENTION};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

/// The deadpool-postgres version this store is built with, for [`PostgresStore::from_pool`].
#[doc(no_inline)]
pub use deadpool_postgres;
/// The tokio-postgres version this store is built with.
#[doc(no_inline)]
pub use tokio_postgres;

/// The table [`PostgresStore::connect`] uses.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The size of the pool [`PostgresStore::connect`] builds.
pub const DEFAULT_POOL_SIZE: usize = 16;

const BACKEND: &str = "postgres";
const SEQUENCE_SUFFIX: &str = "_token_seq";
const INDEX_SUFFIX: &str = "_expires_idx";
/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;
/// Rows deleted per statement by [`Store::purge_expired`], so a large purge does not hold one
/// long transaction.
const PURGE_BATCH: i64 = 10_000;
/// Leases and ttls are capped at about a century (and stay exact in a float8 of microseconds).
const MAX_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// A store keeping records in a PostgreSQL table, claim as one `INSERT ... ON CONFLICT`.
///
/// Cloning gives another handle to the same pool and table. See the [module docs](self) for the
/// schema and the statements.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    sql: Arc<Sql>,
}

/// The statements of one table, formatted once.
struct Sql {
    table: String,
    schema: String,
    /// `schema` behind an advisory lock, so processes starting together do not race.
    create: String,
    claim: String,
    complete: String,
    release: String,
    renew: String,
    get: String,
    purge: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStore {
    /// Connects to the server at `url` (`postgres://user:password@host:port/dbname?...`, without
    /// TLS) with a pool of [`DEFAULT_POOL_SIZE`] connections, and creates the table
    /// [`DEFAULT_TABLE`] with its sequence and index if they are missing.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Like [`connect`](Self::connect), with records in `table`: an identifier (ASCII letters,
    /// digits and `_`, not starting with a digit), optionally qualified by an existing schema
    /// (`app.idem_records`). The sequence and the index are named after it (`<table>_token_seq`,
    /// `<table>_expires_idx`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self> {
        let sql = Sql::new(table)?;
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| pg_error("invalid PostgreSQL URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(DEFAULT_POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| {
                Error::store(BACKEND, format!("could not build the connection pool: {e}"))
            })?;
        let store = PostgresStore {
            pool,
            sql: Arc::new(sql),
        };
        store.create_table().await?;
        Ok(store)
    }

    /// A store over a pool you built (for TLS, other pool sizes or timeouts), with records in
    /// `table` (named as for [`connect_with_table`](Self::connect_with_table)). Runs nothing:
    /// call [`create_table`](Self::create_table) unless a migration created the table.
    ///
    /// Prefer [`RecyclingMethod::Fast`] for the pool: `Verified` sends a test query each time a
    /// connection is taken, doubling the statements of a replayed call.
    pub fn from_pool(pool: Pool, table: &str) -> Result<Self> {
        Ok(PostgresStore {
            pool,
            sql: Arc::new(Sql::new(table)?),
        })
    }

    /// Creates the table, its token sequence and its expiry index if they are missing (the
    /// statements of [`schema_sql`](Self::schema_sql), in one transaction, serialised with
    /// other processes doing the same by an advisory lock). The schema must exist.
    pub async fn create_table(&self) -> Result<()> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::store(BACKEND, format!("no connection: {e}")))?;
        let result = client.batch_execute(&self.sql.create).await;
        result.map_err(|e| Failure::new(client, "could not create the table", e, true).error)
    }

    /// The statements that create the table, its sequence and its index, for a migration tool.
    pub fn schema_sql(&self) -> &str {
        &self.sql.schema
    }

    /// The table the records live in, as given.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one prepared statement returning at most one row.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        again: Repeat,
    ) -> Result<Option<Row>> {
        match self.run(sql, params, Want::Row, again).await? {
            Reply::Row(row) => Ok(row),
            Reply::Count(_) => unreachable!("asked for a row"),
        }
    }

    /// Runs one prepared statement and returns how many rows it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        again: Repeat,
    ) -> Result<u64> {
        match self.run(sql, params, Want::Count, again).await? {
            Reply::Count(n) => Ok(n),
            Reply::Row(_) => unreachable!("asked for a count"),
        }
    }

    /// Runs a statement; if its connection turns out to be broken, runs it once more on another
    /// connection when that is safe: always when it failed before reaching the server
    /// (preparing), and after that only for statements that [`Repeat::Safe`] allows.
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        again: Repeat,
    ) -> Result<Reply> {
        match self.attempt(sql, params, want).await {
            Ok(reply) => Ok(reply),
            Err(failure) if failure.broken && (!failure.executing || again == Repeat::Safe) => {
                tracing::debug!(target: "idem", error = %failure.error, "PostgreSQL connection broken; trying another");
                self.attempt(sql, params, want).await.map_err(|f| f.error)
            }
            Err(failure) => Err(failure.error),
        }
    }

    async fn attempt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
    ) -> Result<Reply, Failure> {
        let client = self.pool.get().await.map_err(|e| Failure {
            error: Error::store(BACKEND, format!("no connection: {e}")),
            broken: false,
            executing: false,
        })?;
        let statement = match client.prepare_cached(sql).await {
            Ok(statement) => statement,
            Err(e) => {
                return Err(Failure::new(
                    client,
                    "could not prepare a statement",
                    e,
                    false,
                ))
            }
        };
        let result = match want {
            Want::Row => client.query_opt(&statement, params).await.map(Reply::Row),
            Want::Count => client.execute(&statement, params).await.map(Reply::Count),
        };
        result.map_err(|e| Failure::new(client, "statement failed", e, true))
    }

    /// Runs a guarded `complete`/`release`/`renew`: no row changed means the lease was lost.
    async fn held(
        &self,
        sql: &str,
        key: &StorageKey,
        token: FencingToken,
        extra: &[&(dyn ToSql + Sync)],
        again: Repeat,
    ) -> Result<()> {
        // A token beyond i64 was never issued by the sequence, so it cannot hold the key.
        let Ok(token) = i64::try_from(token.0) else {
            return Err(Error::LeaseLost);
        };
        let key = key.as_str();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&key, &token];
        params.extend_from_slice(extra);
        match self.execute(sql, &params, again).await? {
            0 => Err(Error::LeaseLost),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let fingerprint: Option<&[u8]> = fingerprint.map(|f| &f.0[..]);
        let row = self
            // Repeating a claim that did reach the server finds that claim in flight: the
            // answer a caller retrying after an error would get too.
            .query_opt(
                &self.sql.claim,
                &[&key.as_str(), &fingerprint, &micros(lease)],
                Repeat::Safe,
            )
            .await?
            .ok_or_else(|| Error::store(BACKEND, "claim returned no row"))?;
        let outcome: &str = column(&row, 0)?;
        let token = token(column(&row, 1)?)?;
        Ok(match outcome {
            "acquired" => Claim::Acquired {
                token,
                takeover: column(&row, 3)?,
            },
            "completed" => {
                let record: Option<Vec<u8>> = column(&row, 2)?;
                let record = record.ok_or_else(|| {
                    Error::corrupt("completed PostgreSQL record without record bytes")
                })?;
                Claim::Completed(Bytes::from(record))
            }
            "in_flight" => Claim::InFlight,
            "key_reuse" => Claim::KeyReuse,
            other => {
                return Err(Error::store(
                    BACKEND,
                    format!("claim returned an unknown outcome `{other}`"),
                ))
            }
        })
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        // Repeating a complete that did reach the server would report a lost lease for a
        // stored result; the caller gets `Error::Store` and exec returns the result unstored.
        self.held(
            &self.sql.complete,
            key,
            token,
            &[&record, &micros(ttl)],
            Repeat::Never,
        )
        .await
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.held(&self.sql.release, key, token, &[], Repeat::Never)
            .await
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        self.held(&self.sql.renew, key, token, &[&micros(lease)], Repeat::Safe)
            .await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let Some(row) = self
            .query_opt(&self.sql.get, &[&key.as_str()], Repeat::Safe)
            .await?
        else {
            return Ok(None);
        };
        let token = token(column(&row, 0)?)?;
        let fingerprint: Option<Vec<u8>> = column(&row, 1)?;
        let fingerprint = match fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|b: Vec<u8>| {
                Error::corrupt(format!(
                    "PostgreSQL fingerprint of {} bytes, expected 32",
                    b.len()
                ))
            })?)),
        };
        let state = match column::<&str>(&row, 2)? {
            "in_flight" => RecordState::InFlight { token },
            "completed" => {
                let record: Option<Vec<u8>> = column(&row, 3)?;
                let record = record.ok_or_else(|| {
                    Error::corrupt("completed PostgreSQL record without record bytes")
                })?;
                RecordState::Completed {
                    token,
                    record: Bytes::from(record),
                }
            }
            other => {
                return Err(Error::corrupt(format!(
                    "unknown PostgreSQL record state `{other}`"
                )))
            }
        };
        Ok(Some(StoredRecord { fingerprint, state }))
    }

    async fn purge_expired(&self) -> Result<u64> {
        let mut removed = 0;
        loop {
            let n = self
                .execute(&self.sql.purge, &[&PURGE_BATCH], Repeat::Safe)
                .await?;
            removed += n;
            if n < PURGE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }
}

impl Sql {
    fn new(table: &str) -> Result<Self> {
        let names = Names::new(table)?;
        let Names {
            table: t,
            sequence,
            index,
            sequence_literal,
        } = &names;
        let schema = format!(
            "CREATE TABLE IF NOT EXISTS {t} (
    key         text        PRIMARY KEY,
    token       bigint      NOT NULL,
    fingerprint bytea,
    state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    record      bytea,
    expires_at  timestamptz NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at);
"
        );
        // $1 key, $2 fingerprint, $3 lease in microseconds. See the module docs.
        let claim = format!(
            "WITH cur AS (
    SELECT token, fingerprint, state, record, expires_at > now() AS live
    FROM {t} WHERE key = $1::text
),
next AS MATERIALIZED (
    SELECT nextval({sequence_literal}) AS token
    WHERE NOT EXISTS (SELECT 1 FROM cur WHERE live)
),
ins AS (
    INSERT INTO {t} AS r (key, token, fingerprint, state, record, expires_at)
    SELECT $1::text, next.token, $2::bytea, 'in_flight', NULL,
           clock_timestamp() + $3::bigint * interval '1 microsecond'
    FROM next
    ON CONFLICT (key) DO UPDATE SET
        token       = CASE WHEN r.expires_at <= now() THEN excluded.token       ELSE r.token       END,
        fingerprint = CASE WHEN r.expires_at <= now() THEN excluded.fingerprint ELSE r.fingerprint END,
        state       = CASE WHEN r.expires_at <= now() THEN excluded.state       ELSE r.state       END,
        record      = CASE WHEN r.expires_at <= now() THEN excluded.record      ELSE r.record      END,
        expires_at  = CASE WHEN r.expires_at <= now() THEN excluded.expires_at  ELSE r.expires_at  END
    RETURNING r.token, r.fingerprint, r.state, r.record
),
found AS (
    SELECT token, fingerprint, state, record FROM ins
    UNION ALL
    SELECT token, fingerprint, state, record FROM cur WHERE live
)
SELECT outcome, token,
       CASE WHEN outcome = 'completed' THEN record END AS record,
       outcome = 'acquired' AND EXISTS (SELECT 1 FROM cur WHERE state = 'in_flight') AS takeover
FROM (
    SELECT CASE
               WHEN token = (SELECT token FROM next) THEN 'acquired'
               WHEN fingerprint <> $2::bytea THEN 'key_reuse'
               WHEN state = 'completed' THEN 'completed'
               ELSE 'in_flight'
           END AS outcome,
           token, record
    FROM found
) AS o"
        );
        // In-flight rows whose lease ended longer ago than this are abandoned.
        let abandoned = format!(
            "now() - interval '{} microseconds'",
            ABANDONED_CLAIM_RETENTION.as_micros()
        );
        // The lease may have ended: the row is still the holder's until a takeover replaces it.
        let held = format!(
            "key = $1::text AND token = $2::bigint AND state = 'in_flight' AND expires_at > {abandoned}"
        );
        // Run as one simple query: an implicit transaction, so the lock is held to the end.
        let create = format!(
            "SELECT pg_advisory_xact_lock(hashtext('idem_runtime.create_table:{t}'));\n{schema}"
        );
        Ok(Sql {
            table: table.to_owned(),
            schema,
            create,
            claim,
            complete: format!(
                "UPDATE {t} SET state = 'completed', record = $3::bytea, \
                 expires_at = clock_timestamp() + $4::bigint * interval '1 microsecond' WHERE {held}"
            ),
            release: format!("DELETE FROM {t} WHERE {held}"),
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $3::bigint * interval '1 microsecond' WHERE {held}"
            ),
            get: format!(
                "SELECT token, fingerprint, state, record FROM {t} WHERE key = $1::text
    AND expires_at > CASE WHEN state = 'in_flight' THEN {abandoned} ELSE now() END"
            ),
            // SKIP LOCKED: a row locked right now is being claimed or renewed, so not garbage.
            // One index range scan up to now(); of the in-flight rows in it, only abandoned ones go.
            purge: format!(
                "DELETE FROM {t} WHERE expires_at <= now()
    AND (state = 'completed' OR expires_at <= {abandoned}) AND key IN (
    SELECT key FROM {t} WHERE expires_at <= now()
        AND (state = 'completed' OR expires_at <= {abandoned})
    LIMIT $1::bigint FOR UPDATE SKIP LOCKED
)"
            ),
        })
    }
}

/// The quoted names of a table and its sequence and index.
struct Names {
    table: String,
    sequence: String,
    index: String,
    /// The sequence as a string literal, for `nextval`.
    sequence_literal: String,
}

impl Names {
    fn new(table: &str) -> Result<Self> {
        let invalid = |why: &str| {
            Error::store(
                BACKEND,
                format!("invalid table name `{table}`: {why}; expected `name` or `schema.name` made of ASCII letters, digits and `_`"),
            )
        };
        let (schema, name) = match table.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, table),
        };
        for part in schema.into_iter().chain([name]) {
            let mut chars = part.chars();
            match chars.next() {
                None => return Err(invalid("empty identifier")),
                Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                    return Err(invalid("identifiers start with a letter or `_`"))
                }
                _ => {}
            }
            if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(invalid("only ASCII letters, digits and `_` are allowed"));
            }
        }
        if schema.is_some_and(|s| s.len() > MAX_IDENTIFIER) {
            return Err(invalid("the schema name is longer than 63 bytes"));
        }
        let longest_suffix = SEQUENCE_SUFFIX.len().max(INDEX_SUFFIX.len());
        if name.len() + longest_suffix > MAX_IDENTIFIER {
            return Err(invalid(&format!(
                "the table name is longer than {} bytes (its index name must fit in 63)",
                MAX_IDENTIFIER - longest_suffix
            )));
        }
        // Validated above: no quotes inside, so plain double quotes are a correct quoting, and
        // they keep the case as given and allow reserved words.
        let qualify = |n: &str| match schema {
            Some(s) => format!("\"{s}\".\"{n}\""),
            None => format!("\"{n}\""),
        };
        let sequence = qualify(&format!("{name}{SEQUENCE_SUFFIX}"));
        Ok(Names {
            table: qualify(name),
            sequence_literal: format!("'{sequence}'"),
            sequence,
            index: format!("\"{name}{INDEX_SUFFIX}\""),
        })
    }
}

/// A duration in whole microseconds, capped at [`MAX_MICROS`].
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_MICROS)
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx)
        .map_err(|e| pg_error("unexpected result column", e))
}

fn token(raw: i64) -> Result<FencingToken> {
    u64::try_from(raw)
        .map(FencingToken)
        .map_err(|_| Error::corrupt(format!("negative fencing token {raw} in PostgreSQL")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Row,
    Count,
}

enum Reply {
    Row(Option<Row>),
    Count(u64),
}

/// Whether a statement may run again after its connection broke while it executed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Running it twice gives the same state and a truthful answer.
    Safe,
    /// Only if it never reached the server.
    Never,
}

/// A failed statement: the [`Error::Store`] for the caller, and whether another connection
/// might do better.
struct Failure {
    error: Error,
    /// The connection was closed or is closing; it has been taken out of the pool.
    broken: bool,
    /// The failure came after the statement was sent for execution.
    executing: bool,
}

impl Failure {
    /// Takes the connection out of the pool if it is broken (or clears its statement cache if
    /// its prepared statements went stale), so the next call starts afresh.
    fn new(
        client: Object,
        context: &'static str,
        e: tokio_postgres::Error,
        executing: bool,
    ) -> Self {
        let db = e.as_db_error();
        let broken = match db {
            Some(db) => matches!(
                db.parsed_severity(),
                Some(Severity::Fatal | Severity::Panic)
            ),
            None => true,
        } || client.is_closed();
        if let Some(code) = db.map(|db| db.code()) {
            // A prepared statement the server no longer has, or whose result type changed
            // under it (the table was altered): prepare afresh next time.
            if *code == SqlState::INVALID_SQL_STATEMENT_NAME
                || *code == SqlState::FEATURE_NOT_SUPPORTED
            {
                client.statement_cache.clear();
            }
        }
        if broken {
            // Closed, I/O, protocol, or the server ended the session: never hand it out again.
            drop(Object::take(client));
        }
        Failure {
            error: pg_error(context, e),
            broken,
            executing,
        }
    }
}

fn pg_error(context: &'static str, e: tokio_postgres::Error) -> Error {
    Error::store(BACKEND, PgError { context, inner: e })
}

/// A tokio-postgres error with context, displaying the server's message too (tokio-postgres
/// shows only "db error" and keeps the message in its source).
#[derive(Debug)]
struct PgError {
    context: &'static str,
    inner: tokio_postgres::Error,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.inner)?;
        if let Some(source) = std::error::Error::source(&self.inner) {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        for ok in [
            "idem_records",
            "_x",
            "A1",
            "app.idem_records",
            "Order",
            "user",
        ] {
            assert!(Names::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "idem-records",
            "a.b.c",
            ".t",
            "s.",
            "t; DROP TABLE x",
            "\"t\"",
            "t'",
            "tä",
            &"x".repeat(52),
        ] {
            assert!(
                matches!(
                    Names::new(bad),
                    Err(Error::Store {
                        backend: "postgres",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        assert!(Names::new(&"x".repeat(51)).is_ok());
    }

    #[test]
    fn names_are_quoted_and_derived() {
        let n = Names::new("app.Idem").unwrap();
        assert_eq!(n.table, "\"app\".\"Idem\"");
        assert_eq!(n.sequence, "\"app\".\"Idem_token_seq\"");
        assert_eq!(n.sequence_literal, "'\"app\".\"Idem_token_seq\"'");
        assert_eq!(n.index, "\"Idem_expires_idx\"");
    }

    #[test]
    fn durations_become_capped_micros() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::from_nanos(1999)), 1);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
    }

    #[test]
    fn tokens_from_the_database_are_checked() {
        assert_eq!(token(7).unwrap(), FencingToken(7));
        assert!(matches!(token(-1), Err(Error::Corrupt { .. })));
    }
}
