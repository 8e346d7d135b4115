//! TLS for Redis connections: the `ca`, `cert` and `key` parameters of a `rediss://` URL and
//! the certificates of [`RedisOptions`], the rustls crypto provider, and the errors of TLS
//! connections that failed.
//!
//! The `redis` crate builds the rustls configuration of a `rediss://` connection itself, with
//! `ClientConfig::builder()`, which needs a process-wide default crypto provider (and installs
//! the one rustls' features name when there is none). Neither `Client::build_with_tls` nor the
//! cluster builder takes a configuration or a provider, so a `rediss://` store makes sure there
//! is a default before it connects: the application's, if it installed one first, else the
//! provider of the `tls-ring` / `tls-aws-lc-rs` features (`store::tls_provider`). An
//! application that installs its own must do so before it connects a `rediss://` store; plain
//! `redis://` stores and PostgreSQL stores install nothing.

use std::fmt;

use redis::{ClientTlsConfig, ConnectionAddr, RedisError, TlsCertificates};

use super::options::take_param;
use super::{redis_error, store_error, RedisOptions};
use crate::error::{Error, Result};
use crate::store::tls_provider::install_for_redis;

/// The TLS settings of a `rediss://` URL.
pub(super) struct Tls {
    /// Certificates beyond the system's roots, if any were given.
    pub(super) certificates: Option<TlsCertificates>,
}

/// `url` without idem's TLS parameters (`ca`, `cert`, `key`: paths of PEM files), and the TLS
/// settings of a `rediss://` URL (`None` for a plain one). The URL's and `options`'
/// certificates are combined: both roots are trusted; one client certificate may be given.
pub(super) fn tls_settings(url: &str, options: &RedisOptions) -> Result<(String, Option<Tls>)> {
    let (url, ca) = take_param(url, "ca");
    let (url, cert) = take_param(&url, "cert");
    let (url, key) = take_param(&url, "key");
    let is_tls = url.starts_with("rediss://") || url.starts_with("valkeys://");
    if !is_tls {
        if ca.is_some() || cert.is_some() || key.is_some() {
            return Err(Error::config(
                "`ca`, `cert` and `key` in a Redis URL are TLS settings: use a `rediss://` URL",
            ));
        }
        return Ok((url, None));
    }
    if url.contains('#') {
        return Err(Error::config(
            "a `rediss://` URL with a fragment (`#insecure`) is not supported: the server's certificate is always verified; give its CA with `?ca=/path/ca.pem` or RedisOptions::root_certificate",
        ));
    }
    let mut root = options.root_certificate.clone();
    if let Some(path) = ca {
        let mut pem = read_pem(&path, "CA certificate (`ca`)")?;
        if let Some(given) = root.take() {
            pem.push(b'\n');
            pem.extend_from_slice(&given);
        }
        root = Some(pem);
    }
    let client_tls = match (cert, key, &options.client_certificate) {
        (None, None, None) => None,
        (None, None, Some((cert, key))) => Some(ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        (Some(cert), Some(key), None) => Some(ClientTlsConfig {
            client_cert: read_pem(&cert, "client certificate (`cert`)")?,
            client_key: read_pem(&key, "client key (`key`)")?,
        }),
        (Some(_), Some(_), Some(_)) => {
            return Err(Error::config(
                "a client certificate is given both in the Redis URL (`cert`, `key`) and in RedisOptions::client_certificate: give one",
            ))
        }
        _ => {
            return Err(Error::config(
                "a client certificate needs both `cert` and `key` in the Redis URL",
            ))
        }
    };
    let certificates = (root.is_some() || client_tls.is_some()).then_some(TlsCertificates {
        client_tls,
        root_cert: root,
    });
    // The redis crate builds its rustls configuration with the process's default provider.
    install_for_redis()?;
    Ok((url, Some(Tls { certificates })))
}

/// Refuses a URL whose scheme and TLS settings disagree (never expected: `tls_settings` reads
/// both from the URL), so that certificates can never turn a plain URL into a TLS one or the
/// reverse go unnoticed.
pub(super) fn check_tls(addr: &ConnectionAddr, tls: Option<&Tls>) -> Result<()> {
    let url_tls = matches!(addr, ConnectionAddr::TcpTls { .. });
    if url_tls != tls.is_some() {
        return Err(Error::config(
            "only a `rediss://` URL connects to Redis with TLS",
        ));
    }
    Ok(())
}

/// The contents of the PEM file at `path`.
fn read_pem(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::config(format!("could not read the {what} file `{path}`: {e}")))
}

