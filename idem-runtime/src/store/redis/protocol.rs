//! The store protocol on Redis: each step one script (or one `HGETALL`), one round trip.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;

use super::reply::{parse_claim, parse_forgotten, parse_record, parse_steps, parse_summary};
use super::{
    fence_millis, in_flight_millis, millis, notify, redis_error, scan, RedisStore, BACKEND,
};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Claim, FencingToken, Forgotten, ScanPage, Store, StoredRecord};

/// The most digits of a `u64` argument, for sizing a command's buffer.
const U64_DIGITS: usize = 20;

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        self.check_eviction().await?;
        let lease = millis(lease);
        let record_ms = in_flight_millis(lease);
        let fp: &[u8] = fingerprint.map_or(&[], |f| &f.0);
        let script = &self.scripts.claim;
        let mut cmd = self.script_cmd(script, key, 4, fp.len() + 3 * U64_DIGITS);
        cmd.arg(fp)
            .arg(lease)
            .arg(record_ms)
            .arg(fence_millis(record_ms));
        let claim = parse_claim(self.eval(script, &cmd).await?)?;
        if let (Claim::Acquired { token, .. }, Some(_)) = (&claim, self.wait_for_replicas) {
            let token = *token;
            // Boxed: only with `wait_for_replicas`, kept out of the state of every claim's
            // future.
            if let Err(why) = Box::pin(self.replicated(key)).await {
                // A failover now could lose the claim and let a second caller run the body:
                // give the claim back, and run nothing.
                let _ = self.release(key, token).await;
                return Err(Error::store(
                    BACKEND,
                    format!("the claim was not replicated as asked ({why}); nothing ran"),
                ));
            }
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let ttl = millis(ttl);
        let script = &self.scripts.complete;
        let bytes = record.len() + 3 * U64_DIGITS + self.publish.len();
        let mut cmd = self.script_cmd(script, key, 5, bytes);
        cmd.arg(token.0)
            .arg(record)
            .arg(ttl)
            .arg(fence_millis(ttl))
            .arg(self.publish);
        self.held(script, key, &cmd).await?;
        if self.wait_for_replicas.is_none() {
            return Ok(());
        }
        if let Err(why) = Box::pin(self.replicated(key)).await {
            tracing::warn!(target: "idem", key = %key, token = token.0, why,
                "result stored on the master but not replicated as asked; a failover now may lose it");
        }
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let script = &self.scripts.release;
        let mut cmd = self.script_cmd(script, key, 2, U64_DIGITS + self.publish.len());
        cmd.arg(token.0).arg(self.publish);
        self.held(script, key, &cmd).await
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let lease = millis(lease);
        let record_ms = in_flight_millis(lease);
        let script = &self.scripts.renew;
        let mut cmd = self.script_cmd(script, key, 4, 4 * U64_DIGITS);
        cmd.arg(token.0)
            .arg(lease)
            .arg(record_ms)
            .arg(fence_millis(record_ms));
        self.held(script, key, &cmd).await
    }

    /// One script: sets the step's field in the record's hash if `token` holds the key (see the
    /// [module docs](super#data-layout)). With [`RedisOptions::wait_for_replicas`](super::RedisOptions::wait_for_replicas),
    /// a step that fewer replicas acknowledged is kept and logged, as a completion is.
    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        let script = &self.scripts.save_step;
        let bytes = U64_DIGITS + name.len() + record.len();
        let mut cmd = self.script_cmd(script, key, 3, bytes);
        cmd.arg(token.0).arg(name).arg(record);
        self.held(script, key, &cmd).await?;
        if self.wait_for_replicas.is_none() {
            return Ok(());
        }
        if let Err(why) = Box::pin(self.replicated(key)).await {
            tracing::warn!(target: "idem", key = %key, token = token.0, step = name, why,
                "step stored on the master but not replicated as asked; a failover now may lose it");
        }
        Ok(())
    }

    /// One script: the step fields of the record's hash, if `token` holds the key.
    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        let script = &self.scripts.load_steps;
        let mut cmd = self.script_cmd(script, key, 1, U64_DIGITS);
        cmd.arg(token.0);
        parse_steps(key, self.eval(script, &cmd).await?)
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.record_key(key));
        let mut con = self.con.clone();
        // Retried once on a refused connection, as in `eval`.
        let reply = match cmd.query_async::<Value>(&mut con).await {
            Err(e) if e.is_connection_refusal() => cmd.query_async(&mut con).await,
            reply => reply,
        };
        parse_record(reply.map_err(redis_error)?)
    }

    /// Returns 0: Redis expires records itself (`PEXPIRE`: completed ones at the end of their
    /// ttl, in-flight ones [`ABANDONED_CLAIM_RETENTION`](crate::store::ABANDONED_CLAIM_RETENTION) after their lease), so nothing is left
    /// to purge.
    async fn purge_expired(&self) -> Result<u64> {
        Ok(0)
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let script = &self.scripts.forget;
        let mut cmd = self.script_cmd(script, key, 2, 1 + self.publish.len());
        cmd.arg(if force { "1" } else { "" }).arg(self.publish);
        let forgotten = parse_forgotten(key, self.eval(script, &cmd).await?)?;
        if forgotten != Forgotten::Absent {
            if let Err(why) = self.replicated(key).await {
                tracing::warn!(target: "idem", key = %key, why,
                    "record forgotten on the master but not replicated as asked; a failover now may bring it back");
            }
        }
        Ok(forgotten)
    }

    /// `SCAN` on the server, or on each master of a cluster in turn, with `limit` as its
    /// `COUNT`; each record found is read with one script, all at once.
    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let pattern = scan::pattern(&self.prefix);
        let (keys, next) = scan::record_keys(&self.con, cursor, &pattern, limit).await?;
        let reads = keys.into_iter().filter_map(|record| {
            let key = scan::storage_key(&self.prefix, &record)?;
            Some(async move {
                let script = &self.scripts.inspect;
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(script.get_hash()).arg(1).arg(record);
                parse_summary(key, self.eval(script, &cmd).await?)
            })
        });
        let records = futures_util::future::join_all(reads)
            .await
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        Ok(ScanPage { records, next })
    }

    /// Steps live in the record's hash (see the [module docs](super#data-layout)).
    fn keeps_steps(&self) -> bool {
        true
    }

    fn notifies_changes(&self) -> bool {
        self.notifier.is_some()
    }

    /// Waits for the key's channel (see the `notify` module): the `complete`, `release` and
    /// `forget` scripts publish on it. A waiter whose subscription was not yet confirmed when it
    /// came looks at the record once more (one `HGET`), so a change published just before
    /// cannot be missed; one that came later needs no look. Without a subscriber (a connection
    /// the user built, or one that cannot subscribe), it sleeps `max`.
    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let Some(notifier) = &self.notifier else {
            return tokio::time::sleep(max).await;
        };
        let record = self.record_key(key);
        let waiter = notifier.register(notify::channel(&record));
        let woken = waiter.notify.clone();
        let mut woken = std::pin::pin!(woken.notified());
        woken.as_mut().enable();
        let waiting = async {
            if !waiter.subscribed().await {
                return tokio::time::sleep(max).await;
            }
            if !waiter.was_subscribed {
                let mut con = self.connection();
                let state: redis::RedisResult<Option<String>> = redis::cmd("HGET")
                    .arg(&record)
                    .arg("state")
                    .query_async(&mut con)
                    .await;
                if !matches!(state.as_ref().map(Option::as_deref), Ok(Some("in_flight"))) {
                    return;
                }
            }
            woken.await
        };
        let _ = tokio::time::timeout(max, waiting).await;
    }
}
