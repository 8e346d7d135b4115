//! The store protocol on PostgreSQL: each step one prepared statement (see the
//! [module docs](super#one-statement-per-step)).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{row, Plan, PostgresStore, Repeat, BACKEND};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::record::Readable;
use crate::store::{
    steps_blob, Claim, FencingToken, Forgotten, RecordState, ScanPage, Store, StoredRecord,
};

/// Rows deleted per statement by [`Store::purge_expired`], so a large purge does not hold one
/// long transaction.
const PURGE_BATCH: u64 = 10_000;
/// Leases and ttls are capped at about a century (and stay exact in a float8 of microseconds).
const MAX_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;
/// PostgreSQL keeps no value longer than 1 GiB: a step's frame beyond it could never be saved
/// (and [`steps_blob::append`] would panic on a part beyond 4 GiB).
const MAX_VALUE: usize = 1 << 30;

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let plan = match &self.notifier {
            Some(notifier) => notifier.plan(key.as_str(), fingerprint),
            None => Plan::Alone,
        };
        let leader = match plan {
            Plan::Alone => None,
            Plan::Follow(follower) => {
                if let Some(claim) = follower.answer().await {
                    return Ok(claim);
                }
                None
            }
            Plan::Lead(leader) => {
                // The other calls waiting for the key were woken with this one: let them
                // reach their claims and join this one.
                tokio::task::yield_now().await;
                Some(leader)
            }
        };
        let fingerprint: Option<&[u8]> = fingerprint.map(|f| &f.0[..]);
        let row = self
            // Repeating a claim that did reach the server finds that claim in flight: the
            // answer a caller retrying after an error would get too.
            .query_opt_led(
                &self.sql.claim,
                &[&key.as_str(), &fingerprint, &micros(lease)],
                Repeat::Safe,
                leader.as_ref(),
            )
            .await?
            .ok_or_else(|| Error::store(BACKEND, "claim returned no row"))?;
        let claim = row::claim(&row)?;
        if let Some(leader) = leader {
            leader.share(&claim);
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
        // The readable columns, derived from the record by the record module (NULL for bytes
        // that are not a record).
        let readable = Readable::of(record);
        let operation = readable.and_then(|r| r.operation);
        let status = readable.map(|r| r.status);
        let result = readable.and_then(|r| r.result);
        // Repeating a complete that did reach the server would report a lost lease for a
        // stored result; the caller gets `Error::Store` and exec returns the result unstored.
        self.held(
            &self.sql.complete,
            key,
            token,
            &[&record, &micros(ttl), &operation, &status, &result],
            Repeat::Never,
        )
        .await
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        self.held(&self.sql.release, key, token, &[], Repeat::Never)
            .await
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        self.held(&self.sql.renew, key, token, &[&micros(lease)], Repeat::Safe)
            .await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let Some(row) = self
            .query_opt(&self.sql.get, &[&key.as_str()], Repeat::Safe)
            .await?
        else {
            return Ok(None);
        };
        row::record(&row).map(Some)
    }

    async fn purge_expired(&self) -> Result<u64> {
        let mut removed = 0;
        loop {
            let n = self.purge_expired_up_to(PURGE_BATCH).await?;
            removed += n;
            if n < PURGE_BATCH {
                return Ok(removed);
            }
        }
    }

    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.execute(&self.sql.purge, &[&limit], Repeat::Safe).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        // Repeating a forget that did reach the server would report a removed record as
        // absent: the caller gets `Error::Store` and may look again.
        let row = self
            .query_opt(&self.sql.forget, &[&key.as_str(), &force], Repeat::Never)
            .await?;
        row::forgotten(key, row.as_ref())
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let after = cursor.unwrap_or_default();
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let rows = self
            .query(&self.sql.scan, &[&after, &limit], Repeat::Safe)
            .await?;
        let records = rows.iter().map(row::summary).collect::<Result<Vec<_>>>()?;
        // A full page may be followed by more; the next one starts after its last key.
        let full = rows.len() as i64 == limit;
        let next = records
            .last()
            .filter(|_| full)
            .map(|r| r.key.as_str().to_owned());
        Ok(ScanPage { records, next })
    }

    /// Steps live in the record's row, in its `steps` column (see the
    /// [module docs](super#one-statement-per-step)).
    fn keeps_steps(&self) -> bool {
        true
    }

    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        // The frame: two u32 lengths and the bytes.
        let size = name.len().saturating_add(record.len()).saturating_add(8);
        if size > MAX_VALUE {
            return Err(Error::TooLarge {
                size,
                limit: MAX_VALUE,
            });
        }
        // Appended to the steps by the statement, without reading them (see save_step.sql).
        let frame = steps_blob::append(None, name, record);
        // Repeating a save that did reach the server appends the same frame again: the last
        // frame of a name counts, so the steps are the same.
        self.held(&self.sql.save_step, key, token, &[&frame], Repeat::Safe)
            .await
    }

    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        // A token beyond i64 was never issued by the sequence, so it cannot hold the key.
        let Ok(token) = i64::try_from(token.0) else {
            return Err(Error::lease_lost(key));
        };
        let row = self
            .query_opt(&self.sql.load_steps, &[&key.as_str(), &token], Repeat::Safe)
            .await?
            // No row: the token does not hold the key (see load_steps.sql).
            .ok_or_else(|| Error::lease_lost(key))?;
        row::steps(&row).map_err(|e| e.with_key(key))
    }

    fn notifies_changes(&self) -> bool {
        self.notifier.is_some()
    }

    /// Waits for a notification about `key` on the table's channel (`complete`, `release` and
    /// `forget` send one). A waiter that arrived before the listener was up looks at the record
    /// once more (one `get`), so a change made just before cannot be missed. Without a listener
    /// (a pool the user built, or one that cannot listen), it sleeps `max`. The waiters one
    /// notification wakes share their next claim (see the
    /// [module docs](super#one-statement-per-step)).
    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let Some(notifier) = &self.notifier else {
            return tokio::time::sleep(max).await;
        };
        let waiter = notifier.register(key.as_str());
        let woken = waiter.notify.clone();
        let mut woken = std::pin::pin!(woken.notified());
        woken.as_mut().enable();
        let waiting = async {
            if !notifier.listening().await {
                return tokio::time::sleep(max).await;
            }
            if !waiter.was_listening {
                let in_flight = matches!(
                    self.get(key).await,
                    Ok(Some(StoredRecord {
                        state: RecordState::InFlight { .. },
                        ..
                    }))
                );
                if !in_flight {
                    return;
                }
            }
            woken.await
        };
        let _ = tokio::time::timeout(max, waiting).await;
    }
}

/// A duration in whole microseconds, capped at [`MAX_MICROS`].
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_capped_micros() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::from_nanos(1999)), 1);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
    }
}
