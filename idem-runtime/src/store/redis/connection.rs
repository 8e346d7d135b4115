//! The store's connection: one server through a [`ConnectionManager`], or a Redis Cluster
//! through the `redis` crate's async cluster client, behind one type that sends commands.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisError, RedisFuture,
    TlsCertificates, Value,
};

use super::tls::{check_tls, connect_error, tls_settings, Tls};
use super::{redis_error, RedisOptions};
use crate::error::{Error, Result};

/// The eviction policies of the nodes a connection reaches (see the `eviction` module).
pub(super) use super::eviction::eviction_policies;

/// How long one connection attempt may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to one server or to a cluster. Both are multiplexed and cheap to clone, and
/// reconnect by themselves; the cluster connection follows `MOVED`/`ASK` redirections and
/// topology changes (a failover) and routes each command by the slot of its first key.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(con) => con.req_packed_command(cmd),
            Connection::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(con) => con.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(con) => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(con) => con.get_db(),
            Connection::Cluster(con) => con.get_db(),
        }
    }
}

/// How to reach the server or cluster again, for connections of other kinds than the
/// store's own (the subscriber that wakes waiters). Both carry the store's TLS settings.
#[derive(Clone)]
pub(super) enum Endpoint {
    Single(Client),
    Cluster(ClusterNodes),
}

/// The node URLs a cluster client starts from, and the certificates of a TLS cluster.
#[derive(Clone)]
pub(super) struct ClusterNodes {
    urls: Vec<String>,
    certificates: Option<TlsCertificates>,
}

/// Connects to one server: RESP3 unless the URL chooses a protocol, falling back to RESP2 for
/// a server that answers but refuses RESP3 (`HELLO`, before Redis 6). A `rediss://` URL
/// connects with TLS: the server's certificate must chain to the roots of `?ca=` or
/// [`RedisOptions::root_certificate`] (else the system's) and name the URL's host.
pub(super) async fn single(
    url: &str,
    options: &RedisOptions,
    response_timeout: Duration,
) -> Result<(Connection, Endpoint)> {
    let (url, tls) = tls_settings(url, options)?;
    let url = url.as_str();
    let mut info = url.into_connection_info().map_err(redis_error)?;
    let address = info.addr().to_string();
    check_tls(info.addr(), tls.as_ref())?;
    let chose_protocol = url.contains("protocol=");
    let with_protocol = |info: redis::ConnectionInfo, protocol| {
        let settings = info.redis_settings().clone().set_protocol(protocol);
        info.set_redis_settings(settings)
    };
    if !chose_protocol {
        info = with_protocol(info, ProtocolVersion::RESP3);
    }
    let fail = |e: RedisError| connect_error(&address, tls.is_some(), e);
    let client = client(info.clone(), tls.as_ref()).map_err(fail)?;
    match manager(&client, response_timeout).await {
        Ok(con) => Ok((Connection::Single(con), Endpoint::Single(client))),
        Err(e) if !chose_protocol && !e.is_io_error() => {
            let client = self::client(with_protocol(info, ProtocolVersion::RESP2), tls.as_ref())
                .map_err(fail)?;
            let con = manager(&client, response_timeout).await.map_err(fail)?;
            Ok((Connection::Single(con), Endpoint::Single(client)))
        }
        Err(e) => Err(fail(e)),
    }
}

/// The client of one server, with `tls` for a `rediss://` one (`None`: the URL's settings).
fn client(info: redis::ConnectionInfo, tls: Option<&Tls>) -> Result<Client, RedisError> {
    match tls.and_then(|tls| tls.certificates.as_ref()) {
        Some(certificates) => Client::build_with_tls(info, certificates.clone()),
        None => Client::open(info),
    }
}

async fn manager(
    client: &Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    // One connection attempt per (re)connect, no backoff: the redis crate's backoff starts at a
    // second and would hold every call during an outage for seconds before it fails. Instead a
    // refused connection fails the call at once, and the store's single retry on refusal picks
    // up a server that has come back.
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    client.get_connection_manager_with_config(config).await
}

