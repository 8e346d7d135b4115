//! TLS to the networked stores: the TLS-only Redis of `.ci/redis-tls` (`IDEM_REDIS_TLS_URL`,
//! default `rediss://127.0.0.1:6380/?ca=/tmp/idem-redis-tls/ca.pem`, with the script's other
//! certificates beside the CA, or in `IDEM_REDIS_TLS_DIR`) and its TLS cluster
//! (`IDEM_REDIS_TLS_CLUSTER_URL`, default `rediss+cluster://127.0.0.1:7100,...` with the same
//! CA), the plain Redis (`IDEM_REDIS_URL`, to check that `rediss://` to it fails), and this
//! machine's PostgreSQL, which serves TLS with its own certificate (`IDEM_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Verified connections work; a wrong CA, a host the certificate does not name and a server
//! without TLS where TLS was asked for are refused with an error that says so, never served in
//! plain text; passwords never appear in errors. A server that is not there is skipped with a
//! printed reason, or fails the test under `IDEM_REQUIRE_SERVICES=1`.
#![cfg(any(feature = "redis", feature = "postgres"))]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use idempotency::{Call, ErrorPolicy, StorageKey, Store};

/// Reports an unreachable service: a failure under `IDEM_REQUIRE_SERVICES=1` (CI), else a
/// printed skip.
fn unavailable(what: &str, why: impl std::fmt::Display) {
    if std::env::var("IDEM_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{what} is required (IDEM_REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    eprintln!(
        "SKIPPED: {what} unavailable ({why}); set IDEM_REQUIRE_SERVICES=1 to make this a failure"
    );
}

/// A key no other run uses.
fn fresh_key(label: &str) -> StorageKey {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    StorageKey::derive("tls", &format!("{label}-{}-{nanos}", std::process::id())).unwrap()
}

/// One call through `store` runs its body, a second one with the same key replays it.
async fn round_trip(store: Arc<dyn Store>, label: &str) {
    let key = fresh_key(label);
    let first = Call::new(key.clone())
        .store(store.clone())
        .run(ErrorPolicy::never(), async {
            Ok::<_, idempotency::Error>(1u32)
        })
        .await
        .expect("the first call runs");
    let second = Call::new(key)
        .store(store)
        .run(ErrorPolicy::never(), async {
            Ok::<_, idempotency::Error>(2u32)
        })
        .await
        .expect("the second call replays");
    assert_eq!((first, second), (1, 1), "the second call replays the first");
}

