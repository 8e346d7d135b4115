//! Opening the store a URL names, with the messages of a URL that is wrong or a store that
//! cannot be reached: never with the URL's password.
//!
//! `idem` inspects an application's store and changes nothing it did not ask to: it creates no
//! SQLite file, no table and no schema (a missing one is exit 2, naming it), and starts no
//! background purger (`idem purge` purges when asked).

use std::path::Path;
use std::sync::Arc;

use idem_runtime::store::is_secret_url_param as is_secret;
use idem_runtime::store::postgres::{PostgresOptions, DEFAULT_TABLE};
use idem_runtime::store::sqlite::SqliteOptions;
use idem_runtime::{Error, PostgresStore, RedisStore, SqliteStore, Store};

use crate::failure::{Exit, Failure, Outcome};

/// Where the records are: the store URL, and the table or key prefix an application chose.
#[derive(Debug)]
pub struct Location<'a> {
    /// The store URL.
    pub url: &'a str,
    /// The PostgreSQL table (`--table`).
    pub table: Option<&'a str>,
    /// The Redis key prefix (`--prefix`).
    pub prefix: Option<&'a str>,
}

/// Opens the store at `location` without creating anything (no file, table or schema) and
/// without a background purger. A URL no store accepts, an option that does not fit the URL, a
/// SQLite file that does not exist, a missing table, and a store that cannot be reached are
/// [`Exit::Usage`], with the URL redacted.
pub async fn open(location: &Location<'_>) -> Outcome<Arc<dyn Store>> {
    let url = location.url;
    let shown = redact(url);
    let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
    let is_postgres = matches!(scheme, "postgres" | "postgresql");
    let is_redis = scheme.starts_with("redis");
    if location.table.is_some() && !is_postgres {
        return Err(Failure::new(
            Exit::Usage,
            format!("--table is for PostgreSQL stores, not `{shown}`"),
        ));
    }
    if location.prefix.is_some() && !is_redis {
        return Err(Failure::new(
            Exit::Usage,
            format!("--prefix is for Redis stores, not `{shown}`"),
        ));
    }
    if url.is_empty() || url == "memory" || scheme == "memory" {
        return Err(Failure::new(
            Exit::Usage,
            "a memory store lives inside the process that created it: `idem` cannot reach it (give the URL of a SQLite, PostgreSQL or Redis store)",
        ));
    }
    let mut sqlite_path = None;
    if let Some(path) = url.strip_prefix("sqlite:") {
        // A mistyped path must not show an empty store: the file is never created.
        let path = path.trim_start_matches("//");
        if !Path::new(path).is_file() {
            return Err(Failure::new(
                Exit::Usage,
                format!("no SQLite database at `{path}` (store URL `{shown}`)"),
            ));
        }
        sqlite_path = Some(path);
    }
    let opened = if let Some(path) = sqlite_path {
        let options = SqliteOptions::new()
            .create_tables(false)
            .purge_in_background(false);
        SqliteStore::open_with(path, &options)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else if is_postgres {
        let options = PostgresOptions::new()
            .table(location.table.unwrap_or(DEFAULT_TABLE))
            .create_table(false)
            .purge_in_background(false);
        PostgresStore::connect_with(url, &options)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else if let Some(prefix) = location.prefix {
        RedisStore::connect_with_prefix(url, prefix)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else {
        // Redis (no schema, records expire by themselves), or the runtime's message for a URL
        // it does not know.
        idem_runtime::connect(url).await
    };
    opened.map_err(|e| {
        let message = match &e {
            // The runtime's configuration errors redact the URL themselves.
            Error::Config { reason } => reason.clone(),
            other => format!("cannot open the store at `{shown}`: {other}"),
        };
        Failure::new(Exit::Usage, scrub(&message, url))
    })
}

/// `url` with its credentials hidden, as the runtime shows URLs in its own messages.
pub use idem_runtime::store::redact_url as redact;

/// `message` with every secret of `url` (its password, the values of its secret query
/// parameters) replaced by `***`, in case a client library quoted one.
fn scrub(message: &str, url: &str) -> String {
    let mut out = message.to_owned();
    for secret in secrets(url) {
        if secret.len() >= 3 {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The password of `url`'s authority and the values of its secret query parameters.
fn secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Some((_, rest)) = url.split_once("://") else {
        return found;
    };
    if let Some(at) = rest.rfind('@') {
        if let Some((_, password)) = rest[..at].split_once(':') {
            found.push(password.to_owned());
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        let query = query.split('#').next().unwrap_or(query);
        for pair in query.split('&') {
            if let Some((name, value)) = pair.split_once('=') {
                if is_secret(name) {
                    found.push(value.to_owned());
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_hidden() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://app:s3cret@cache:6379/0",
                "redis://***@cache:6379/0",
            ),
            ("redis://u:p@ss@host:1", "redis://***@host:1"),
            (
                "postgres://db/app?user=app&password=s3cret&sslmode=require#x",
                "postgres://db/app?user=app&password=***&sslmode=require#x",
            ),
            ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
            ("foo://x", "foo://x"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[test]
    fn messages_lose_the_secrets_of_the_url() {
        let url = "postgres://app:s3cret@db/app?pass=other";
        assert_eq!(
            scrub("auth failed for s3cret and other", url),
            "auth failed for *** and ***"
        );
    }
}
