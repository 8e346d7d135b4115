//! `idempotency::connect` on the URLs people write: Redis on a Unix socket (`redis+unix://`,
//! `unix://`, against a `redis-server` this test starts on a socket of its own), a PostgreSQL
//! `key=value` connection string, SQLite URLs with a query, and URLs that name no store.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotency::store::Claim;
use idempotency::{Error, StorageKey, Store};

/// A storage key no other test uses.
fn fresh_key() -> StorageKey {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let unique = nanos ^ (u128::from(std::process::id()) << 96);
    StorageKey::from_hex(&format!("{unique:064x}")).expect("64 hex digits")
}

/// Claims a fresh key on `store`, reads the claim back, and releases it: the store really
/// reaches its server (or file).
async fn round_trip(store: &dyn Store) {
    let key = fresh_key();
    let claim = store
        .claim(&key, None, Duration::from_secs(30))
        .await
        .expect("claim");
    let Claim::Acquired { token, .. } = claim else {
        panic!("a fresh key is acquired: {claim:?}");
    };
    assert!(store.get(&key).await.expect("get").is_some(), "claimed");
    store.release(&key, token).await.expect("release");
    assert!(store.get(&key).await.expect("get").is_none(), "released");
}

/// The reason of a configuration error, or a panic naming what came instead.
fn config_reason(url: &str, got: Result<std::sync::Arc<dyn Store>, Error>) -> String {
    match got {
        Err(e @ Error::Config { .. }) => {
            assert!(
                !e.is_retryable(),
                "{url}: a configuration error is not retryable"
            );
            e.to_string()
        }
        Err(other) => panic!("{url}: expected a configuration error, got {other:?}"),
        Ok(store) => panic!(
            "{url}: expected a configuration error, opened {}",
            store.backend()
        ),
    }
}

#[tokio::test]
async fn an_empty_or_unknown_url_is_a_configuration_error_that_lists_what_is_accepted() {
    for url in [
        "",
        "mysql://root:s3cret@db/app",
        "localhost:6379",
        "/var/lib/app.db",
    ] {
        let reason = config_reason(url, idempotency::connect(url).await);
        assert!(!reason.contains("s3cret"), "{reason}");
        for form in [
            "`memory`",
            "`sqlite:PATH`",
            "`redis://...`",
            "`redis+unix:///path/to/redis.sock`",
            "`redis+cluster://host:port,host:port,...`",
            "`postgres://...`",
            "`key=value`",
        ] {
            assert!(reason.contains(form), "{url:?}: {form} in {reason}");
        }
        if url.is_empty() {
            assert!(reason.contains("store URL is empty"), "{reason}");
        } else {
            assert!(reason.contains("unknown store URL"), "{reason}");
        }
    }
    // `memory` stays accepted, as the message says.
    let store = idempotency::connect("memory").await.expect("memory");
    assert_eq!(store.backend(), "memory");
    round_trip(&*store).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_urls_with_a_query_open_the_file_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    assert!(
        root.starts_with('/'),
        "an absolute temporary directory: {root}"
    );
    let files = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
            .collect();
        names.sort();
        names
    };

    // `mode=rwc` creates `app.db`, not a file named `app.db?mode=rwc`.
    let url = format!("sqlite://{root}/app.db?mode=rwc");
    let store = idempotency::connect(&url).await.expect(&url);
    assert_eq!(store.backend(), "sqlite");
    round_trip(&*store).await;
    assert_eq!(files(), ["app.db"]);

    // `mode=rw` opens the existing file, and refuses a missing one without creating it.
    let url = format!("sqlite://{root}/app.db?mode=rw");
    round_trip(&*idempotency::connect(&url).await.expect(&url)).await;
    let missing = format!("sqlite:{root}/missing.db?mode=rw");
    let reason = config_reason(&missing, idempotency::connect(&missing).await);
    assert!(reason.contains("no SQLite database at"), "{reason}");
    assert_eq!(files(), ["app.db"], "a missing file is not created");

    // A percent-encoded path is decoded; `sqlite:PATH` and `sqlite:///PATH` name one file.
    let url = format!("sqlite://{root}/my%20app.db");
    round_trip(&*idempotency::connect(&url).await.expect(&url)).await;
    let url = format!("sqlite:{root}/my%20app.db");
    round_trip(&*idempotency::connect(&url).await.expect(&url)).await;
    assert_eq!(files(), ["app.db", "my app.db"]);

    // What `connect` cannot honour is refused by name, and opens nothing.
    let read_only = format!("sqlite://{root}/ro.db?mode=ro");
    let reason = config_reason(&read_only, idempotency::connect(&read_only).await);
    assert!(reason.contains("`mode=ro`"), "{reason}");
    let unknown = format!("sqlite://{root}/x.db?mode=rwc&cache=shared&journal_mode=delete");
    let reason = config_reason(&unknown, idempotency::connect(&unknown).await);
    assert!(
        reason.contains("`cache`, `journal_mode`"),
        "the unknown parameters are named: {reason}"
    );
    assert_eq!(files(), ["app.db", "my app.db"]);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_key_value_strings_connect() {
    use idempotency::postgres::tokio_postgres::config::Host;
    use idempotency::postgres::tokio_postgres::Config;

    // A key=value string is PostgreSQL's, also when nothing listens: a store error (the
    // connection), not an unknown URL.
    let nobody = "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2";
    match idempotency::connect(nobody).await {
        Err(Error::Store { .. }) => {}
        other => panic!("{nobody}: expected a store error, got {:?}", other.err()),
    }

    let url = idem_support::postgres::url();
    let config: Config = url.parse().expect("IDEM_POSTGRES_URL");
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut conninfo = Vec::new();
    match config.get_hosts().first() {
        Some(Host::Tcp(host)) => conninfo.push(format!("host={}", quote(host))),
        Some(Host::Unix(path)) => {
            conninfo.push(format!("host={}", quote(&path.display().to_string())))
        }
        None => {}
    }
    if let Some(port) = config.get_ports().first() {
        conninfo.push(format!("port={port}"));
    }
    if let Some(user) = config.get_user() {
        conninfo.push(format!("user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        conninfo.push(format!(
            "password={}",
            quote(&String::from_utf8_lossy(password))
        ));
    }
    if let Some(dbname) = config.get_dbname() {
        conninfo.push(format!("dbname={}", quote(dbname)));
    }
    let conninfo = conninfo.join(" ");
    match idempotency::connect(&conninfo).await {
        Ok(store) => {
            assert_eq!(store.backend(), "postgres");
            round_trip(&*store).await;
        }
        Err(e @ Error::Config { .. }) => panic!("{conninfo}: refused: {e}"),
        Err(e) => idem_support::unavailable("PostgreSQL", e),
    }
}

