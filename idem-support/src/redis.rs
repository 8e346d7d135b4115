//! Redis for the tests: a probe that fails at once when nothing listens, and stores under key
//! prefixes of their own on the server at `IDEM_REDIS_URL`.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::store::redis::redis::{self, aio::MultiplexedConnection};
use idem_runtime::{RedisStore, Store};
use idem_testkit::Intercept;

use crate::unavailable;

pub use crate::redis_url as url;

/// A plain connection to `url`, or why not, within 5 s. It fails at once when nothing listens,
/// where a store's connection manager would retry for a few seconds.
pub async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let connecting = client.get_multiplexed_async_connection();
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(con)) => Ok(con),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connecting timed out".to_owned()),
    }
}

/// A plain connection to the test server, or `None` after [`unavailable`].
pub async fn probe() -> Option<MultiplexedConnection> {
    connect(&url())
        .await
        .map_err(|e| unavailable("Redis", e))
        .ok()
}

/// A store on the test server under the prefix `<label>-<random>`, which no other test uses,
/// or `None` after [`unavailable`]. Its keys stay (records expire; fences after an hour).
pub async fn store(label: &str) -> Option<RedisStore> {
    probe().await?;
    let prefix = format!("{label}-{:016x}", rand::random::<u64>());
    RedisStore::connect_with_prefix(&url(), &prefix)
        .await
        .map_err(|e| unavailable("Redis", e))
        .ok()
}

/// [`store`], shared, and deleting its keys when dropped.
pub async fn fresh(label: &str) -> Option<Arc<dyn Store>> {
    let store = store(label).await?;
    let keys = DeletePrefix(store.prefix().to_owned());
    Some(Arc::new(Intercept::new(store).keeping(keys)))
}

/// Deletes every key under its prefix when dropped, whether the test passed or not.
pub struct DeletePrefix(pub String);

impl Drop for DeletePrefix {
    fn drop(&mut self) {
        delete_prefix(&self.0);
    }
}

/// Deletes every key under `prefix` (a test's records and fences) on the test server,
/// synchronously, so it can run from `Drop`. Best effort.
pub fn delete_prefix(prefix: &str) {
    delete_matching(&format!("{prefix}:*"));
}

/// Deletes every key matching the glob `pattern` on the test server, synchronously. Best
/// effort.
pub fn delete_matching(pattern: &str) {
    let Ok(mut con) = redis::Client::open(url()).and_then(|c| c.get_connection()) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut con)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut con);
    }
}

/// The Redis Cluster of the tests: `IDEM_REDIS_CLUSTER_URL`, by default the six nodes that
/// `.ci/redis-cluster` starts.
pub fn cluster_url() -> String {
    std::env::var("IDEM_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".to_owned()
    })
}

/// A store on the test cluster under the prefix `<label>-<random>`, or `None` after
/// [`unavailable`] (start the cluster with `.ci/redis-cluster`).
pub async fn cluster_store(label: &str) -> Option<RedisStore> {
    let prefix = format!("{label}-{:016x}", rand::random::<u64>());
    let options = idem_runtime::store::redis::RedisOptions::new().prefix(prefix);
    match tokio::time::timeout(
        Duration::from_secs(10),
        RedisStore::connect_with(&cluster_url(), &options),
    )
    .await
    {
        Ok(Ok(store)) => Some(store),
        Ok(Err(e)) => {
            unavailable("Redis Cluster (start it with .ci/redis-cluster)", e);
            None
        }
        Err(_) => {
            unavailable(
                "Redis Cluster (start it with .ci/redis-cluster)",
                "connecting timed out",
            );
            None
        }
    }
}
