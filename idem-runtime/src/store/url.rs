//! Store URLs: what [`connect`](super::connect) accepts ([`StoreUrl`]), and [`redact`], which
//! hides the credentials a URL may carry before it goes into an error or a log line.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;
use url::Url;

use crate::error::{Error, Result};

/// Query and connection-string parameters whose value is a secret.
const SECRET_PARAMS: &[&str] = &["password", "pass", "sslpassword"];

/// What [`connect`](super::connect) accepts, for the message of a URL it does not.
pub(crate) const ACCEPTED: &str = "`memory` (a store inside this process only), \
`sqlite:PATH`, `sqlite:///abs/path` or `sqlite::memory:` (optionally `?mode=rwc`, the default, \
or `?mode=rw`: the file must exist), `redis://...`, `rediss://...`, \
`redis+unix:///path/to/redis.sock` (or `unix://`), `redis+cluster://host:port,host:port,...` \
(or `rediss+cluster://`), `postgres://...` (or `postgresql://`), a PostgreSQL `key=value` \
string such as `host=127.0.0.1 user=app dbname=app`, or `dynamodb://TABLE?region=...&endpoint=...`";

/// What a store URL names, read as [`connect`](super::connect) reads it: for a tool that opens
/// stores by URL and checks what it was given first (the `idem` command refuses `memory`,
/// which lives inside the process that created it, and a SQLite file that does not exist).
///
/// | URL | store |
/// |---|---|
/// | `memory` | [`MemoryStore`](super::memory::MemoryStore) |
/// | `sqlite:PATH`, `sqlite://PATH` | SQLite file `PATH` (relative or absolute) |
/// | `sqlite:///abs/path` | SQLite file `/abs/path` |
/// | `sqlite::memory:` | an in-memory SQLite database (this process only) |
/// | `redis://`, `rediss://`, `redis+unix://`, `unix://` | one Redis server (TCP, TLS, Unix socket) |
/// | `redis+cluster://h:p,h:p`, `rediss+cluster://` | a Redis Cluster |
/// | `postgres://`, `postgresql://`, `host=... dbname=...` | PostgreSQL (URL or `key=value`) |
/// | `dynamodb://TABLE?region=..&endpoint=..` | a DynamoDB table |
///
/// A SQLite URL is read by the `url` crate: its path is percent-decoded (`%20` for a space,
/// `%3F` for a `?`, `%23` for a `#`; `.` and `..` in an absolute path are resolved), and its
/// query may hold only `mode`: `rwc` (the default: the file is created if missing) or `rw` (it
/// must exist). `mode=ro` and any other parameter are refused ([`Error::Config`], naming them):
/// a store writes its records, and nothing in the URL is silently ignored. The other URLs are
/// read by the client crate of their store (the `redis` crate, tokio-postgres), which reports
/// their mistakes when connecting.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `memory`: a store inside this process only.
    Memory,
    /// A SQLite database.
    #[non_exhaustive]
    Sqlite {
        /// The database file (percent-decoded), or `:memory:` for `sqlite::memory:`.
        path: PathBuf,
        /// Whether a missing file is created (`mode=rwc`, the default) or refused (`mode=rw`).
        create: bool,
    },
    /// A Redis server or Redis Cluster.
    Redis,
    /// A PostgreSQL server, by URL or `key=value` connection string.
    Postgres,
    /// A DynamoDB table (`dynamodb://TABLE?region=...&endpoint=...`).
    DynamoDb,
}

impl StoreUrl {
    /// What `url` names: `Ok(None)` when it names no store (it is empty, or its scheme is none
    /// of the table above), [`Error::Config`] when it names one but says it wrongly (a SQLite
    /// URL without a path, or with a parameter other than `mode=rw|rwc`).
    pub fn parse(url: &str) -> Result<Option<StoreUrl>> {
        if url == "memory" {
            return Ok(Some(StoreUrl::Memory));
        }
        Ok(match scheme(url) {
            Some("sqlite") => Some(sqlite(url)?),
            Some(
                "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" | "rediss+cluster",
            ) => Some(StoreUrl::Redis),
            Some("postgres" | "postgresql") => Some(StoreUrl::Postgres),
            Some("dynamodb") => Some(StoreUrl::DynamoDb),
            Some(_) => None,
            None if is_key_value(url) => Some(StoreUrl::Postgres),
            None => None,
        })
    }

    /// Whether the store lives inside the process that opens it (`memory`,
    /// `sqlite::memory:`), so that no other process can reach its records.
    pub fn in_process(&self) -> bool {
        match self {
            StoreUrl::Memory => true,
            StoreUrl::Sqlite { path, .. } => path == Path::new(":memory:"),
            StoreUrl::Redis | StoreUrl::Postgres | StoreUrl::DynamoDb => false,
        }
    }

