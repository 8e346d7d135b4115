//! Reading the eviction policy (`maxmemory-policy`) of every node a connection reaches, which
//! [`RedisStore::connect`](super::RedisStore::connect) checks, and [`EvictionWatch`], which
//! checks it again while the store runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{RedisError, Value};

use super::connection::Connection;
use crate::error::{Error, Result};

/// The error of a node whose `maxmemory-policy` may evict idem's records: at connect, and for
/// the claims after an [`EvictionWatch`] saw such a policy.
pub(super) fn evicting_policy(node: &str, policy: &str) -> Error {
    Error::config(format!(
        "Redis ({node}) has maxmemory-policy `{policy}`, which may evict idem's records (they carry a TTL, so even the volatile-* policies evict them), and an evicted record lets a second caller run the body. Set `maxmemory-policy noeviction` (`CONFIG SET maxmemory-policy noeviction`, redis.conf, or your provider's parameter group), or accept lost records explicitly with RedisOptions::allow_eviction(true) or `?allow_eviction=true` in the URL"
    ))
}

/// The first node whose policy is not `noeviction`, and its policy.
pub(super) fn first_evicting(policies: &[(String, String)]) -> Option<(&str, &str)> {
    policies
        .iter()
        .find(|(_, p)| p != "noeviction")
        .map(|(n, p)| (n.as_str(), p.as_str()))
}

/// Checks the eviction policy again while a store runs, so that `CONFIG SET maxmemory-policy
/// allkeys-lru` after connect does not go unnoticed (see
/// [`RedisOptions::eviction_check_interval`](super::RedisOptions::eviction_check_interval)).
///
/// At most once per interval, the one claim that finds the last check too old (an atomic
/// "next check at") sends one `CONFIG GET maxmemory-policy` (to every node of a cluster)
/// before its own claim; the other claims go on without waiting. Once a check sees an
/// evicting policy, every claim is refused with [`Error::Config`] until a later check sees
/// `noeviction` everywhere again. A node that refuses `CONFIG` (renamed or blocked, as on
/// some managed services) is left out, as its policy can only be read at connect (`INFO`); if
/// every node refuses it, the watch stops checking. A check that fails (the connection is down)
/// changes nothing: the claim itself will report the store's failure.
pub(super) struct EvictionWatch {
    interval: Duration,
    /// Where the watch's clock starts.
    start: Instant,
    /// When the next check is due, in milliseconds since `start`.
    next_check: AtomicU64,
    /// Whether `CONFIG` was refused by every node: no more checks.
    off: AtomicBool,
    /// The node and policy the last check refused (`None`: none seen).
    refused: Mutex<Option<(String, String)>>,
    /// Whether `refused` holds one: read by every claim without taking the lock.
    refusing: AtomicBool,
}

impl EvictionWatch {
    /// A watch whose first check is due `interval` from now (the store checked at connect).
    pub(super) fn new(interval: Duration) -> Self {
        EvictionWatch {
            interval,
            start: Instant::now(),
            next_check: AtomicU64::new(millis(interval)),
            off: AtomicBool::new(false),
            refused: Mutex::new(None),
            refusing: AtomicBool::new(false),
        }
    }

