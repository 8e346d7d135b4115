//! The settings of a [`PostgresStore`](super::PostgresStore) beyond its URL.

use std::fmt;

use super::{DEFAULT_POOL_SIZE, DEFAULT_TABLE};
use crate::engine::Purger;

/// Settings of a [`PostgresStore`](super::PostgresStore) beyond its URL, for
/// [`PostgresStore::connect_with`](super::PostgresStore::connect_with).
///
/// ```no_run
/// # use idem_runtime as idempotency;
/// # async fn demo() -> idempotency::Result<()> {
/// use idempotency::store::postgres::{PostgresOptions, PostgresStore};
///
/// let ca = std::fs::read("/etc/idem/db-ca.pem").expect("the CA");
/// let options = PostgresOptions::new().table("app.idem_records").root_certificate(ca);
/// let store =
///     PostgresStore::connect_with("postgres://app@db.internal/app?sslmode=verify-full", &options)
///         .await?;
/// # Ok(()) }
/// ```
///
/// # Without DDL
///
/// By default [`connect_with`](super::PostgresStore::connect_with) creates the table, its
/// token sequence and its expiry index if they are missing, which needs a role that may create
/// tables in the schema. With [`create_table(false)`](Self::create_table) it runs no DDL: it
/// only checks that the table and its sequence exist (a missing one is
/// [`Error::Config`](crate::Error::Config) naming it), so the runtime role needs no more than
/// `SELECT, INSERT, UPDATE, DELETE` on the table and `USAGE` on the sequence. The statements a
/// DBA runs are [`PostgresStore::schema_sql`](super::PostgresStore::schema_sql) (and the
/// README's "PostgreSQL without DDL").
///
/// # Background purge
///
/// By default the store starts a [`Purger`] with its defaults when it connects: every minute
/// (± 10%, so processes started together drift apart) it deletes completed rows past their ttl
/// and claims abandoned for [`ABANDONED_CLAIM_RETENTION`](crate::ABANDONED_CLAIM_RETENTION), in
/// batches of at most 1000 rows, each one `DELETE ... LIMIT ... FOR UPDATE SKIP LOCKED`
/// statement (an index range scan up to `now()`; rows being claimed are skipped), until a batch
/// removes fewer. Its cost: one such bounded statement and one pooled connection for its
/// duration, per interval per process, more only while there is a backlog. The task holds the
/// store only by a weak reference, so it ends once the store (every clone of it) is dropped.
/// Turn it off with [`purge_in_background(false)`](Self::purge_in_background), for example
/// where one periodic job runs `idem purge` for every process. (Redis needs none: its records
/// carry a TTL and the server expires them.)
#[derive(Clone)]
pub struct PostgresOptions {
    pub(super) table: String,
    pub(super) pool_size: usize,
    /// PEM certificates to trust, as with `sslrootcert`.
    pub(super) root_certificate: Option<Vec<u8>>,
    /// A PEM certificate chain and its PEM private key, as with `sslcert` and `sslkey`.
    pub(super) client_certificate: Option<(Vec<u8>, Vec<u8>)>,
    /// Whether connecting creates the table, its sequence and its index when missing.
    pub(super) create_table: bool,
    /// Whether connecting starts [`Self::purger`].
    pub(super) purge_in_background: bool,
    pub(super) purger: Purger,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table: DEFAULT_TABLE.into(),
            pool_size: DEFAULT_POOL_SIZE,
            root_certificate: None,
            client_certificate: None,
            create_table: true,
            purge_in_background: true,
            purger: Purger::new(),
        }
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.debug_struct("PostgresOptions")
            .field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .field("root_certificate", &self.root_certificate.is_some())
            .field("client_certificate", &self.client_certificate.is_some())
            .field("create_table", &self.create_table)
            .field("purge_in_background", &self.purge_in_background)
            .field("purger", &self.purger)
            .finish()
    }
}

impl PostgresOptions {
    /// The defaults: table [`DEFAULT_TABLE`], [`DEFAULT_POOL_SIZE`] connections, the URL's TLS
    /// settings, the table created if missing, a [`Purger`] with its defaults in the background.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep records in `table`, named as for
    /// [`connect_with_table`](super::PostgresStore::connect_with_table).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Pool at most `size` connections (at least 1).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Trust the certificate authorities in `pem` (one or more PEM certificates), as
    /// `sslrootcert=<file>` in the URL does (when both are given, both are trusted): with
    /// `sslmode=require` or `verify-ca` the server's certificate must chain to one of them, with
    /// `verify-full` (the mode when the URL gives no `sslmode`) it must also name the host.
    /// `sslmode=disable`, `allow` and `prefer` check no certificate.
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Present `cert` (a PEM certificate chain) and `key` (its PEM private key: PKCS#8, PKCS#1
    /// or SEC1) to a server that authenticates clients by certificate, as `sslcert` and
    /// `sslkey` in the URL do (give one or the other).
    pub fn client_certificate(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Whether connecting creates the table, its token sequence and its expiry index when they
    /// are missing: `true` by default. With `false` it runs no DDL and only checks that the
    /// table and its sequence exist; a missing one is [`Error::Config`](crate::Error::Config)
    /// naming it, and nothing is created (see [Without DDL](#without-ddl)).
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// Whether to purge expired rows in the background (see
    /// [Background purge](#background-purge)): `true` by default.
    pub fn purge_in_background(mut self, purge: bool) -> Self {
        self.purge_in_background = purge;
        self
    }

    /// The schedule of the background purge (interval, batch, jitter), [`Purger::new`]'s by
    /// default; whether it runs is [`purge_in_background`](Self::purge_in_background). A zero
    /// interval or batch, or a jitter outside `[0, 1)`, is
    /// [`Error::Config`](crate::Error::Config) at connect with the purge on.
    pub fn purger(mut self, purger: Purger) -> Self {
        self.purger = purger;
        self
    }
}
