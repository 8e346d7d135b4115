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
//! a migration tool), and adds the `steps` column to a table an earlier version made without it
//! (`ALTER TABLE ... ADD COLUMN IF NOT EXISTS`: a nullable column without a default, so the
//! table is not rewritten). It first reads the catalog, and runs no DDL when all of them are
//! there: an `ALTER TABLE` takes the table's ACCESS EXCLUSIVE lock even when it changes nothing,
//! so every process that starts would queue the claims behind it, and behind any long
//! transaction on the table (a role that may not create anything then connects too). With
//! [`PostgresOptions::create_table`]`(false)` it runs no DDL and
//! only checks that the table, its `steps` and readable columns and the sequence exist, refusing with
//! [`Error::Config`] that names what to run; the role then needs `SELECT, INSERT, UPDATE,
//! DELETE` on the table and `USAGE` on the sequence (`LISTEN`/`NOTIFY` need no grant):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS idem_records (
//!     key         text        PRIMARY KEY,  -- hex(SHA-256(scope, 0x00, user key)), never raw user input
//!     token       bigint      NOT NULL,     -- fencing token of the latest claim
//!     fingerprint bytea,                    -- NULL: matches any request
//!     state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
//!     record      bytea,                    -- the encoded record, once completed
//!     expires_at  timestamptz NOT NULL,     -- end of the lease while in flight, of the ttl once completed
//!     steps       bytea,                    -- the call's steps while in flight (NULL: none), see below
//!     -- Readable columns, for operators (see "Reading records with SQL" in the README); the
//!     -- engine reads only the columns above, `record` being the source of truth:
//!     operation       text,                 -- the operation's name (NULL in flight, for plain calls)
//!     status          text,                 -- 'processing', 'completed', 'failed' (a kept error), 'unknown'
//!     result          jsonb,                -- the stored answer, when it is JSON
//!     created_at      timestamptz,          -- the time of the claim that holds or completed the row
//!     completed_at    timestamptz,          -- when the result was stored
//!     fingerprint_hex text                  -- the fingerprint in hex
//! );
//! -- A table made before steps existed gets the column (no rewrite: nullable, no default).
//! ALTER TABLE idem_records ADD COLUMN IF NOT EXISTS steps bytea;
//! -- A table made before the readable columns gets them the same way (one statement).
//! ALTER TABLE idem_records ADD COLUMN IF NOT EXISTS operation text, ADD COLUMN IF NOT EXISTS status text, ...;
//! -- Fencing tokens: strictly increasing across the whole table, across takeovers and deletes.
//! -- Not owned by the table, so `TRUNCATE ... RESTART IDENTITY` cannot rewind it.
//! CREATE SEQUENCE IF NOT EXISTS idem_records_token_seq AS bigint MINVALUE 1 CACHE 1 NO CYCLE;
//! -- For purging: `DELETE ... WHERE expires_at <= now() AND ...` walks this index, not the table.
//! CREATE INDEX IF NOT EXISTS idem_records_expires_idx ON idem_records (expires_at);
//! -- For operators: stuck claims and unknown outcomes by status and age.
//! CREATE INDEX IF NOT EXISTS idem_records_status_idx ON idem_records (status, created_at);
//! ```
//!
//! The readable columns are derived from the record when it is written (by the record module,
//! the same way for every store) and never read back: rows written before they existed hold
//! `NULL` there and are still read, checked and replayed through `record`.
//!
//! A record is live (stands in a claim's way) while `expires_at > now()`. A completed row past
//! its ttl counts as absent. An in-flight row past its lease may be taken over by
//! [`claim`](super::Store::claim), but until then it stays its holder's: `complete`, `renew`
//! and `release` with its token still work, and [`get`](super::Store::get) reports it. Only
//! once its lease ended more than [`ABANDONED_CLAIM_RETENTION`](super::ABANDONED_CLAIM_RETENTION)
//! ago is it abandoned and counts as absent. [`purge_expired`](super::Store::purge_expired)
//! removes completed rows past their ttl and abandoned in-flight rows; a store that
//! [`connect`](PostgresStore::connect)s runs it in the background, in bounded batches (see
//! [`PostgresOptions`] for the schedule, its cost, and how to turn it off).
//!
//! # One statement per step
//!
//! Every [`Store`](super::Store) method is a single prepared statement (cached per pooled
//! connection), so a replayed call costs one statement and a first call two (claim, then
//! complete). The claim is one `INSERT ... ON CONFLICT (key) DO UPDATE ... RETURNING` inside a
//! statement that also reports what it found:
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
//! A call's steps live in its own row, in `steps`: frames of (u32 big-endian name length, the
//! name, u32 big-endian record length, the record). [`save_step`](super::Store::save_step) is
//! one `UPDATE ... SET steps = coalesce(steps, '') || <frame>` under the same guard, so it never
//! reads the steps; a name saved again is appended again and its last frame counts.
//! [`load_steps`](super::Store::load_steps) is one `SELECT` under the guard. The guard holds
//! against a concurrent takeover at `READ COMMITTED`: an `UPDATE` that waited for the row's lock
//! checks its `WHERE` again on the row the other writer left, so a step is either saved before
//! a takeover, which keeps it for the new holder, or refused. A claim that takes over an
//! in-flight row keeps its steps, one that acquires a completed row past its ttl sets them to
//! `NULL`, as `complete` does; `release`, `forget` and the purge delete them with the row.
//!
//! Waiters woken together share their claims: when a `complete` wakes the calls of this process
//! that wait for its key (see [`wait_for_change`](super::Store::wait_for_change)), the first of
//! them to claim lets the others reach their claims, and those of the same fingerprint that do
//! before it has a connection get its answer instead of sending a statement each (in flight for
//! them if it acquired the key). Every claim that joins began before the shared statement was
//! sent, and ends after its answer, so each gets the answer it would have had on its own right
//! after that statement. Calls nobody waits beside claim alone, as above.
//!
//! For operators, [`forget`](super::Store::forget) is one statement that locks the key's row
//! (`SELECT ... FOR UPDATE`), deletes it if it is completed or the removal is forced, and
//! reports what it found; the sequence never hands a token out twice, so a forgotten holder
//! stays fenced off after a new claim. [`scan`](super::Store::scan) pages through the table in
//! key order (`WHERE key > <cursor> ORDER BY key LIMIT n`, the cursor being the last key of the
//! page), and [`purge_expired_up_to`](super::Store::purge_expired_up_to) is one batch of the
//! purge. A listing's `claimed_at` is the row's `created_at`, the time of its latest acquiring
//! claim (`None` for rows claimed before the column existed).
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
//! [`PostgresStore::connect`] builds a [deadpool](deadpool_postgres) pool, with TLS as the URL
//! asks (see [TLS](#tls)); [`PostgresStore::connect_with`] takes the table, the pool's size and
//! certificates as [`PostgresOptions`]; for other pool settings build your own pool and use
//! [`PostgresStore::from_pool`]. Connections
//! are recycled with [`RecyclingMethod::Fast`] (no test query, which would cost a statement per
//! call): a connection the server closed (`pg_terminate_backend`, a restart) is dropped when it
//! is next taken from the pool. A connection found broken during a call is removed from the
//! pool, and the statement runs once more on another connection if that is safe: always when it
//! had not reached the server yet, and for `claim`, `get`, `renew`, `purge_expired`, `scan`,
//! `save_step` and `load_steps` in any case (a repeated claim that had reached the server finds
//! that claim in flight, as a retrying caller would; a repeated `save_step` appends the same
//! frame again, which counts once). `complete`, `release` and `forget` that may have reached
//! the server are not repeated: the call fails with [`Error::Store`] (for `complete`, exec then
//! returns the result unstored; a repeat would report a lost lease for a stored result, or a
//! forgotten record as absent). While the server is down every call fails with
//! [`Error::Store`]; the first call after it is back works.
//!
//! The statements are prepared once per connection, so a pooler in between (PgBouncer) must
//! run in session mode, or in transaction mode with prepared-statement support (1.21+).
//!
//! # TLS
//!
//! TLS is rustls (no OpenSSL). The URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` mean
//! what they mean to libpq (and `psql`):
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` | if the server offers it | not checked |
//! | `require` | always: a server without TLS is refused | not checked, unless a root certificate is given: then as `verify-ca` |
//! | `verify-ca` | always | must chain to a root certificate |
//! | `verify-full` | always | must chain to a root certificate and name the URL's host |
//!
//! - Root certificates: `sslrootcert=/path/ca.pem` and [`PostgresOptions::root_certificate`]
//!   (both trusted when both are given), else `~/.postgresql/root.crt` if it exists, as with
//!   libpq. `sslrootcert=system` trusts the system's roots and needs `verify-full`. With no root
//!   certificate, `verify-full` trusts the system's roots (libpq fails instead) and `verify-ca`
//!   is refused, as any public certificate would pass it.
//! - Without `sslmode` the connection is plain text, as in earlier versions (libpq's default is
//!   `prefer`, which checks nothing; write it to get it), unless a root certificate is given:
//!   then `verify-full`.
//! - `allow` is served as `prefer` (TLS first); `prefer` falls back to plain text only when the
//!   server has no TLS, not when the handshake fails.
//! - The host name is checked against the certificate's subjectAltNames, or, for a certificate
//!   without any, its common name, as libpq does; an IP address in the URL must be an IP
//!   subjectAltName.
//! - Client certificates: `sslcert` and `sslkey` (both files), or
//!   [`PostgresOptions::client_certificate`].
//! - A wrong CA, a host name the certificate does not name, or a server without TLS where the
//!   mode requires it is an [`Error::Store`] at connect, never a plain-text connection.
//! - rustls uses the process's default crypto provider if the application installed one, else
//!   the one the `tls-ring` (default) or `tls-aws-lc-rs` features choose, passed explicitly:
//!   connecting installs no process default.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::FencingToken;
use crate::engine::PurgerHandle;
use crate::error::{Error, Result};
use crate::key::StorageKey;

mod failure;
mod notify;
mod options;
mod protocol;
mod row;
mod sql;
mod tls;
mod tls_params;
mod tls_verify;
use failure::{pg_error, Failure};
use notify::{Leader, Listen, Notifier, Plan};
pub use options::PostgresOptions;
use sql::Sql;

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
/// A store keeping records in a PostgreSQL table, claim as one `INSERT ... ON CONFLICT`.
///
/// Cloning gives another handle to the same pool and table. See the [module docs](self) for the
/// schema and the statements.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    sql: Arc<Sql>,
    /// Wakes waiters when a key they wait for changes (`None` on a pool the user built: its
    /// waiters poll).
    notifier: Option<Arc<Notifier>>,
    /// The background purger, if the options asked for one: stopped when the last clone of the
    /// store is dropped. Its task holds only weak references to the pool and the statements.
    purger: Option<Arc<PurgerHandle>>,
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
    /// Connects to the server at `url` with a pool of [`DEFAULT_POOL_SIZE`] connections,
    /// creates the table [`DEFAULT_TABLE`] with its sequence and index if they are missing, and
    /// starts purging expired rows in the background: [`connect_with`](Self::connect_with) with
    /// the default [`PostgresOptions`].
    ///
    /// `url` is a `postgres://user:password@host:port/dbname?...` URL or a `key=value`
    /// connection string. Its `sslmode` (`disable`, `allow`, `prefer`, `require`, `verify-ca`,
    /// `verify-full`), `sslrootcert`, `sslcert` and `sslkey` are read as libpq reads them (see
    /// [TLS](self#tls)); without `sslmode` the connection is plain text.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &PostgresOptions::default()).await
    }

    /// Like [`connect`](Self::connect), with records in `table`: an identifier (ASCII letters,
    /// digits and `_`, not starting with a digit), optionally qualified by an existing schema
    /// (`app.idem_records`). The sequence and the index are named after it (`<table>_token_seq`,
    /// `<table>_expires_idx`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self> {
        Self::connect_with(url, &PostgresOptions::default().table(table)).await
    }

    /// Like [`connect`](Self::connect), with `options`: the table, the pool's size, TLS
    /// certificates given in code rather than as files named in the URL, whether to create the
    /// table ([`PostgresOptions::create_table`]) and whether and how often to purge in the
    /// background ([`PostgresOptions::purge_in_background`], [`PostgresOptions::purger`]).
    ///
    /// Without `create_table`, a table or token sequence that does not exist (or that the role
    /// cannot see) is [`Error::Config`] naming it, and so is a table without the `steps` column
    /// (made by an earlier version), naming the statement that adds it; nothing is created or
    /// changed.
    pub async fn connect_with(url: &str, options: &PostgresOptions) -> Result<Self> {
        let sql = Sql::new(&options.table)?;
        let (url, tls_params) = tls_params::split(url)?;
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| pg_error("invalid PostgreSQL URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let (ssl_mode, tls) = tls::connector(&tls_params, options)?;
        config.ssl_mode(ssl_mode);
        let pg_config = config.clone();
        let manager_config = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls_for_listen = tls.clone();
        let manager = match tls {
            Some(tls) => Manager::from_config(config, tls, manager_config()),
            None => Manager::from_config(config, NoTls, manager_config()),
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| {
                Error::store(BACKEND, format!("could not build the connection pool: {e}"))
            })?;
        // A first connection, whose failure (a TLS one above all) says where to and why; it
        // goes back to the pool for the statements that follow.
        drop(
            pool.get()
                .await
                .map_err(|e| tls::connect_error(&pg_config, e))?,
        );
        let notifier = Notifier::new(Listen {
            config: pg_config,
            tls: tls_for_listen,
            channel: sql.channel.clone(),
        });
        let mut store = PostgresStore {
            pool,
            sql: Arc::new(sql),
            notifier: Some(Arc::new(notifier)),
            purger: None,
        };
        if options.create_table {
            // DDL only when something is missing: it locks the table even when it changes
            // nothing (see check.sql).
            if !store.table_state().await?.complete() {
                store.create_table().await?;
            }
        } else {
            store.check_table().await?;
        }
        if options.purge_in_background {
            let (pool, sql) = (store.pool.weak(), Arc::downgrade(&store.sql));
            // The purger's handle on the store: no notifier (purging wakes no waiter) and no
            // purger of its own; gone once every clone of the store (the only holders of `sql`)
            // is dropped.
            let handle = options.purger.spawn_upgrading(move || {
                Some(PostgresStore {
                    sql: sql.upgrade()?,
                    pool: pool.upgrade()?,
                    notifier: None,
                    purger: None,
                })
            })?;
            store.purger = Some(Arc::new(handle));
        }
        Ok(store)
    }

    /// A store over a pool you built (for other pool settings or timeouts), with records in
    /// `table` (named as for [`connect_with_table`](Self::connect_with_table)). Runs nothing:
    /// call [`create_table`](Self::create_table) unless a migration created the table, and
    /// starts no purger: run [`Purger::spawn_for`](crate::Purger::spawn_for) on it (in an
    /// `Arc`), or purge from a periodic job.
    ///
    /// Prefer [`RecyclingMethod::Fast`] for the pool: `Verified` sends a test query each time a
    /// connection is taken, doubling the statements of a replayed call.
    pub fn from_pool(pool: Pool, table: &str) -> Result<Self> {
        Ok(PostgresStore {
            pool,
            sql: Arc::new(Sql::new(table)?),
            notifier: None,
            purger: None,
        })
    }

    /// Checks, creating nothing, that the table and its token sequence exist and this role can
    /// see them, and that the table has the `steps` column and the readable columns;
    /// [`Error::Config`] names what is missing and what to run.
    async fn check_table(&self) -> Result<()> {
        // A missing index costs speed, not correctness: not this check's to refuse.
        let state = self.table_state().await?;
        let missing = match (state.table, state.sequence) {
            (true, true) => None,
            (false, _) => Some(format!("table `{}`", self.sql.table)),
            (true, false) => Some(format!(
                "token sequence `{}` of the table `{}`",
                self.sql.sequence, self.sql.table
            )),
        };
        if let Some(missing) = missing {
            return Err(Error::config(format!(
                "the PostgreSQL {missing} does not exist (or this role cannot see it), and creating it is off (nothing was created): check the table name, or have a role that may create tables run the statements of `PostgresStore::schema_sql` (the README's \"PostgreSQL without DDL\" lists them), or connect once with `PostgresOptions::create_table(true)`"
            )));
        }
        // A table made by an earlier version: one statement per group of columns, no table
        // rewrite (the columns are nullable, without a default).
        let mut absent = Vec::new();
        let mut statements = Vec::new();
        if !state.steps {
            absent.push("column `steps`");
            statements.push(self.sql.add_steps.as_str());
        }
        if !state.readable {
            absent.push(
                "readable columns (`operation`, `status`, `result`, `created_at`, `completed_at`, `fingerprint_hex`)",
            );
            statements.push(self.sql.add_readable.as_str());
        }
        if absent.is_empty() {
            return Ok(());
        }
        Err(Error::config(format!(
            "the PostgreSQL table `{}` has no {} (it was made by an earlier version of idem), and changing it is off (nothing was changed): have a role that may alter the table run `{}`, or connect once with `PostgresOptions::create_table(true)`",
            self.sql.table,
            absent.join(" and no "),
            statements.join(" ")
        )))
    }

    /// What of the table exists (as this role sees it).
    async fn table_state(&self) -> Result<TableState> {
        let row = self
            .query_opt(&self.sql.check, &[], Repeat::Safe)
            .await?
            .ok_or_else(|| Error::store(BACKEND, "the table check returned no row"))?;
        Ok(TableState {
            table: row.get(0),
            sequence: row.get(1),
            steps: row.get(2),
            index: row.get(3),
            readable: row.get(4),
            status_index: row.get(5),
        })
    }

    /// Creates the table, its token sequence and its expiry index if they are missing, and adds
    /// the `steps` column to a table made by an earlier version (the statements of
    /// [`schema_sql`](Self::schema_sql), in one transaction, serialised with other processes
    /// doing the same by an advisory lock). The schema must exist.
    pub async fn create_table(&self) -> Result<()> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::store(BACKEND, format!("no connection: {e}")))?;
        let result = client.batch_execute(&self.sql.create).await;
        result.map_err(|e| Failure::new(client, "could not create the table", e, true).error)
    }

    /// The statements that create the table, its sequence and its index, and add the `steps`
    /// column to a table made by an earlier version, for a migration tool.
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
        self.query_opt_led(sql, params, again, None).await
    }

    /// [`query_opt`](Self::query_opt) for a claim gathering others: `leader` closes the
    /// gathering once a connection is in hand, before the statement is sent.
    async fn query_opt_led(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        again: Repeat,
        leader: Option<&Leader<'_>>,
    ) -> Result<Option<Row>> {
        match self.run(sql, params, Want::Row, again, leader).await? {
            Reply::Row(row) => Ok(row),
            _ => unreachable!("asked for a row"),
        }
    }

    /// Runs one prepared statement and returns its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        again: Repeat,
    ) -> Result<Vec<Row>> {
        match self.run(sql, params, Want::Rows, again, None).await? {
            Reply::Rows(rows) => Ok(rows),
            _ => unreachable!("asked for rows"),
        }
    }

    /// Runs one prepared statement and returns how many rows it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        again: Repeat,
    ) -> Result<u64> {
        match self.run(sql, params, Want::Count, again, None).await? {
            Reply::Count(n) => Ok(n),
            _ => unreachable!("asked for a count"),
        }
    }

    /// Runs a statement; if its connection turns out to be broken, runs it again on another
    /// connection when that is safe: as long as it failed before reaching execution (preparing:
    /// nothing ran), on up to every connection of the pool plus one (a server that ended every
    /// session leaves that many dead connections, each taken out of the pool as it is found),
    /// and once after execution began, for statements that [`Repeat::Safe`] allows. A
    /// `leader`'s gathering is closed once the first connection is in hand.
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        again: Repeat,
        leader: Option<&Leader<'_>>,
    ) -> Result<Reply> {
        let mut unsent_retries = self.pool.status().max_size + 1;
        let mut executed_retry = again == Repeat::Safe;
        loop {
            match self.attempt(sql, params, want, leader).await {
                Ok(reply) => return Ok(reply),
                Err(failure) if failure.broken && !failure.executing && unsent_retries > 0 => {
                    unsent_retries -= 1;
                    tracing::debug!(target: "idem", error = %failure.error, "PostgreSQL connection broken before the statement ran; trying another");
                }
                Err(failure) if failure.broken && failure.executing && executed_retry => {
                    executed_retry = false;
                    tracing::debug!(target: "idem", error = %failure.error, "PostgreSQL connection broken; trying another");
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    async fn attempt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        leader: Option<&Leader<'_>>,
    ) -> Result<Reply, Failure> {
        let client = self.pool.get().await.map_err(|e| Failure {
            error: Error::store(BACKEND, format!("no connection: {e}")),
            broken: false,
            executing: false,
        })?;
        if let Some(leader) = leader {
            leader.close();
        }
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
            Want::Rows => client.query(&statement, params).await.map(Reply::Rows),
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
            return Err(Error::lease_lost(key));
        };
        let hex = key.as_str();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&hex, &token];
        params.extend_from_slice(extra);
        match self.execute(sql, &params, again).await? {
            0 => Err(Error::lease_lost(key)),
            _ => Ok(()),
        }
    }
}

/// What of a table exists: the row of check.sql.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TableState {
    table: bool,
    sequence: bool,
    steps: bool,
    /// The expiry index.
    index: bool,
    /// The readable columns (`operation`, `status`, `result`, `created_at`, `completed_at`,
    /// `fingerprint_hex`), all six.
    readable: bool,
    status_index: bool,
}

impl TableState {
    /// Whether everything `schema.sql` makes is there, so connecting runs no DDL.
    fn complete(&self) -> bool {
        self.table
            && self.sequence
            && self.steps
            && self.index
            && self.readable
            && self.status_index
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Row,
    Rows,
    Count,
}

enum Reply {
    Row(Option<Row>),
    Rows(Vec<Row>),
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