/// Connects to a Redis Cluster through any of `nodes` (`redis://host:port` or `rediss://`
/// URLs; user and password are taken from the URLs, the TLS settings from their `ca`, `cert`
/// and `key` parameters and `options`). RESP3 unless a URL chooses RESP2.
pub(super) async fn cluster(
    nodes: &[String],
    options: &RedisOptions,
    response_timeout: Duration,
) -> Result<(Connection, Endpoint)> {
    let mut urls = Vec::with_capacity(nodes.len());
    let mut tls: Option<Tls> = None;
    for node in nodes {
        let (url, node_tls) = tls_settings(node, options)?;
        let info = url.as_str().into_connection_info().map_err(redis_error)?;
        check_tls(info.addr(), node_tls.as_ref())?;
        if urls.is_empty() {
            tls = node_tls;
        } else if tls.is_some() != node_tls.is_some() {
            return Err(Error::config(
                "the node URLs of a Redis Cluster must all be `rediss://` (TLS) or all `redis://`",
            ));
        }
        urls.push(url);
    }
    let nodes = ClusterNodes {
        urls,
        certificates: tls.as_ref().and_then(|tls| tls.certificates.clone()),
    };
    let address = nodes
        .urls
        .iter()
        .filter_map(|u| u.as_str().into_connection_info().ok())
        .map(|info| info.addr().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let fail = |e: RedisError| connect_error(&address, tls.is_some(), e);
    let con = cluster_builder(&nodes, response_timeout)
        .build()
        .map_err(fail)?
        .get_async_connection()
        .await
        .map_err(fail)?;
    Ok((Connection::Cluster(con), Endpoint::Cluster(nodes)))
}

/// The builder of a cluster client for `nodes`: timeouts, protocol and TLS certificates.
pub(super) fn cluster_builder(
    nodes: &ClusterNodes,
    response_timeout: Duration,
) -> ClusterClientBuilder {
    let protocol = if nodes.urls.iter().any(|n| n.contains("protocol=resp2")) {
        ProtocolVersion::RESP2
    } else {
        ProtocolVersion::RESP3
    };
    let builder = ClusterClientBuilder::new(nodes.urls.iter().map(String::as_str))
        .connection_timeout(CONNECTION_TIMEOUT)
        .response_timeout(response_timeout)
        .use_protocol(protocol);
    match &nodes.certificates {
        // Only for `rediss://` nodes (`cluster` checks it): `certs` turns TLS on.
        Some(certificates) => builder.certs(certificates.clone()),
        None => builder,
    }
}

/// The node URLs of a `redis+cluster://[user:password@]host:port,host:port,...[/?query]` URL
/// (`rediss+cluster://` for TLS): one `redis://[user:password@]host:port[/?query]` URL per
/// node, built and normalised by the `url` crate. A cluster has one database, so a path
/// (`/0`) is dropped; the query goes to every node.
///
/// Only the host list is cut out by hand, as no URL parser reads several hosts: it ends where
/// the authority does (at the first `/`, `?` or `#`) and starts after the last `@` before
/// that. A node URL that `url` refuses is passed on as written, for the `redis` crate to
/// report.
pub(super) fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return None,
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|host| !host.is_empty())
        .map(|host| {
            let written = format!("{scheme}://{userinfo}{host}{tail}");
            match url::Url::parse(&written) {
                Ok(mut node) => {
                    node.set_path(if node.query().is_some() { "/" } else { "" });
                    node.into()
                }
                Err(_) => written,
            }
        })
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Sends `WAIT replicas timeout` to the master of `key`'s slot, on the connection that sent
/// the write, and returns how many replicas acknowledged it.
pub(super) async fn wait_replicas(
    con: &Connection,
    key: &str,
    replicas: u32,
    timeout: Duration,
) -> Result<u64, RedisError> {
    let mut wait = redis::cmd("WAIT");
    wait.arg(replicas).arg(
        u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    );
    match con.clone() {
        Connection::Single(mut con) => wait.query_async(&mut con).await,
        Connection::Cluster(mut con) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = Route::with_key(key, SlotAddr::Master);
            let reply = con
                .route_command(
                    wait,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?;
            redis::from_redis_value(reply).map_err(RedisError::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_become_node_urls() {
        assert_eq!(
            cluster_nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p@a:1,b:2/?protocol=resp2").unwrap(),
            [
                "rediss://u:p@a:1/?protocol=resp2",
                "rediss://u:p@b:2/?protocol=resp2"
            ]
        );
        // The path (a database) is dropped; credentials are normalised as `url` does, which
        // the redis crate decodes to the same password.
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@ss@a:1,,b:2/0").unwrap(),
            ["redis://u:p%40ss@a:1", "redis://u:p%40ss@b:2"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://:s3cret@a:1,b:2?ca=%2Fx.pem&protocol=resp2").unwrap(),
            [
                "rediss://:s3cret@a:1/?ca=%2Fx.pem&protocol=resp2",
                "rediss://:s3cret@b:2/?ca=%2Fx.pem&protocol=resp2"
            ]
        );
        // A node that is no URL is passed on, for the redis crate to report.
        assert_eq!(
            cluster_nodes("redis+cluster://a:1,b:port").unwrap(),
            ["redis://a:1", "redis://b:port"]
        );
        assert!(cluster_nodes("redis+cluster://").is_none());
        assert!(cluster_nodes("redis+cluster://u:p@/?x=1").is_none());
        assert!(cluster_nodes("redis+unix:///run/redis.sock").is_none());
        assert!(cluster_nodes("redis://a:1").is_none());
    }
}
