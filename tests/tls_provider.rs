//! idem takes over no process-wide rustls setting: a PostgreSQL store connected with TLS leaves
//! rustls without a process default crypto provider, so the application's own
//! `CryptoProvider::install_default` still succeeds afterwards; a `rediss://` store connected
//! after that uses the application's provider and keeps it. (The `redis` crate needs a process
//! default for `rediss://`, so a Redis store connected first installs the provider of idem's
//! `tls-*` features: see `RedisStore`'s docs.)
//!
//! Its own test binary, so its own process: the process default is set at most once. Needs the
//! PostgreSQL of `IDEM_POSTGRES_URL` (with TLS, as this machine's serves it) and the TLS Redis
//! of `.ci/redis-tls` (`IDEM_REDIS_TLS_URL`); a service that is missing is skipped with a
//! printed reason, or fails the test under `IDEM_REQUIRE_SERVICES=1`.
#![cfg(all(feature = "redis", feature = "postgres"))]

use std::sync::Arc;

use idempotency::{Call, ErrorPolicy, PostgresStore, RedisStore, Store};
use rustls::crypto::CryptoProvider;

/// `url` with `param` added to its query.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A call through `store`, which must run its body once.
async fn one_call(store: Arc<dyn Store>, label: &str) {
    let out: Result<u32, idempotency::Error> = Call::new(idem_support::unique(label))
        .store(store)
        .run(ErrorPolicy::never(), async { Ok(5) })
        .await;
    assert_eq!(out.unwrap(), 5, "{label}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_with_tls_leaves_the_process_default_provider_to_the_application() {
    assert!(CryptoProvider::get_default().is_none(), "a fresh process");

    // PostgreSQL over TLS (`require`: TLS or nothing), then a call through it.
    let Some(table) = idem_support::postgres::fresh_table("tls_provider").await else {
        return;
    };
    let url = with_param(&idem_support::postgres::url(), "sslmode=require");
    let options = idempotency::postgres::PostgresOptions::new().table(&table);
    let store = match PostgresStore::connect_with(&url, &options).await {
        Ok(store) => store,
        Err(e) => {
            idem_support::unavailable("PostgreSQL with TLS", e);
            return;
        }
    };
    one_call(Arc::new(store), "tls-provider-pg").await;
    assert!(
        CryptoProvider::get_default().is_none(),
        "a PostgreSQL store over TLS installed a process-wide rustls provider"
    );

    // The application installs its own: it succeeds, as no one took the slot.
    rustls::crypto::ring::default_provider()
        .install_default()
        .expect("the application's install_default succeeds after idem connected");
    let installed = Arc::as_ptr(CryptoProvider::get_default().unwrap());

    // A rediss:// store connected now works with the application's provider, and keeps it.
    let url = std::env::var("IDEM_REDIS_TLS_URL")
        .unwrap_or_else(|_| "rediss://127.0.0.1:6380/?ca=/tmp/idem-redis-tls/ca.pem".into());
    match RedisStore::connect_with_prefix(&url, "idem-tls-provider").await {
        Ok(store) => one_call(Arc::new(store), "tls-provider-redis").await,
        Err(e) => idem_support::unavailable("the TLS Redis of .ci/redis-tls", e),
    }
    assert_eq!(
        Arc::as_ptr(CryptoProvider::get_default().unwrap()),
        installed,
        "the application's provider stays the process default"
    );
}