#[cfg(feature = "redis")]
mod unix_socket {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::round_trip;

    /// A `redis-server` listening only on a Unix socket in a temporary directory; killed on
    /// drop.
    struct SocketRedis {
        child: Child,
        socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl SocketRedis {
        /// Starts one and waits until its socket accepts connections, or `None` after
        /// `idem_support::unavailable` (no `redis-server` here, or it did not come up).
        fn start() -> Option<SocketRedis> {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("redis.sock");
            let spawned = Command::new("redis-server")
                .args(["--port", "0", "--unixsocket"])
                .arg(&socket)
                .args([
                    "--unixsocketperm",
                    "700",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    idem_support::unavailable("redis-server (for a Redis on a Unix socket)", e);
                    return None;
                }
            };
            let server = SocketRedis {
                child,
                socket,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
                if Instant::now() > deadline {
                    idem_support::unavailable(
                        "a redis-server on a Unix socket",
                        "its socket did not accept connections within 5 s",
                    );
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(server)
        }

        fn socket(&self) -> &Path {
            &self.socket
        }
    }

    impl Drop for SocketRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_on_a_unix_socket_connects() {
        let Some(server) = SocketRedis::start() else {
            return;
        };
        let socket = server.socket().display().to_string();
        for url in [
            format!("redis+unix://{socket}"),
            format!("unix://{socket}"),
            format!("redis+unix://{socket}?db=1"),
        ] {
            let store = idempotency::connect(&url).await.expect(&url);
            assert_eq!(store.backend(), "redis", "{url}");
            round_trip(&*store).await;
        }
        // A socket nobody listens on is the store's error, not an unknown URL.
        let absent = format!("redis+unix://{socket}.absent");
        match idempotency::connect(&absent).await {
            Err(idempotency::Error::Store { .. }) => {}
            other => panic!("{absent}: expected a store error, got {:?}", other.err()),
        }
        drop(server);
    }
}