    /// The cargo feature of idempotency that opens this store (`None`: always there).
    pub(crate) fn feature(&self) -> Option<&'static str> {
        match self {
            StoreUrl::Memory => None,
            StoreUrl::Sqlite { .. } => Some("sqlite"),
            StoreUrl::Redis => Some("redis"),
            StoreUrl::Postgres => Some("postgres"),
            StoreUrl::DynamoDb => Some("dynamodb"),
        }
    }
}

/// The error of a `url` that names no store: empty, or of an unknown scheme.
pub(crate) fn not_a_store(url: &str) -> Error {
    if url.trim().is_empty() {
        Error::config(format!("the store URL is empty: expected {ACCEPTED}"))
    } else {
        Error::config(format!(
            "unknown store URL `{}`: expected {ACCEPTED}",
            redact(url)
        ))
    }
}

/// The scheme `url` starts with, as RFC 3986 writes one: a letter, then letters, digits, `+`,
/// `-` or `.`, up to the first `:`. Only the scheme is read here: the `url` crate reads whole
/// URLs, and a cluster's `host:port,host:port` list and tokio-postgres's multi-host URLs are
/// none it accepts.
fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// Whether `s` starts like a libpq `key=value` connection string: a keyword, then `=`.
fn is_key_value(s: &str) -> bool {
    let s = s.trim_start();
    let key_len = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    key_len > 0 && s[key_len..].trim_start().starts_with('=')
}

/// A `sqlite:` URL (see [`StoreUrl`]).
fn sqlite(url: &str) -> Result<StoreUrl> {
    let wrong = |what: &str| Error::config(format!("SQLite store URL `{}`: {what}", redact(url)));
    let rest = &url["sqlite:".len()..];
    // A SQLite URL names no host: `sqlite://PATH` is `sqlite:PATH`, so `sqlite:///abs/app.db`
    // is `/abs/app.db` and `sqlite://data/app.db` the relative `data/app.db` (as sqlx reads it).
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let parsed = Url::parse(&format!("sqlite:{rest}")).map_err(|e| wrong(&e.to_string()))?;
    if parsed.has_host() {
        return Err(wrong(
            "a SQLite URL names a file, not a host: write `sqlite:///abs/path` or `sqlite:PATH`",
        ));
    }
    if parsed.fragment().is_some() {
        return Err(wrong(
            "`#` starts a fragment, which a SQLite URL has none of: write a `#` of the path as `%23`",
        ));
    }
    let path = percent_decode_str(parsed.path())
        .decode_utf8()
        .map_err(|_| wrong("the path is not UTF-8 once percent-decoded"))?;
    if path.is_empty() {
        return Err(wrong(
            "no path: write `sqlite:PATH`, `sqlite:///abs/path` or `sqlite::memory:`",
        ));
    }
    if path.ends_with('/') {
        return Err(wrong(&format!(
            "`{path}` is a directory: name the database file"
        )));
    }
    let mut mode: Option<Cow<'_, str>> = None;
    let mut unknown = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "mode" if mode.is_some() => return Err(wrong("`mode` is given twice")),
            "mode" => mode = Some(value),
            _ => unknown.push(format!("`{key}`")),
        }
    }
    if !unknown.is_empty() {
        return Err(wrong(&format!(
            "unknown parameter {}: `connect` reads only `mode` (`rwc`, the default, or `rw`)",
            unknown.join(", ")
        )));
    }
    let create = match mode.as_deref() {
        None | Some("rwc") => true,
        Some("rw") => false,
        Some("ro") => {
            return Err(wrong(
                "`mode=ro`: a store writes its records, so `connect` opens SQLite files for reading and writing (`mode=rw`: the file must exist; `mode=rwc`, the default: it is created if missing)",
            ))
        }
        Some(other) => {
            return Err(wrong(&format!(
                "invalid `mode={other}`: expected `rwc` (the default) or `rw`"
            )))
        }
    };
    Ok(StoreUrl::Sqlite {
        path: PathBuf::from(path.into_owned()),
        create,
    })
}

/// `url` with its credentials replaced by `***`: the user and password of a
/// `scheme://user:password@host...` URL (also of a cluster URL with several hosts), and the
/// value of a `password` (`pass`, `sslpassword`) query parameter or `password=...` pair of a
/// PostgreSQL connection string. For putting a store URL in an error or a log line.
///
/// ```text
/// redis://app:s3cret@cache:6379/0         -> redis://***@cache:6379/0
/// postgres://db/app?password=s3cret       -> postgres://db/app?password=***
/// host=db user=app password='s 3cret'     -> host=db user=app password=***
/// ```
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // Credentials end at the last `@` before the end of the authority (the first `/`,
            // `?` or `#` after the first `@`): a password may hold any of these characters
            // when it was not percent-encoded, and hiding too much is better than too little.
            let (credentials, rest) = match rest.find('@') {
                Some(first) => {
                    let end = rest[first..]
                        .find(['/', '?', '#'])
                        .map_or(rest.len(), |i| first + i);
                    let at = rest[..end].rfind('@').unwrap_or(first);
                    (true, &rest[at + 1..])
                }
                None => (false, rest),
            };
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (hosts, tail) = rest.split_at(end);
            let hidden = if credentials { "***@" } else { "" };
            format!("{scheme}://{hidden}{hosts}{}", redact_query(tail))
        }
        None if url.contains('=') => redact_key_values(url),
        None => url.to_owned(),
    }
}

