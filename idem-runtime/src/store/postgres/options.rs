//! The settings of a [`PostgresStore`](super::PostgresStore) beyond its URL.

use std::fmt;

use super::{DEFAULT_POOL_SIZE, DEFAULT_TABLE};

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
#[derive(Clone)]
pub struct PostgresOptions {
    pub(super) table: String,
    pub(super) pool_size: usize,
    /// PEM certificates to trust, as with `sslrootcert`.
    pub(super) root_certificate: Option<Vec<u8>>,
    /// A PEM certificate chain and its PEM private key, as with `sslcert` and `sslkey`.
    pub(super) client_certificate: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table: DEFAULT_TABLE.into(),
            pool_size: DEFAULT_POOL_SIZE,
            root_certificate: None,
            client_certificate: None,
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
            .finish()
    }
}

impl PostgresOptions {
    /// The defaults: table [`DEFAULT_TABLE`], [`DEFAULT_POOL_SIZE`] connections, the URL's TLS
    /// settings.
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
}
