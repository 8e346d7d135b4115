//! TLS for [`PostgresStore::connect`](super::PostgresStore::connect): the `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` parameters read as libpq reads them, with rustls.
//!
//! tokio-postgres itself knows only `sslmode=disable|prefer|require` and no certificates, so
//! these parameters are taken out of the connection string here, and the connector they ask
//! for is built with rustls, given its crypto provider explicitly (the application's default
//! if it installed one, else the one the `tls-ring` / `tls-aws-lc-rs` features choose; see the
//! `store::tls_provider` module), so connecting installs no process default:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` | if the server offers it | not checked |
//! | `require` | always | not checked, unless a root certificate is given: then as `verify-ca` |
//! | `verify-ca` | always | must chain to a root certificate |
//! | `verify-full` | always | must chain to a root certificate and name the host |
//!
//! Root certificates come from `sslrootcert=<file>` and [`PostgresOptions::root_certificate`]
//! (both are trusted when both are given), else from `~/.postgresql/root.crt` as with libpq;
//! `sslrootcert=system` trusts the system's roots and asks for `verify-full`. Where libpq finds
//! no root certificate for `verify-full` it fails; this store trusts the system's roots
//! instead (`verify-ca` still fails: any public certificate would pass it). Without `sslmode`
//! the store connects without TLS (libpq's default is `prefer`), unless a root certificate is
//! given, which asks for `verify-full`. As with libpq, a certificate without a
//! subjectAltName is checked against its common name.
//!
//! The parameters are read in [`tls_params`](super::tls_params), and the server's certificate
//! is checked by [`tls_verify`](super::tls_verify).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::PoolError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls_params::{mode_name, RootCert, SslMode, TlsParams};
use super::tls_verify::{Verifier, Verify};
use super::{PostgresOptions, BACKEND};
use crate::error::{Error, Result};
use crate::store::tls_provider::crypto_provider;

/// The connector for `params` and `options`: tokio-postgres' own mode, and the rustls
/// connector (`None` for no TLS).
pub(super) fn connector(
    params: &TlsParams,
    options: &PostgresOptions,
) -> Result<(PgSslMode, Option<MakeRustlsConnect>)> {
    let given_root = params.root_cert.is_some() || options.root_certificate.is_some();
    let mode = match params.mode {
        Some(mode) => mode,
        None if given_root => SslMode::VerifyFull,
        None => SslMode::Disable,
    };
    if params.root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(Error::config(format!(
            "sslrootcert=system trusts every publicly trusted certificate, so it needs sslmode=verify-full (not `{}`)",
            mode_name(mode)
        )));
    }
    if params.cert.is_some() != params.key.is_some() {
        return Err(Error::config(
            "a client certificate needs both `sslcert` and `sslkey` in the PostgreSQL URL",
        ));
    }
    if params.cert.is_some() && options.client_certificate.is_some() {
        return Err(Error::config(
            "a client certificate is given both in the PostgreSQL URL (`sslcert`, `sslkey`) and in PostgresOptions::client_certificate: give one",
        ));
    }
    let pg_mode = match mode {
        SslMode::Disable => return Ok((PgSslMode::Disable, None)),
        // tokio-postgres has no `allow` (plain first, TLS if the server insists): `prefer`
        // (TLS first, plain if the server has none) accepts the same servers.
        SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    };

    // The roots: the URL's and the options', else libpq's default file.
    let mut roots: Option<Vec<CertificateDer<'static>>> = None;
    let mut add =
        |certs: Vec<CertificateDer<'static>>| roots.get_or_insert_with(Vec::new).extend(certs);
    let mut system = false;
    match &params.root_cert {
        Some(RootCert::File(path)) => add(read_certs(path, "root certificate (sslrootcert)")?),
        Some(RootCert::System) => system = true,
        None => {}
    }
    if let Some(pem) = &options.root_certificate {
        add(parse_certs(
            pem,
            "root certificate (PostgresOptions::root_certificate)",
        )?);
    }
    if !given_root {
        if let Some(path) = default_root_file().filter(|p| p.is_file()) {
            add(read_certs(
                &path,
                "root certificate (~/.postgresql/root.crt)",
            )?);
        }
    }
    let verify = match mode {
        SslMode::Allow | SslMode::Prefer => Verify::Nothing,
        SslMode::Require if roots.is_none() && !system => Verify::Nothing,
        SslMode::Require | SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::ChainAndName,
        SslMode::Disable => unreachable!("returned above"),
    };
    let root_store = match (verify, roots) {
        (Verify::Nothing, _) => RootCertStore::empty(),
        (_, Some(certs)) => root_store(certs)?,
        (Verify::ChainAndName, None) => system_roots()?,
        (Verify::Chain, None) if system => system_roots()?,
        (Verify::Chain, None) => {
            return Err(Error::config(
                "sslmode=verify-ca needs the CA that signed the server's certificate: give it with sslrootcert=/path/ca.pem or PostgresOptions::root_certificate (or put it in ~/.postgresql/root.crt)",
            ))
        }
    };

    let provider = crypto_provider()?;
    let verifier = Arc::new(Verifier {
        verify,
        roots: Arc::new(root_store),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client = match (&params.cert, &params.key, &options.client_certificate) {
        (Some(cert), Some(key), _) => Some((
            read_certs(cert, "client certificate (sslcert)")?,
            read_key(&std::fs::read(key).map_err(|e| file_error("client key (sslkey)", key, e))?)?,
        )),
        (_, _, Some((cert, key))) => Some((
            parse_certs(
                cert,
                "client certificate (PostgresOptions::client_certificate)",
            )?,
            read_key(key)?,
        )),
        _ => None,
    };
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::config(format!("unusable client certificate or key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok((pg_mode, Some(MakeRustlsConnect::new(config))))
}

/// The error of a first connection that failed at connect: where to (never the password),
/// every cause (deadpool and tokio-postgres show only the outermost), and a hint for TLS
/// failures.
pub(super) fn connect_error(config: &tokio_postgres::Config, e: PoolError) -> Error {
    let hosts = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    Error::store(BACKEND, ConnectError { hosts, source: e })
}

/// A first connection that failed.
#[derive(Debug)]
struct ConnectError {
    hosts: String,
    source: PoolError,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The causes, each once (deadpool repeats the backend's message in its own).
        let mut text = match &self.source {
            PoolError::Backend(e) => e.to_string(),
            other => other.to_string(),
        };
        let mut source = match &self.source {
            PoolError::Backend(e) => std::error::Error::source(e),
            other => std::error::Error::source(other),
        };
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        write!(
            f,
            "could not connect to PostgreSQL at {}: {text}",
            self.hosts
        )?;
        let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
            " (the server's certificate is not signed by a trusted root certificate: give its CA with sslrootcert=/path/ca.pem or PostgresOptions::root_certificate)"
        } else if text.contains("NotValidForName") || text.contains("not valid for name") {
            " (the server's certificate does not name this host: connect through a name it holds, or check the chain only with sslmode=verify-ca)"
        } else if text.contains("server does not support TLS") {
            " (the sslmode asks for TLS, and a plain-text connection is never used instead)"
        } else if text.contains("invalid peer certificate") {
            " (the server's TLS certificate was refused)"
        } else {
            ""
        };
        f.write_str(hint)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// libpq's default root certificate file, `~/.postgresql/root.crt`.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join("root.crt"))
}

fn file_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::config(format!(
        "could not read the {what} file `{}`: {e}",
        path.display()
    ))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| file_error(what, path, e))?;
    parse_certs(&pem, what)
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::config(format!("the {what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "the {what} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

fn read_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| Error::config(format!("the client key is not a PEM private key: {e}")))
}

fn root_store(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| Error::config(format!("unusable root certificate: {e}")))?;
    }
    Ok(store)
}

