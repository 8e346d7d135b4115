//! Opening the store a URL names, with the messages of a URL that is wrong or a store that
//! cannot be reached: never with the URL's password.
//!
//! `idem` inspects an application's store and changes nothing it did not ask to: it creates no
//! SQLite file, no table (PostgreSQL or DynamoDB) and no schema (a missing one is exit 2, naming
//! it), and starts no background purger (`idem purge` purges when asked).

use std::sync::Arc;

use idem_runtime::store::dynamodb::DynamoDbOptions;
use idem_runtime::store::is_secret_url_param as is_secret;
use idem_runtime::store::postgres::{PostgresOptions, DEFAULT_TABLE};
use idem_runtime::store::sqlite::SqliteOptions;
use idem_runtime::store::StoreUrl;
use idem_runtime::{DynamoDbStore, Error, PostgresStore, RedisStore, SqliteStore, Store};

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
    let target = match StoreUrl::parse(url) {
        Ok(Some(target)) => target,
        Ok(None) => return Err(Failure::new(Exit::Usage, not_a_store(url))),
        // The runtime's configuration errors redact the URL themselves.
        Err(e) => return Err(Failure::new(Exit::Usage, scrub(&reason(e), url))),
    };
    let is_postgres = matches!(target, StoreUrl::Postgres);
    let is_redis = matches!(target, StoreUrl::Redis);
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
    if target.in_process() {
        return Err(Failure::new(
            Exit::Usage,
            format!("a memory store lives inside the process that created it: `idem` cannot reach it (give the URL of a SQLite, PostgreSQL, Redis or DynamoDB store: {OPENS})"),
        ));
    }
    let mut sqlite_path = None;
    if let StoreUrl::Sqlite { path, .. } = &target {
        // A mistyped path must not show an empty store: the file is never created.
        if !path.is_file() {
            return Err(Failure::new(
                Exit::Usage,
                format!(
                    "no SQLite database at `{}` (store URL `{shown}`)",
                    path.display()
                ),
            ));
        }
        sqlite_path = Some(path.as_path());
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
    } else if matches!(target, StoreUrl::DynamoDb) {
        // The table is the URL's; a missing one is refused, not created.
        let options = DynamoDbOptions::new().create_table(false);
        DynamoDbStore::connect_with(url, &options)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else if let Some(prefix) = location.prefix {
        RedisStore::connect_with_prefix(url, prefix)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else {
        // Redis: no schema, and records expire by themselves.
        idem_runtime::connect(url).await
    };
    opened.map_err(|e| {
        let message = match e {
            e @ Error::Config { .. } => reason(e),
            other => format!("cannot open the store at `{shown}`: {other}"),
        };
        Failure::new(Exit::Usage, scrub(&message, url))
    })
}

/// The store URLs `idem` opens: those `idempotency::connect` opens, except the stores that
/// live inside the process that created them (`memory`, `sqlite::memory:`).
const OPENS: &str = "`sqlite:PATH` or `sqlite:///abs/path` (an existing file), \
`redis://...`, `rediss://...`, `redis+unix:///path/to/redis.sock` (or `unix://`), \
`redis+cluster://host:port,host:port,...` (or `rediss+cluster://`), `postgres://...` \
(or `postgresql://`), a PostgreSQL `key=value` string such as \
`host=127.0.0.1 user=app dbname=app`, or `dynamodb://TABLE?region=...&endpoint=...` \
(an existing table)";

/// The message of a `url` that names no store: what `idem` opens instead, and what it does not.
fn not_a_store(url: &str) -> String {
    let what = if url.trim().is_empty() {
        "the store URL is empty".to_owned()
    } else {
        format!("unknown store URL `{}`", redact(url))
    };
    format!(
        "{what}: `idem` opens {OPENS}; that is, every URL `idempotency::connect` accepts except `memory`, which lives inside the process that created it"
    )
}

/// The reason of a configuration error (which redacts the URL itself), else the error.
fn reason(e: Error) -> String {
    match e {
        Error::Config { reason } => reason,
        other => other.to_string(),
    }
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

    /// The message `open` fails with for `url` (and `table`).
    async fn refusal(url: &str, table: Option<&str>) -> String {
        let location = Location {
            url,
            table,
            prefix: None,
        };
        match open(&location).await {
            Err(failure) => {
                assert_eq!(failure.exit, Exit::Usage, "{url}: {failure}");
                failure.message
            }
            Ok(store) => panic!("{url}: opened {}", store.backend()),
        }
    }

    #[tokio::test]
    async fn an_unknown_url_is_told_what_idem_opens_without_memory() {
        for url in ["foo://x", "", "localhost:6379"] {
            let message = refusal(url, None).await;
            assert!(
                message.contains("unknown store URL `foo://x`")
                    || message.contains("store URL is empty")
                    || message.contains("unknown store URL `localhost:6379`"),
                "{message}"
            );
            for form in [
                "`sqlite:PATH`",
                "`redis://...`",
                "`redis+unix:///path/to/redis.sock`",
                "`redis+cluster://host:port,host:port,...`",
                "`postgres://...`",
                "`key=value`",
            ] {
                assert!(message.contains(form), "{form}: {message}");
            }
            // `memory` is named only as what idem does not open.
            assert_eq!(message.matches("`memory`").count(), 1, "{message}");
            assert!(message.contains("except `memory`"), "{message}");
        }
    }

    #[tokio::test]
    async fn stores_inside_a_process_are_refused() {
        for url in ["memory", "sqlite::memory:"] {
            let message = refusal(url, None).await;
            assert!(message.contains("memory store lives inside"), "{message}");
        }
    }

    #[tokio::test]
    async fn urls_are_read_as_connect_reads_them() {
        // A SQLite parameter `connect` would refuse is refused by name.
        let message = refusal("sqlite:///tmp/x.db?cache=shared", None).await;
        assert!(message.contains("`cache`"), "{message}");
        // The query is not part of the path.
        let message = refusal("sqlite:///nonexistent/app.db?mode=rwc", None).await;
        assert!(
            message.contains("no SQLite database at `/nonexistent/app.db`"),
            "{message}"
        );
        // A key=value string is PostgreSQL's: `--table` fits it, and it is connected to.
        let conninfo =
            "host=127.0.0.1 port=1 user=app password=s3cret dbname=app connect_timeout=2";
        let message = refusal(conninfo, Some("t")).await;
        assert!(message.contains("cannot open the store at"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        // A Redis socket URL is Redis's: `--table` does not fit it.
        let message = refusal("redis+unix:///run/redis.sock", Some("t")).await;
        assert!(message.contains("--table is for PostgreSQL"), "{message}");
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
