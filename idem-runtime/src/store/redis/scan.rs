//! Listing the records ([`Store::scan`](crate::store::Store::scan)): `SCAN` with a pattern
//! that only record keys match, on the server, or on each master of a cluster in turn (in the
//! order of their addresses); the store then reads each record it found with the inspect
//! script.
//!
//! The cursor handed out is `SCAN`'s own on a single server, and `<SCAN cursor>@<host>:<port>`
//! of the master being walked on a cluster. A listing over a failover may miss the records of
//! the master that failed (its replica has another address), or fail with [`Error::Store`] if
//! the master it was walking left: list again.

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisResult, Value};

use super::connection::Connection;
use super::eviction::per_node;
use super::redis_error;
use crate::error::{Error, Result};
use crate::key::StorageKey;

/// The glob pattern of the record keys under `prefix`: the prefix (its glob characters
/// escaped), `:{`, 64 characters and `}`. A fence (`...}:fence`) or a channel does not match.
pub(super) fn pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 67);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str(":{");
    pattern.push_str(&"?".repeat(64));
    pattern.push('}');
    pattern
}

/// The storage key of the record key `record` (`{prefix}:{<hex>}`), if it is one.
pub(super) fn storage_key(prefix: &str, record: &str) -> Option<StorageKey> {
    let hex = record
        .strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix('}')?;
    StorageKey::from_hex(hex)
}

/// The next record keys of a listing (about `count` of them, maybe none) that starts at
/// `cursor` (`None`: the beginning), and the cursor that goes on (`None`: the listing is done).
pub(super) async fn record_keys(
    con: &Connection,
    cursor: Option<&str>,
    pattern: &str,
    count: usize,
) -> Result<(Vec<String>, Option<String>)> {
    let scan = |at: u64| {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count.max(1));
        cmd
    };
    match con.clone() {
        Connection::Single(mut con) => {
            let at = match cursor {
                None => 0,
                Some(c) => c.parse().map_err(|_| bad_cursor(c))?,
            };
            let cmd = scan(at);
            // Retried once on a refused connection, as the store's other commands are.
            let reply = match cmd.query_async::<(u64, Vec<String>)>(&mut con).await {
                Err(e) if e.is_connection_refusal() => cmd.query_async(&mut con).await,
                reply => reply,
            };
            let (next, keys) = reply.map_err(redis_error)?;
            Ok((keys, (next != 0).then(|| next.to_string())))
        }
        Connection::Cluster(mut con) => {
            let (node, at) = match cursor {
                Some(c) => {
                    let (at, node) = c.split_once('@').ok_or_else(|| bad_cursor(c))?;
                    (node.to_owned(), at.parse().map_err(|_| bad_cursor(c))?)
                }
                None => match masters(&mut con).await.map_err(redis_error)?.first() {
                    Some(first) => (first.clone(), 0),
                    None => return Ok((Vec::new(), None)),
                },
            };
            let (host, port) = node
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                .ok_or_else(|| bad_cursor(cursor.unwrap_or(&node)))?;
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let reply = con.route_command(scan(at), route).await;
            let (next, keys): (u64, Vec<String>) = reply
                .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
                .map_err(redis_error)?;
            let next = if next != 0 {
                Some(format!("{next}@{node}"))
            } else {
                // This master is done: the next one in the order of addresses.
                let masters = masters(&mut con).await.map_err(redis_error)?;
                masters
                    .into_iter()
                    .find(|m| *m > node)
                    .map(|m| format!("0@{m}"))
            };
            Ok((keys, next))
        }
    }
}

/// The addresses (`host:port`) of the cluster's masters, in order.
async fn masters(con: &mut ClusterConnection) -> RedisResult<Vec<String>> {
    let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let reply: Value = con.route_command(redis::cmd("PING"), all).await?;
    let mut masters: Vec<String> = per_node(reply).into_iter().map(|(node, _)| node).collect();
    masters.sort_unstable();
    Ok(masters)
}

fn bad_cursor(cursor: &str) -> Error {
    Error::config(format!(
        "`{cursor}` is not a cursor of this store's listing: pass the `next` of the page before, or none to start"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_matches_record_keys_alone() {
        assert_eq!(pattern("idem"), format!("idem:{{{}}}", "?".repeat(64)));
        assert_eq!(
            pattern("a*b?[c]\\"),
            format!("a\\*b\\?\\[c\\]\\\\:{{{}}}", "?".repeat(64))
        );
        let key = StorageKey::from_hex(&"ab".repeat(32)).unwrap();
        let record = format!("app:idem:{{{}}}", key.as_str());
        assert_eq!(storage_key("app:idem", &record), Some(key.clone()));
        assert_eq!(storage_key("app:idem", &format!("{record}:fence")), None);
        assert_eq!(storage_key("other", &record), None);
        assert_eq!(storage_key("app:idem", "app:idem:{not hex}"), None);
    }
}
