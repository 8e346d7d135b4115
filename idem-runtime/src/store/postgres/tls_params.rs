//! The TLS parameters of a PostgreSQL connection string (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`), taken out of it as libpq reads them, for [`tls`](super::tls) to build the
//! connector from: tokio-postgres itself knows only `sslmode=disable|prefer|require`.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::config(format!(
                    "invalid sslmode `{other}`: expected disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// Where the root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the system's roots.
    System,
}

/// The TLS parameters of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub(super) mode: Option<SslMode>,
    pub(super) root_cert: Option<RootCert>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

/// The parameters taken out of the connection string.
const PARAMS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// `conninfo` (a `postgres://` URL or a `key=value` string) without its TLS parameters, and
/// those parameters.
pub(super) fn split(conninfo: &str) -> Result<(String, TlsParams)> {
    let (rest, pairs) =
        if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
            split_url(conninfo)
        } else {
            split_key_values(conninfo)
        };
    let mut params = TlsParams::default();
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" => params.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" if value == "system" => params.root_cert = Some(RootCert::System),
            "sslrootcert" => params.root_cert = Some(RootCert::File(value.into())),
            "sslcert" => params.cert = Some(value.into()),
            "sslkey" => params.key = Some(value.into()),
            _ => unreachable!("only PARAMS are taken"),
        }
    }
    Ok((rest, params))
}

/// A URL without the [`PARAMS`] in its query, and their (decoded) values.
fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    // tokio-postgres ends the credentials at the first `@`, and the query starts at the first
    // `?` after them.
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|q| after_credentials + q)
    else {
        return (url.to_owned(), Vec::new());
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key);
        if PARAMS.contains(&key.as_str()) {
            taken.push((key, percent_decode(value)));
        } else {
            kept.push(pair);
        }
    }
    if kept.is_empty() {
        (base.to_owned(), taken)
    } else {
        (format!("{base}?{}", kept.join("&")), taken)
    }
}

/// `s` with its `%XX` escapes decoded, as tokio-postgres reads a URL's query: a `+` stays a
/// `+`, and a `%` that starts no escape stays as it is.
fn percent_decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// A `key=value` connection string without the [`PARAMS`], and their values. A string that
/// does not parse is left as it is, for tokio-postgres to report.
fn split_key_values(s: &str) -> (String, Vec<(String, String)>) {
    let Some(pairs) = key_values(s) else {
        return (s.to_owned(), Vec::new());
    };
    if !pairs.iter().any(|(k, _)| PARAMS.contains(&k.as_str())) {
        return (s.to_owned(), Vec::new());
    }
    let (taken, kept): (Vec<_>, Vec<_>) = pairs
        .into_iter()
        .partition(|(k, _)| PARAMS.contains(&k.as_str()));
    let rest = kept
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ");
    (rest, taken)
}

/// The pairs of a `key=value key='quoted value'` string, parsed as tokio-postgres does.
fn key_values(s: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(if c == '\\' { chars.next()? } else { c });
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value));
    }
}

/// The name of `mode` as written in a connection string.
pub(super) fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> (String, TlsParams) {
        split(url).unwrap()
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, p) = params(
            "postgres://u:p%3F@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p%3F@db:5432/app?application_name=x");
        assert_eq!(p.mode, Some(SslMode::VerifyFull));
        assert_eq!(p.root_cert, Some(RootCert::File("/etc/ca.pem".into())));

        let (rest, p) = params("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(p.mode, Some(SslMode::Require));

        let (rest, p) = params("postgres://db/app?sslrootcert=system&sslcert=c.pem&sslkey=k.pem");
        assert_eq!(rest, "postgres://db/app");
        assert_eq!(p.root_cert, Some(RootCert::System));
        assert_eq!(p.cert, Some("c.pem".into()));
        assert_eq!(p.key, Some("k.pem".into()));

        // `+` is not a space in a PostgreSQL URL; a stray `%` is kept.
        let (_, p) = params("postgres://db/app?sslrootcert=%2Fmy%20certs%2Fa+b%zz.pem");
        assert_eq!(
            p.root_cert,
            Some(RootCert::File("/my certs/a+b%zz.pem".into()))
        );

        let (rest, p) = params("postgres://a:b@db/app");
        assert_eq!(rest, "postgres://a:b@db/app");
        assert_eq!(p, TlsParams::default());

        assert!(matches!(
            split("postgres://db/app?sslmode=sometimes"),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_strings() {
        let (rest, p) = params("host=db user=app sslmode=verify-ca sslrootcert='/my certs/ca.pem'");
        assert_eq!(rest, "host='db' user='app'");
        assert_eq!(p.mode, Some(SslMode::VerifyCa));
        assert_eq!(p.root_cert, Some(RootCert::File("/my certs/ca.pem".into())));

        let (rest, _) = params("host = db password='it\\'s' sslmode = require");
        assert_eq!(rest, "host='db' password='it\\'s'");
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"it's"[..]));

        // Nothing to take: left exactly as given.
        let (rest, p) = params("host=db user=app");
        assert_eq!(rest, "host=db user=app");
        assert_eq!(p, TlsParams::default());
    }
}