/// The message of `e` followed by those of its sources, for assertions on what an error says.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(" <- ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use idempotency::redis::RedisOptions;
    use idempotency::RedisStore;
    use std::path::Path;

    fn url() -> String {
        std::env::var("IDEM_REDIS_TLS_URL")
            .unwrap_or_else(|_| "rediss://127.0.0.1:6380/?ca=/tmp/idem-redis-tls/ca.pem".into())
    }

    /// The directory of `.ci/redis-tls`'s certificates: `IDEM_REDIS_TLS_DIR`, else the folder of
    /// the URL's CA.
    fn dir() -> PathBuf {
        if let Ok(dir) = std::env::var("IDEM_REDIS_TLS_DIR") {
            return dir.into();
        }
        let url = url();
        url.split(['?', '&'])
            .find_map(|p| p.strip_prefix("ca="))
            .and_then(|ca| Path::new(ca).parent().map(Path::to_path_buf))
            .unwrap_or_else(|| "/tmp/idem-redis-tls".into())
    }

    /// `url()` without its query: `rediss://host:port/`.
    fn bare_url() -> String {
        url().split('?').next().unwrap().to_owned()
    }

    /// The TLS server's address, if its CA is there and the server answers; else the skip.
    async fn tls_redis() -> Option<String> {
        let ca = dir().join("ca.pem");
        if !ca.is_file() {
            unavailable(
                "the TLS Redis (.ci/redis-tls)",
                format!("no CA at {}", ca.display()),
            );
            return None;
        }
        match idempotency::connect(&url()).await {
            Ok(_) => Some(url()),
            Err(e) => {
                unavailable("the TLS Redis (.ci/redis-tls)", chain(&e));
                None
            }
        }
    }

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn ca_url(ca: &str) -> String {
        format!("{}?ca={}", bare_url(), dir().join(ca).display())
    }

    #[tokio::test]
    async fn a_call_round_trips_over_tls() {
        let Some(url) = tls_redis().await else { return };
        let store = idempotency::connect(&url).await.expect("connects");
        round_trip(store, "redis").await;
    }

    #[tokio::test]
    async fn a_root_certificate_can_be_given_in_code_and_the_host_name_is_checked() {
        if tls_redis().await.is_none() {
            return;
        }
        let options = RedisOptions::new().root_certificate(pem("ca.pem"));
        let store = RedisStore::connect_with(&bare_url(), &options)
            .await
            .expect("connects with the CA from the options");
        round_trip(Arc::new(store), "redis-options").await;

        // The certificate names localhost too.
        let by_name = bare_url().replace("127.0.0.1", "localhost");
        RedisStore::connect_with(&by_name, &options)
            .await
            .expect("connects through the name the certificate holds");
    }

    #[tokio::test]
    async fn a_wrong_ca_is_refused() {
        if tls_redis().await.is_none() {
            return;
        }
        let err = idempotency::connect(&ca_url("wrong-ca.pem"))
            .await
            .err()
            .expect("a certificate from another CA is refused");
        let text = chain(&err);
        eprintln!("refused as it should be: {text}");
        assert!(matches!(err, idempotency::Error::Store { .. }), "{text}");
        assert!(text.contains("TLS"), "{text}");
        assert!(text.contains("certificate"), "{text}");

        // The system's roots do not know the test CA either.
        let err = idempotency::connect(&bare_url())
            .await
            .err()
            .expect("a certificate of an unknown CA is refused");
        assert!(chain(&err).contains("certificate"), "{}", chain(&err));

        // Nor is the store's own CA taken for any other: the options' CA is the wrong one.
        let options = RedisOptions::new().root_certificate(pem("wrong-ca.pem"));
        assert!(RedisStore::connect_with(&bare_url(), &options)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn rediss_to_a_plain_text_server_is_an_error_not_a_downgrade() {
        let plain =
            std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        if let Err(e) = RedisStore::connect(&plain).await {
            unavailable("Redis (IDEM_REDIS_URL)", chain(&e));
            return;
        }
        let ca = dir().join("ca.pem");
        let tls = plain.replacen("redis://", "rediss://", 1);
        let tls = if ca.is_file() {
            format!("{}/?ca={}", tls.trim_end_matches('/'), ca.display())
        } else {
            tls
        };
        let started = std::time::Instant::now();
        let err = idempotency::connect(&tls)
            .await
            .err()
            .expect("TLS to a plain-text server fails");
        let text = chain(&err);
        eprintln!("refused as it should be: {text}");
        assert!(text.contains("TLS"), "{text}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "fails at once"
        );

        // And the TLS settings of a plain URL are refused, not ignored.
        let err = idempotency::connect(&format!("{}/?ca=/tmp/ca.pem", plain.trim_end_matches('/')))
            .await
            .err()
            .expect("`ca` needs rediss://");
        assert!(matches!(err, idempotency::Error::Config { .. }), "{err}");
    }

    #[tokio::test]
    async fn client_certificates_are_presented() {
        if tls_redis().await.is_none() {
            return;
        }
        let d = dir();
        let url = format!(
            "{}&cert={}&key={}",
            url(),
            d.join("client.pem").display(),
            d.join("client-key.pem").display()
        );
        let store = idempotency::connect(&url)
            .await
            .expect("a client certificate the server's CA signed is accepted");
        round_trip(store, "redis-client-cert").await;

        let options = RedisOptions::new()
            .root_certificate(pem("ca.pem"))
            .client_certificate(pem("wrong-client.pem"), pem("wrong-client-key.pem"));
        assert!(
            RedisStore::connect_with(&bare_url(), &options)
                .await
                .is_err(),
            "the server refuses a client certificate of another CA"
        );
    }

    /// The TLS cluster of `.ci/redis-tls` (`IDEM_REDIS_TLS_CLUSTER_URL`).
    fn cluster_url() -> String {
        std::env::var("IDEM_REDIS_TLS_CLUSTER_URL").unwrap_or_else(|_| {
            format!(
                "rediss+cluster://127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102/?ca={}",
                dir().join("ca.pem").display()
            )
        })
    }

    #[tokio::test]
    async fn a_call_round_trips_over_tls_on_a_cluster() {
        let store = match idempotency::connect(&cluster_url()).await {
            Ok(store) => store,
            Err(e) => {
                unavailable("the TLS Redis Cluster (.ci/redis-tls)", chain(&e));
                return;
            }
        };
        round_trip(store, "redis-cluster").await;

        // The cluster's nodes are checked as the single server is: a wrong CA is refused.
        let wrong = cluster_url().replace("/ca.pem", "/wrong-ca.pem");
        let err = idempotency::connect(&wrong)
            .await
            .err()
            .expect("a certificate from another CA is refused");
        let text = chain(&err);
        eprintln!("refused as it should be: {text}");
        assert!(
            text.contains("TLS") && text.contains("certificate"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn passwords_never_appear_in_errors() {
        if tls_redis().await.is_none() {
            return;
        }
        let secret = "s3cret-Pa55word";
        let with_password = url().replacen("rediss://", &format!("rediss://ghost:{secret}@"), 1);
        let err = idempotency::connect(&with_password)
            .await
            .err()
            .expect("an unknown user is refused");
        let text = format!("{} {err:?}", chain(&err));
        assert!(!text.contains(secret), "{text}");

        let cluster = format!("rediss+cluster://ghost:{secret}@127.0.0.1:1/?ca=/nonexistent.pem");
        let err = idempotency::connect(&cluster).await.err().expect("refused");
        let text = format!("{} {err:?}", chain(&err));
        assert!(!text.contains(secret), "{text}");

        let err = idempotency::connect(&format!("redis-ish://u:{secret}@h"))
            .await
            .err()
            .expect("an unknown scheme");
        let text = format!("{} {err:?}", chain(&err));
        assert!(!text.contains(secret), "{text}");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_runtime::store::postgres::PostgresOptions;
    use idempotency::PostgresStore;

    fn url() -> String {
        std::env::var("IDEM_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// `url()` with `params` added to its query.
    fn with(params: &str) -> String {
        let url = url();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{params}")
    }

    /// The server's address when it is reachable over TLS; else the skip.
    async fn tls_postgres() -> Option<PostgresStore> {
        match PostgresStore::connect(&with("sslmode=require")).await {
            Ok(store) => Some(store),
            Err(e) => {
                unavailable("PostgreSQL with TLS (IDEM_POSTGRES_URL)", chain(&e));
                None
            }
        }
    }

    /// Whether the store's connections are encrypted, as the server sees them.
    async fn encrypted(store: &PostgresStore) -> bool {
        let client = store.pool().get().await.expect("a connection");
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        row.get(0)
    }

    /// The server's certificate file (`ssl_cert_file`), if the tests can read it.
    async fn server_certificate(store: &PostgresStore) -> Option<PathBuf> {
        let client = store.pool().get().await.ok()?;
        let row = client.query_one("SHOW ssl_cert_file", &[]).await.ok()?;
        let path = PathBuf::from(row.get::<_, String>(0));
        let path = if path.is_relative() {
            let dir = client.query_one("SHOW data_directory", &[]).await.ok()?;
            PathBuf::from(dir.get::<_, String>(0)).join(path)
        } else {
            path
        };
        std::fs::read(&path).ok().map(|_| path)
    }

    /// A CA that signed nothing the server has: `.ci/redis-tls`'s, else a self-made file.
    fn unrelated_ca() -> Option<PathBuf> {
        ["IDEM_REDIS_TLS_DIR"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(PathBuf::from)
            .chain([PathBuf::from("/tmp/idem-redis-tls")])
            .map(|d| d.join("wrong-ca.pem"))
            .find(|p| p.is_file())
    }

    #[tokio::test]
    async fn sslmode_require_encrypts_and_a_call_round_trips() {
        let Some(store) = tls_postgres().await else {
            return;
        };
        assert!(encrypted(&store).await, "sslmode=require is TLS");
        let store = idempotency::connect(&with("sslmode=require"))
            .await
            .expect("connects");
        round_trip(store, "postgres").await;

        // Without sslmode: plain text, as before.
        let plain = PostgresStore::connect(&url()).await.expect("connects");
        assert!(!encrypted(&plain).await, "no sslmode is plain text");
        // prefer: TLS, since the server offers it.
        let prefer = PostgresStore::connect(&with("sslmode=prefer"))
            .await
            .expect("connects");
        assert!(
            encrypted(&prefer).await,
            "sslmode=prefer takes TLS when offered"
        );
    }

    #[tokio::test]
    async fn the_servers_own_certificate_verifies_it() {
        let Some(store) = tls_postgres().await else {
            return;
        };
        let Some(cert) = server_certificate(&store).await else {
            unavailable(
                "the PostgreSQL server's certificate",
                "ssl_cert_file is not readable",
            );
            return;
        };
        let cert = cert.display().to_string();
        // verify-ca: the chain only (the certificate is self-signed: it is its own root).
        let verified =
            PostgresStore::connect(&with(&format!("sslmode=verify-ca&sslrootcert={cert}")))
                .await
                .expect("verify-ca with the server's certificate as the root");
        assert!(encrypted(&verified).await);
        // The same root given in code: verify-full by default.
        let options = PostgresOptions::new().root_certificate(std::fs::read(&cert).unwrap());
        let name = certificate_name(&cert);
        match name.as_deref().filter(|n| resolves_here(n)) {
            Some(name) => {
                let by_name = url().replacen("127.0.0.1", name, 1);
                let store = PostgresStore::connect_with(&by_name, &options)
                    .await
                    .expect("verify-full through the name the certificate holds");
                assert!(encrypted(&store).await);
            }
            None => eprintln!(
                "SKIPPED (part): the server certificate's name {name:?} does not lead to this machine"
            ),
        }
        // verify-full through 127.0.0.1, which the certificate does not name (unless it does).
        if name.as_deref() != Some("127.0.0.1") {
            let err =
                PostgresStore::connect(&with(&format!("sslmode=verify-full&sslrootcert={cert}")))
                    .await
                    .expect_err("a host the certificate does not name is refused");
            let text = chain(&err);
            eprintln!("refused as it should be: {text}");
            assert!(
                text.contains("TLS") && text.contains("certificate"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_wrong_root_certificate_is_refused() {
        if tls_postgres().await.is_none() {
            return;
        }
        let Some(wrong) = unrelated_ca() else {
            unavailable(
                "an unrelated CA (.ci/redis-tls's wrong-ca.pem)",
                "run .ci/redis-tls",
            );
            return;
        };
        let wrong = wrong.display().to_string();
        for mode in ["verify-full", "verify-ca", "require"] {
            let err = PostgresStore::connect(&with(&format!("sslmode={mode}&sslrootcert={wrong}")))
                .await
                .err()
                .unwrap_or_else(|| {
                    panic!("sslmode={mode} with a wrong root certificate is refused")
                });
            let text = chain(&err);
            eprintln!("refused as it should be: {text}");
            assert!(
                text.contains("TLS") && text.contains("certificate"),
                "{mode}: {text}"
            );
        }
    }

    /// A server that answers `N` to the TLS request (no TLS) and then hangs up.
    async fn plain_text_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..8 {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_server_without_tls_is_refused_where_tls_was_asked_for() {
        let addr = plain_text_server().await;
        let mut urls = vec![format!("postgres://postgres@{addr}/test?sslmode=require")];
        if let Some(ca) = unrelated_ca() {
            for mode in ["verify-ca", "verify-full"] {
                urls.push(format!(
                    "postgres://postgres@{addr}/test?sslmode={mode}&sslrootcert={}",
                    ca.display()
                ));
            }
        }
        for url in urls {
            let err = PostgresStore::connect(&url)
                .await
                .err()
                .unwrap_or_else(|| panic!("{url}: a plain-text server is refused"));
            let text = chain(&err);
            eprintln!("refused as it should be: {text}");
            assert!(text.contains("TLS"), "{url}: {text}");
        }
    }

    /// The common name of the certificate in `path` (`openssl x509`), if openssl is there.
    fn certificate_name(path: &str) -> Option<String> {
        let out = std::process::Command::new("openssl")
            .args([
                "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", path,
            ])
            .output()
            .ok()?;
        let subject = String::from_utf8(out.stdout).ok()?;
        subject
            .trim()
            .trim_start_matches("subject=")
            .split(',')
            .find_map(|rdn| rdn.trim().strip_prefix("CN="))
            .map(str::to_owned)
    }

    /// Whether `name` resolves to this machine only.
    fn resolves_here(name: &str) -> bool {
        use std::net::ToSocketAddrs;
        (name, 5432)
            .to_socket_addrs()
            .map(|addrs| {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn passwords_never_appear_in_errors() {
        let secret = "s3cret-Pa55word";
        let url = url();
        let Some(rest) = url.strip_prefix("postgres://") else {
            unavailable("a postgres:// IDEM_POSTGRES_URL", &url);
            return;
        };
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let cases = [
            // A role that does not exist (the server trusts local users, so a wrong password
            // alone would pass).
            format!("postgres://ghost:{secret}@{host}"),
            format!("postgres://ghost:{secret}@{host}?sslmode=require"),
            format!("postgres://postgres:{secret}@127.0.0.1:notaport/test"),
            format!("postgres://postgres:{secret}@127.0.0.1:1/test?sslmode=verify-full&sslrootcert=/nonexistent.pem"),
            format!("postgres://postgres:{secret}@127.0.0.1:1/test?sslmode=sometimes"),
            format!("host=127.0.0.1 port=1 user=ghost password={secret} sslmode=require connect_timeout=2"),
            format!("postgresish://u:{secret}@h"),
        ];
        for case in cases {
            if let Err(err) = idempotency::connect(&case).await {
                let text = format!("{} {err:?}", chain(&err));
                assert!(!text.contains(secret), "{case}: {text}");
            }
        }
    }
}
