//! Reading the eviction policy (`maxmemory-policy`) of every node a connection reaches, which
//! [`RedisStore::connect`](super::RedisStore::connect) checks.

use redis::{RedisError, Value};

use super::connection::Connection;

/// The `maxmemory-policy` of every node the connection reaches (one for a single server, every
/// master and replica of a cluster), as `(node, policy)`. Read with `CONFIG GET`, or from
/// `INFO memory` where `CONFIG` is not allowed (managed services often rename or block it).
pub(super) async fn eviction_policies(
    con: &Connection,
) -> Result<Vec<(String, String)>, RedisError> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("maxmemory-policy");
    let mut info = redis::cmd("INFO");
    info.arg("memory");
    let replies: Vec<(String, Value, Option<Value>)> = match con.clone() {
        Connection::Single(mut con) => {
            let reply = config.query_async::<Value>(&mut con).await;
            let fallback = match &reply {
                Ok(Value::ServerError(_)) | Err(_) => {
                    Some(info.query_async::<Value>(&mut con).await?)
                }
                Ok(_) => None,
            };
            vec![("server".into(), reply.unwrap_or(Value::Nil), fallback)]
        }
        Connection::Cluster(mut con) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let all = || RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
            let configs = per_node(con.route_command(config, all()).await?);
            let mut out = Vec::new();
            for (node, reply) in configs {
                let fallback = match reply {
                    Value::ServerError(_) => {
                        let infos = per_node(con.route_command(info.clone(), all()).await?);
                        infos.into_iter().find(|(n, _)| *n == node).map(|(_, v)| v)
                    }
                    _ => None,
                };
                out.push((node, reply, fallback));
            }
            out
        }
    };
    Ok(replies
        .into_iter()
        .map(|(node, config, info)| {
            let policy = config_value(&config)
                .or_else(|| info.as_ref().and_then(info_policy))
                .unwrap_or_else(|| "unknown".into());
            (node, policy)
        })
        .collect())
}

/// The `(node, reply)` pairs of a command sent to every node of a cluster.
pub(super) fn per_node(reply: Value) -> Vec<(String, Value)> {
    match reply {
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(node, v)| (text(&node).unwrap_or_default(), v))
            .collect(),
        other => vec![("cluster".into(), other)],
    }
}

/// The value of a `CONFIG GET name` reply: `[name, value]` (RESP2) or `{name: value}` (RESP3).
fn config_value(reply: &Value) -> Option<String> {
    match reply {
        Value::Array(items) if items.len() == 2 => text(&items[1]),
        Value::Map(pairs) => pairs.first().and_then(|(_, v)| text(v)),
        _ => None,
    }
}

/// `maxmemory_policy:<policy>` in an `INFO memory` reply.
fn info_policy(reply: &Value) -> Option<String> {
    let info = text(reply)?;
    info.lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(|p| p.trim().to_owned())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}