/// The path, query and fragment of a URL with secret query parameters hidden.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{path}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// A `key=value key='quoted value'` connection string with secret values hidden.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim_end();
        let key_name = key.rsplit(char::is_whitespace).next().unwrap_or(key);
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        let leading = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..leading]);
        rest = &rest[leading..];
        let value_len = value_len(rest);
        if is_secret(key_name) {
            out.push_str("***");
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
    out.push_str(rest);
    out
}

/// The length of the value at the start of `s`: up to the closing quote of a quoted value
/// (`\'` and `\\` escaped), else up to the next whitespace.
fn value_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    if s.starts_with('\'') {
        chars.next();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' => return i + 1,
                _ => {}
            }
        }
        s.len()
    } else {
        s.find(char::is_whitespace).unwrap_or(s.len())
    }
}

/// Whether a query or connection-string parameter named `key` holds a secret (`password`,
/// `pass`, `sslpassword`): the values [`redact`] hides.
pub fn is_secret(key: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p))
}

#[cfg(test)]
mod tests {
    use super::{not_a_store, redact, StoreUrl};
    use crate::Error;

    fn sqlite(url: &str) -> (String, bool) {
        match StoreUrl::parse(url) {
            Ok(Some(StoreUrl::Sqlite { path, create })) => (path.display().to_string(), create),
            other => panic!("{url}: {other:?}"),
        }
    }

    fn refused(url: &str) -> String {
        match StoreUrl::parse(url) {
            Err(Error::Config { reason }) => reason,
            other => panic!("{url} is refused as a configuration error: {other:?}"),
        }
    }

    #[test]
    fn sqlite_forms() {
        let cases = [
            ("sqlite:app.db", "app.db"),
            ("sqlite:data/app.db", "data/app.db"),
            ("sqlite://data/app.db", "data/app.db"),
            ("sqlite:/data/app.db", "/data/app.db"),
            ("sqlite:///data/app.db", "/data/app.db"),
            ("sqlite:///data/my%20app%3F.db", "/data/my app?.db"),
            ("sqlite:///data/x/../app.db", "/data/app.db"),
            ("sqlite:///data/100%.db", "/data/100%.db"),
            ("sqlite::memory:", ":memory:"),
        ];
        for (url, path) in cases {
            assert_eq!(sqlite(url), (path.to_owned(), true), "{url}");
        }
    }

    #[test]
    fn sqlite_query_parameters_are_honoured_not_kept_in_the_path() {
        assert_eq!(
            sqlite("sqlite:///data/app.db?mode=rwc"),
            ("/data/app.db".into(), true)
        );
        assert_eq!(
            sqlite("sqlite:///data/app.db?mode=rw"),
            ("/data/app.db".into(), false)
        );
        assert_eq!(sqlite("sqlite:app.db?mode=rw"), ("app.db".into(), false));
        assert_eq!(
            sqlite("sqlite:///data/app.db?"),
            ("/data/app.db".into(), true)
        );
    }

    #[test]
    fn sqlite_urls_it_cannot_honour_are_refused_by_name() {
        let reason = refused("sqlite:///data/app.db?mode=rwc&cache=shared&vfs=unix");
        assert!(reason.contains("`cache`, `vfs`"), "{reason}");
        assert!(reason.contains("sqlite:///data/app.db?mode=rwc&cache=shared&vfs=unix"));
        assert!(refused("sqlite:///data/app.db?mode=ro").contains("`mode=ro`"));
        assert!(refused("sqlite:///data/app.db?mode=memory").contains("`mode=memory`"));
        assert!(refused("sqlite:///a.db?mode=rw&mode=rwc").contains("twice"));
        for url in ["sqlite:", "sqlite://", "sqlite:///"] {
            let reason = refused(url);
            assert!(
                reason.contains("no path") || reason.contains("a directory"),
                "{url}: {reason}"
            );
        }
        assert!(refused("sqlite:////data/app.db").contains("not a host"));
        assert!(refused("sqlite:///data/a#b.db").contains("%23"));
        assert!(refused("sqlite:///data/%FF.db").contains("UTF-8"));
    }