/// The system's trusted roots.
fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none installed".to_owned(), |e| e.to_string());
        return Err(Error::config(format!(
            "no system root certificates to verify the PostgreSQL server with ({why}): give its CA with sslrootcert=/path/ca.pem or PostgresOptions::root_certificate"
        )));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::super::tls_params::split;
    use super::*;

    #[test]
    fn modes_choose_the_connection_and_the_checks() {
        let options = PostgresOptions::default();
        let mode = |url: &str| {
            let (_, p) = split(url).unwrap();
            connector(&p, &options).map(|(mode, tls)| (mode, tls.is_some()))
        };
        assert_eq!(mode("postgres://db").unwrap(), (PgSslMode::Disable, false));
        assert_eq!(
            mode("postgres://db?sslmode=disable").unwrap(),
            (PgSslMode::Disable, false)
        );
        assert_eq!(
            mode("postgres://db?sslmode=allow").unwrap(),
            (PgSslMode::Prefer, true)
        );
        assert_eq!(
            mode("postgres://db?sslmode=prefer").unwrap(),
            (PgSslMode::Prefer, true)
        );
        assert_eq!(
            mode("postgres://db?sslmode=require").unwrap(),
            (PgSslMode::Require, true)
        );
        // No root certificate for verify-ca: refused rather than trusting any public one.
        if default_root_file().is_none_or(|p| !p.is_file()) {
            assert!(matches!(
                mode("postgres://db?sslmode=verify-ca"),
                Err(Error::Config { .. })
            ));
        }
        for weak in ["require", "verify-ca", "prefer", "disable"] {
            assert!(
                matches!(
                    mode(&format!("postgres://db?sslmode={weak}&sslrootcert=system")),
                    Err(Error::Config { .. })
                ),
                "{weak}"
            );
        }
        assert!(matches!(
            mode("postgres://db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            mode("postgres://db?sslmode=require&sslcert=/c.pem"),
            Err(Error::Config { .. })
        ));
    }
}