    /// `Ok` if claims may go on: checks the policy first if a check is due and no other caller
    /// took it, then answers with what the last check saw.
    pub(super) async fn check(&self, con: &Connection) -> Result<()> {
        if self.is_due() {
            // Boxed: a rare step, kept out of the state of every claim's future.
            Box::pin(self.recheck(con)).await;
        }
        if !self.refusing.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.refused.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((node, policy)) => Err(evicting_policy(node, policy)),
            None => Ok(()),
        }
    }

    /// Whether this caller is the one to check now: the check is due, and this caller moved
    /// "next check at" on by an interval before any other did.
    fn is_due(&self) -> bool {
        if self.off.load(Ordering::Relaxed) {
            return false;
        }
        let now = millis(self.start.elapsed());
        let due = self.next_check.load(Ordering::Acquire);
        now >= due
            && self
                .next_check
                .compare_exchange(
                    due,
                    now.saturating_add(millis(self.interval)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    async fn recheck(&self, con: &Connection) {
        let replies = match config_policies(con).await {
            Ok(replies) => replies,
            Err(e) => {
                tracing::debug!(error = %e, "could not read Redis's maxmemory-policy; checking again in the next interval");
                return;
            }
        };
        if replies.iter().all(|(_, policy)| policy.is_none()) {
            tracing::debug!(
                "Redis refuses CONFIG GET: its eviction policy is checked at connect only"
            );
            self.off.store(true, Ordering::Relaxed);
            return;
        }
        let known: Vec<(String, String)> = replies
            .into_iter()
            .filter_map(|(node, policy)| Some((node, policy?)))
            .collect();
        let found = first_evicting(&known).map(|(n, p)| (n.to_owned(), p.to_owned()));
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match (&*refused, &found) {
            (None, Some((node, policy))) => tracing::error!(
                node = %node,
                policy = %policy,
                "Redis's maxmemory-policy now may evict idem's records: new claims are refused until it is `noeviction` again"
            ),
            (Some(_), None) => {
                tracing::warn!("Redis's maxmemory-policy is `noeviction` again: claims go on")
            }
            _ => {}
        }
        self.refusing.store(found.is_some(), Ordering::Release);
        *refused = found;
    }
}

/// `d` in whole milliseconds (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `CONFIG GET maxmemory-policy` on every node the connection reaches, as `(node, policy)`;
/// `None` for a node that refused the command.
async fn config_policies(con: &Connection) -> Result<Vec<(String, Option<String>)>, RedisError> {
    Ok(config_replies(con)
        .await?
        .into_iter()
        .map(|(node, reply)| (node, config_value(&reply)))
        .collect())
}

/// The replies of `CONFIG GET maxmemory-policy` from every node the connection reaches, as
/// `(node, reply)`; a node that refused the command answered a `Value::ServerError` (or, for a
/// single server, `Value::Nil`). `Err` only if a reply did not arrive.
async fn config_replies(con: &Connection) -> Result<Vec<(String, Value)>, RedisError> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("maxmemory-policy");
    match con.clone() {
        Connection::Single(mut con) => match config.query_async::<Value>(&mut con).await {
            Ok(reply) => Ok(vec![("server".into(), reply)]),
            // An error the server answered (`ERR unknown command`, `NOPERM`): a refusal.
            Err(e) if e.code().is_some() => Ok(vec![("server".into(), Value::Nil)]),
            Err(e) => Err(e),
        },
        Connection::Cluster(mut con) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
            Ok(per_node(con.route_command(config, all).await?))
        }
    }
}

/// The `maxmemory-policy` of every node the connection reaches (one for a single server, every
/// master and replica of a cluster), as `(node, policy)`. Read with `CONFIG GET`, or from
/// `INFO memory` where `CONFIG` is not allowed (managed services often rename or block it).
pub(super) async fn eviction_policies(
    con: &Connection,
) -> Result<Vec<(String, String)>, RedisError> {
    let mut out = Vec::new();
    let mut infos: Option<Vec<(String, Value)>> = None;
    for (node, reply) in config_replies(con).await? {
        let policy = match config_value(&reply) {
            Some(policy) => Some(policy),
            None => {
                if infos.is_none() {
                    infos = Some(info_replies(con).await?);
                }
                let info = infos.iter().flatten().find(|(n, _)| *n == node);
                info.and_then(|(_, v)| info_policy(v))
            }
        };
        out.push((node, policy.unwrap_or_else(|| "unknown".into())));
    }
    Ok(out)
}

/// The replies of `INFO memory` from every node the connection reaches, as `(node, reply)`.
async fn info_replies(con: &Connection) -> Result<Vec<(String, Value)>, RedisError> {
    let mut info = redis::cmd("INFO");
    info.arg("memory");
    match con.clone() {
        Connection::Single(mut con) => {
            Ok(vec![("server".into(), info.query_async(&mut con).await?)])
        }
        Connection::Cluster(mut con) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
            Ok(per_node(con.route_command(info, all).await?))
        }
    }
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