    #[test]
    fn schemes_name_their_store() {
        let cases = [
            ("memory", StoreUrl::Memory),
            ("redis://127.0.0.1:6379/0", StoreUrl::Redis),
            ("rediss://u:p@cache:6380", StoreUrl::Redis),
            ("redis+unix:///run/redis.sock?db=1", StoreUrl::Redis),
            ("unix:///run/redis.sock", StoreUrl::Redis),
            ("redis+cluster://a:1,b:2", StoreUrl::Redis),
            ("rediss+cluster://a:1,b:2/?ca=/x.pem", StoreUrl::Redis),
            ("postgres://u@db/app", StoreUrl::Postgres),
            ("postgresql://u@h1:5432,h2:5433/app", StoreUrl::Postgres),
            (
                "host=127.0.0.1 user=postgres dbname=test",
                StoreUrl::Postgres,
            ),
            ("  dbname = test host=/run/postgresql", StoreUrl::Postgres),
            ("host=db options='-c search_path=a:b'", StoreUrl::Postgres),
            (
                "dynamodb://idem_records?region=eu-west-1",
                StoreUrl::DynamoDb,
            ),
            (
                "dynamodb://t?endpoint=http://127.0.0.1:8000",
                StoreUrl::DynamoDb,
            ),
        ];
        for (url, want) in cases {
            assert_eq!(StoreUrl::parse(url).unwrap(), Some(want), "{url}");
        }
        for url in [
            "",
            "  ",
            "mysql://db/app",
            "localhost:6379",
            "/tmp/app.db",
            "foo",
            "=x",
        ] {
            assert_eq!(StoreUrl::parse(url).unwrap(), None, "{url:?}");
        }
        assert!(StoreUrl::Memory.in_process());
        assert!(StoreUrl::parse("sqlite::memory:")
            .unwrap()
            .unwrap()
            .in_process());
        assert!(!StoreUrl::parse("sqlite:x.db")
            .unwrap()
            .unwrap()
            .in_process());
        assert!(!StoreUrl::Redis.in_process());
        assert!(!StoreUrl::DynamoDb.in_process());
    }

    #[test]
    fn a_url_naming_no_store_says_what_is_accepted() {
        let empty = not_a_store("").to_string();
        assert!(empty.contains("store URL is empty"), "{empty}");
        let unknown = not_a_store("mysql://root:s3cret@db/app").to_string();
        assert!(
            unknown.contains("unknown store URL `mysql://***@db/app`"),
            "{unknown}"
        );
        assert!(!unknown.contains("s3cret"), "{unknown}");
        for form in [
            "`memory`",
            "`sqlite:PATH`",
            "`sqlite:///abs/path`",
            "`sqlite::memory:`",
            "`?mode=rw`",
            "`redis://...`",
            "`rediss://...`",
            "`redis+unix:///path/to/redis.sock`",
            "`unix://`",
            "`redis+cluster://host:port,host:port,...`",
            "`postgres://...`",
            "`key=value`",
            "`dynamodb://TABLE?region=...&endpoint=...`",
        ] {
            assert!(
                empty.contains(form) && unknown.contains(form),
                "{form}: {unknown}"
            );
        }
    }

    #[test]
    fn credentials_are_hidden() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://app:s3cret@cache:6379/0",
                "redis://***@cache:6379/0",
            ),
            ("rediss://:s3cret@cache", "rediss://***@cache"),
            ("redis://default@cache", "redis://***@cache"),
            (
                "rediss+cluster://u:p%40ss@a:1,b:2/?ca=/x.pem",
                "rediss+cluster://***@a:1,b:2/?ca=/x.pem",
            ),
            ("redis://u:p@ss@host:1", "redis://***@host:1"),
            ("redis://u:pa/ss?#@host:1/2", "redis://***@host:1/2"),
            (
                "postgres://app:s3cret@db:5432/app?sslmode=require",
                "postgres://***@db:5432/app?sslmode=require",
            ),
            (
                "postgres://db/app?user=app&password=s3cret&sslmode=verify-full#x",
                "postgres://db/app?user=app&password=***&sslmode=verify-full#x",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "host=db user=app password=s3cret dbname=app",
                "host=db user=app password=*** dbname=app",
            ),
            (
                "host=db password = 'it\\'s secret' sslmode=require",
                "host=db password = *** sslmode=require",
            ),
            ("memory", "memory"),
            ("sqlite:/tmp/x.db", "sqlite:/tmp/x.db"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[test]
    fn nothing_secret_survives() {
        for url in [
            "redis://u:s3cret@h",
            "postgres://u:s3cret@h/db?password=s3cret",
            "password='s3cret' host=h",
            "mysql://root:s3cret@h",
        ] {
            assert!(!redact(url).contains("s3cret"), "{url}");
        }
    }
}