/// The error of a failed connection to `address`, saying so for a TLS connection (whose
/// failure may be a certificate the client does not trust, or a server without TLS).
pub(super) fn connect_error(address: &str, tls: bool, e: RedisError) -> Error {
    if !tls || !e.is_io_error() {
        return redis_error(e);
    }
    store_error(TlsError {
        address: address.to_owned(),
        source: e,
    })
}

/// A TLS connection that failed.
#[derive(Debug)]
struct TlsError {
    address: String,
    source: RedisError,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLS connection to Redis at {} failed: {}",
            self.address, self.source
        )?;
        let text = self.source.to_string();
        let hint = if text.contains("not valid for name") || text.contains("NotValidForName") {
            " (the server's certificate does not name this host: connect through a name it holds)"
        } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
            " (the server's certificate is not signed by a trusted CA: give its CA with `?ca=/path/ca.pem` or RedisOptions::root_certificate)"
        } else if text.contains("invalid peer certificate") {
            " (the server's TLS certificate was refused)"
        } else if text.contains("corrupt message") || text.contains("InvalidContentType") {
            " (the server did not answer in TLS: is it a plain-text port?)"
        } else if text.contains("timed out") {
            " (no TLS handshake in time: a plain-text server waits for a command instead; is the port one with TLS?)"
        } else {
            ""
        };
        f.write_str(hint)
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, options: &RedisOptions) -> Result<(String, Option<Tls>)> {
        tls_settings(url, options)
    }

    #[test]
    fn tls_settings_come_from_the_url_and_the_options() {
        let none = RedisOptions::new();
        let (url, tls) = settings("redis://a:1/?protocol=resp2", &none).unwrap();
        assert_eq!(url, "redis://a:1/?protocol=resp2");
        assert!(tls.is_none());

        // rediss:// without certificates: the system's roots.
        let (url, tls) = settings("rediss://u:p@a:1/0", &none).unwrap();
        assert_eq!(url, "rediss://u:p@a:1/0");
        assert!(tls.unwrap().certificates.is_none());

        // The options' root certificate, for rediss:// only.
        let with_root = RedisOptions::new().root_certificate(b"PEM".to_vec());
        let (_, tls) = settings("rediss://a:1", &with_root).unwrap();
        let certificates = tls.unwrap().certificates.unwrap();
        assert_eq!(certificates.root_cert.as_deref(), Some(&b"PEM"[..]));
        assert!(certificates.client_tls.is_none());
        let (_, tls) = settings("redis://a:1", &with_root).unwrap();
        assert!(tls.is_none(), "a plain URL stays plain");

        // The URL's CA file joins the options' roots, and leaves the URL.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("my ca.pem");
        std::fs::write(&ca, "FILE").unwrap();
        let encoded = ca.display().to_string().replace(' ', "%20");
        let (url, tls) = settings(
            &format!("rediss://a:1/?protocol=resp3&ca={encoded}"),
            &with_root,
        )
        .unwrap();
        assert_eq!(url, "rediss://a:1/?protocol=resp3");
        let root = tls.unwrap().certificates.unwrap().root_cert.unwrap();
        assert_eq!(root, b"FILE\nPEM");
    }

    #[test]
    fn contradictory_tls_settings_are_refused() {
        let none = RedisOptions::new();
        let refused = |url: &str, options: &RedisOptions| {
            matches!(settings(url, options), Err(Error::Config { .. }))
        };
        assert!(refused("redis://a:1/?ca=/ca.pem", &none), "ca needs rediss");
        assert!(refused("rediss://a:1/#insecure", &none));
        assert!(refused("rediss://a:1/?ca=/nonexistent/ca.pem", &none));
        assert!(
            refused("rediss://a:1/?cert=/c.pem", &none),
            "a cert needs a key"
        );
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "C").unwrap();
        std::fs::write(&key, "K").unwrap();
        let url = format!(
            "rediss://a:1/?cert={}&key={}",
            cert.display(),
            key.display()
        );
        let (_, tls) = settings(&url, &none).unwrap();
        let client = tls.unwrap().certificates.unwrap().client_tls.unwrap();
        assert_eq!(
            (client.client_cert, client.client_key),
            (b"C".to_vec(), b"K".to_vec())
        );
        let both = RedisOptions::new().client_certificate("C", "K");
        assert!(refused(&url, &both), "one client certificate");
    }

    #[test]
    fn a_missing_ca_file_is_named_without_the_password() {
        let err = settings(
            "rediss://u:s3cret@a:1/?ca=/nonexistent/ca.pem",
            &RedisOptions::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
