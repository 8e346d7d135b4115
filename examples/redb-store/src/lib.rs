//! `RedbStore`: an example third-party store for `idempotency`, on the [`redb`] embedded
//! database, written against the [`Store`] trait alone and held to `idem-testkit`'s conformance
//! suite (`tests/conformance.rs`).
//!
//! It shows what a store must do, and nothing more: each method of the protocol is one redb
//! transaction (writes serialized by redb's single writer, reads from a consistent snapshot);
//! fencing tokens come from a counter in the same file, so they strictly increase across keys,
//! restarts and deleted records; expiry is measured on the system clock. The store spawns
//! nothing and holds no runtime handle: the engine of `idempotency` owns renewal and background
//! work. redb's calls block, so each runs in [`tokio::task::spawn_blocking`].
//!
//! ```no_run
//! # async fn demo() -> idem_runtime::Result<()> {
//! let store = idem_store_redb::RedbStore::open("idem.redb").await?;
//! idem_runtime::install(&store);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! Three tables: `idem_records` maps a storage key (64 hex digits) to `(token, expires_at,
//! fingerprint, record)`: `expires_at` in Unix milliseconds is the lease's end while the record
//! is in flight (`record` is `None`), the ttl's end once completed. `idem_meta` holds the last
//! token handed out. `idem_steps` maps `(storage key, step name)` to the step's record: the
//! durable steps of a call in flight ([`Store::save_step`]), which sort together under their key
//! so that one range reads or deletes them.
//!
//! A call's steps exist only while its record is in flight: a takeover keeps them, and every
//! transaction that ends the claim otherwise (complete, release, forget, purge, a claim that
//! replaces an abandoned claim) deletes them in the same transaction, so a claim of an absent
//! key or of an expired result finds none without looking.
//!
//! An in-flight record whose lease ended stays its holder's (who may still complete, renew or
//! release it) until a claim takes it over, or until it has been abandoned for
//! [`ABANDONED_CLAIM_RETENTION`]; [`Store::purge_expired`] then removes it, with the completed
//! records past their ttl. Purge scans every record; a second table indexed by expiry would make
//! it proportional to what expired, as the SQLite store's index does.
//!
//! For operators, [`Store::forget`] removes one row in a write transaction (the token counter
//! never goes back, so a forgotten holder stays fenced off), and [`Store::scan`] pages through
//! the records in key order, the cursor being the last key of a page. The rows keep no claim
//! time, so a listing's `claimed_at` is `None`.
#![warn(missing_docs)]

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use idem_runtime::{
    Claim, Error, FencingToken, Fingerprint, Forgotten, RecordState, RecordSummary, Result,
    ScanPage, StorageKey, Store, StoredRecord, ABANDONED_CLAIM_RETENTION,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::Notify;

const BACKEND: &str = "redb";

/// `(token, expires_at in Unix ms, fingerprint, record)`; `record` is `None` while in flight.
type RowValue = (u64, i64, Option<&'static [u8]>, Option<&'static [u8]>);

/// One row per storage key.
const RECORDS: TableDefinition<&str, RowValue> = TableDefinition::new("idem_records");
/// The last fencing token handed out, under [`LAST_TOKEN`].
const META: TableDefinition<&str, u64> = TableDefinition::new("idem_meta");
const LAST_TOKEN: &str = "last_token";
/// `(storage key, step name)` to the step's record, while the key's record is in flight.
const STEPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idem_steps");

/// A store in one redb file: embedded and durable (every commit is fsynced).
///
/// Cloning gives another handle to the same database. One process opens a file at a time
/// (redb locks it).
#[derive(Clone, Debug)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    /// Wakes this store's `wait_for_change` callers on complete, release and forget.
    changed: Notify,
    path: PathBuf,
}

impl RedbStore {
    /// Opens the store in the redb file at `path`, creating the file and its tables if
    /// missing. Fails with [`Error::Store`] if the file cannot be opened or is not a redb
    /// database, or another process has it open.
    pub async fn open(path: impl AsRef<Path>) -> Result<RedbStore> {
        let path = path.as_ref().to_path_buf();
        let file = path.clone();
        let db = blocking(move || {
            let db = Database::create(&file)?;
            let txn = db.begin_write()?;
            txn.open_table(RECORDS)?;
            txn.open_table(META)?;
            txn.open_table(STEPS)?;
            txn.commit()?;
            Ok(db)
        })
        .await?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                changed: Notify::new(),
                path,
            }),
        })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the database in a blocking thread. Once started, it runs to its end even if
    /// the caller is cancelled, so no transaction is cut short.
    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Step<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        blocking(move || f(&inner.db)).await
    }
}

/// Runs `f` in a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Step<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|Failed(e)| e),
        Err(e) => Err(Error::store(BACKEND, e)),
    }
}

/// What a step inside a transaction fails with: redb's error, or the protocol's answer.
struct Failed(Error);

type Step<T> = std::result::Result<T, Failed>;

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed(e)
    }
}

macro_rules! from_redb {
    ($($e:ty),*) => {$(
        impl From<$e> for Failed {
            fn from(e: $e) -> Self {
                Failed(Error::store(BACKEND, redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Runs `f` in a write transaction and commits it, or aborts it if `f` fails.
fn write<T>(db: &Database, f: impl FnOnce(&WriteTransaction) -> Step<T>) -> Step<T> {
    let txn = db.begin_write()?;
    match f(&txn) {
        Ok(value) => {
            txn.commit()?;
            Ok(value)
        }
        Err(e) => {
            txn.abort()?;
            Err(e)
        }
    }
}

/// `d` in milliseconds, saturating: a ttl of `Duration::MAX` means "forever".
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The system wall clock in milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    ms(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default())
}

/// An in-flight record whose lease ended at or before this is abandoned at `now`.
fn abandoned_before(now: i64) -> i64 {
    now.saturating_sub(ms(ABANDONED_CLAIM_RETENTION))
}

/// A row of `idem_records`, decoded and checked.
struct Row {
    token: u64,
    expires_at: i64,
    fingerprint: Option<Fingerprint>,
    /// `None` while in flight; the encoded record once completed.
    record: Option<Vec<u8>>,
}

impl Row {
    /// Reads the row of `key`. A row this store did not write is [`Error::Corrupt`].
    fn read(table: &impl ReadableTable<&'static str, RowValue>, key: &str) -> Step<Option<Row>> {
        match table.get(key)? {
            Some(guard) => Row::decode(guard.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Decodes a stored value.
    fn decode(
        (token, expires_at, fingerprint, record): (u64, i64, Option<&[u8]>, Option<&[u8]>),
    ) -> Step<Row> {
        let fingerprint = match fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|_| {
                Error::corrupt(format!("redb row: fingerprint of {} bytes", bytes.len()))
            })?)),
        };
        if token == 0 {
            return Err(Error::corrupt("redb row: fencing token 0").into());
        }
        Ok(Row {
            token,
            expires_at,
            fingerprint,
            record: record.map(<[u8]>::to_vec),
        })
    }

    /// The value to store.
    fn value(&self) -> (u64, i64, Option<&[u8]>, Option<&[u8]>) {
        let fingerprint = self.fingerprint.as_ref().map(|f| &f.0[..]);
        (
            self.token,
            self.expires_at,
            fingerprint,
            self.record.as_deref(),
        )
    }

    /// Whether the row stands in a claim's way: completed within its ttl, or in flight within
    /// its lease.
    fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Whether the row still exists: completed within its ttl, or in flight and not abandoned.
    fn exists(&self, now: i64) -> bool {
        match self.record {
            Some(_) => self.expires_at > now,
            None => self.expires_at > abandoned_before(now),
        }
    }

    /// Whether the row has gone for good: a completed record past its ttl, or a claim
    /// abandoned for [`ABANDONED_CLAIM_RETENTION`]. Purge removes such rows.
    fn expired(expires_at: i64, completed: bool, now: i64) -> bool {
        expires_at <= now && (completed || expires_at <= abandoned_before(now))
    }

    /// What a claim finds on this live row (the rule shared by every store).
    fn live_claim(self, fingerprint: Option<&Fingerprint>) -> Claim {
        let record = self.record.map(Bytes::from);
        Claim::on_live_record(self.fingerprint.as_ref(), fingerprint, record)
    }

    /// The row as [`Store::get`] reports it.
    fn stored(self) -> StoredRecord {
        let token = FencingToken(self.token);
        StoredRecord {
            fingerprint: self.fingerprint,
            state: match self.record {
                None => RecordState::InFlight { token },
                Some(record) => RecordState::Completed {
                    token,
                    record: record.into(),
                },
            },
        }
    }

    /// The row of `key` as a listing reports it (the row keeps no claim time).
    fn summary(self, key: StorageKey) -> RecordSummary {
        let expires_at = Duration::from_millis(u64::try_from(self.expires_at).unwrap_or(0));
        // A ttl of `Duration::MAX` is stored saturated: the end of the year 9999 stands in.
        let latest = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        let expires_at = UNIX_EPOCH
            .checked_add(expires_at)
            .map_or(latest, |at| at.min(latest));
        RecordSummary::new(key, self.stored(), expires_at, None)
    }
}

/// The row of `key` if `token` holds it (in flight, not abandoned; its lease may have ended),
/// else [`Error::LeaseLost`]: it was taken over, completed, released or purged.
fn held(
    table: &impl ReadableTable<&'static str, RowValue>,
    key: &str,
    token: FencingToken,
    now: i64,
) -> Step<Row> {
    match Row::read(table, key)? {
        Some(row) if row.record.is_none() && row.token == token.0 && row.exists(now) => Ok(row),
        _ => Err(Error::LeaseLost {
            key: StorageKey::from_hex(key),
        }
        .into()),
    }
}

/// Replaces the row `token` holds under `key` with `change(row, now)`, in one write
/// transaction, and deletes the call's steps if `ends_steps`; [`Error::LeaseLost`] and no
/// change if `token` does not hold it.
fn update_held(
    db: &Database,
    key: &str,
    token: FencingToken,
    ends_steps: bool,
    change: impl FnOnce(Row, i64) -> Row,
) -> Step<()> {
    write(db, |txn| {
        let mut records = txn.open_table(RECORDS)?;
        let now = now_ms();
        let row = change(held(&records, key, token, now)?, now);
        records.insert(key, row.value())?;
        if ends_steps {
            drop_steps(txn, key)?;
        }
        Ok(())
    })
}

/// The names of the steps saved under `key`: the range of `idem_steps` that starts at
/// `(key, "")`, up to the first entry of another key.
fn step_names(
    steps: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    key: &str,
) -> Step<Vec<String>> {
    let mut names = Vec::new();
    for entry in steps.range((key, "")..)? {
        let (k, _) = entry?;
        let (of, name) = k.value();
        if of != key {
            break;
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// Deletes the steps saved under `key`, inside the transaction that ends its claim.
fn drop_steps(txn: &WriteTransaction, key: &str) -> Step<()> {
    let mut steps = txn.open_table(STEPS)?;
    for name in step_names(&steps, key)? {
        steps.remove((key, name.as_str()))?;
    }
    Ok(())
}

/// The next fencing token, taken inside the claim's transaction.
fn next_token(txn: &WriteTransaction) -> Step<u64> {
    let mut meta = txn.open_table(META)?;
    let last = meta.get(LAST_TOKEN)?.map_or(0, |guard| guard.value());
    let next = last
        .checked_add(1)
        .ok_or_else(|| Error::corrupt("redb idem_meta: no fencing token left"))?;
    meta.insert(LAST_TOKEN, next)?;
    Ok(next)
}

fn claim_blocking(
    db: &Database,
    key: &str,
    fingerprint: Option<Fingerprint>,
    lease: Duration,
) -> Step<Claim> {
    // A replay or a conflict (the common answers to a retry) needs only a read of a snapshot,
    // which does not wait for the writer.
    let snapshot = db.begin_read()?;
    if let Some(row) = Row::read(&snapshot.open_table(RECORDS)?, key)? {
        if row.is_live(now_ms()) {
            return Ok(row.live_claim(fingerprint.as_ref()));
        }
    }
    drop(snapshot);
    // Absent or expired: decide again and write in one write transaction, which no other
    // claim can interleave with.
    write(db, |txn| {
        let mut records = txn.open_table(RECORDS)?;
        let now = now_ms();
        let takeover = match Row::read(&records, key)? {
            Some(row) if row.is_live(now) => return Ok(row.live_claim(fingerprint.as_ref())),
            Some(row) => {
                // A takeover of a claim that still exists keeps its steps for the new holder;
                // a claim abandoned for the retention (not yet purged) loses them, as its purge
                // would have deleted them. An expired result has none.
                if row.record.is_none() && !row.exists(now) {
                    drop_steps(txn, key)?;
                }
                row.record.is_none()
            }
            None => false,
        };
        let row = Row {
            token: next_token(txn)?,
            expires_at: now.saturating_add(ms(lease)),
            fingerprint,
            record: None,
        };
        records.insert(key, row.value())?;
        Ok(Claim::Acquired {
            token: FencingToken(row.token),
            takeover,
        })
    })
}

#[async_trait]
impl Store for RedbStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Records are in a file: they outlive the process.
    fn durable(&self) -> bool {
        true
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let (key, fingerprint) = (key.clone(), fingerprint.copied());
        self.with_db(move |db| claim_blocking(db, key.as_str(), fingerprint, lease))
            .await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let (key, record) = (key.clone(), record.to_vec());
        self.with_db(move |db| {
            // The result replaces the call's steps.
            update_held(db, key.as_str(), token, true, |held, now| Row {
                expires_at: now.saturating_add(ms(ttl)),
                record: Some(record),
                ..held
            })
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let key = key.clone();
        self.with_db(move |db| {
            write(db, |txn| {
                let mut records = txn.open_table(RECORDS)?;
                held(&records, key.as_str(), token, now_ms())?;
                records.remove(key.as_str())?;
                drop_steps(txn, key.as_str())?;
                Ok(())
            })
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let key = key.clone();
        self.with_db(move |db| {
            // A renewal keeps the steps (also one of zero, which hands them to a takeover).
            update_held(db, key.as_str(), token, false, |held, now| Row {
                expires_at: now.saturating_add(ms(lease)),
                ..held
            })
        })
        .await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let key = key.clone();
        self.with_db(move |db| {
            let snapshot = db.begin_read()?;
            let row = Row::read(&snapshot.open_table(RECORDS)?, key.as_str())?;
            Ok(row.filter(|row| row.exists(now_ms())).map(Row::stored))
        })
        .await
    }

    async fn purge_expired(&self) -> Result<u64> {
        self.with_db(|db| {
            write(db, |txn| {
                let mut records = txn.open_table(RECORDS)?;
                let now = now_ms();
                let mut removed = 0;
                // Only claims can have steps: a completion deleted its call's.
                let mut abandoned = Vec::new();
                records.retain(|key, (_, expires_at, _, record)| {
                    let gone = Row::expired(expires_at, record.is_some(), now);
                    removed += u64::from(gone);
                    if gone && record.is_none() {
                        abandoned.push(key.to_owned());
                    }
                    !gone
                })?;
                for key in &abandoned {
                    drop_steps(txn, key)?;
                }
                Ok(removed)
            })
        })
        .await
    }

    /// Reads the records in key order until it has found `limit` expired ones, and removes
    /// them, in one write transaction.
    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        self.with_db(move |db| {
            write(db, |txn| {
                let mut records = txn.open_table(RECORDS)?;
                let now = now_ms();
                // `(key, whether it was a claim)`: only claims can have steps.
                let mut gone = Vec::new();
                for entry in records.iter()? {
                    if gone.len() as u64 >= limit {
                        break;
                    }
                    let (key, value) = entry?;
                    let (_, expires_at, _, record) = value.value();
                    if Row::expired(expires_at, record.is_some(), now) {
                        gone.push((key.value().to_owned(), record.is_none()));
                    }
                }
                for (key, claim) in &gone {
                    records.remove(key.as_str())?;
                    if *claim {
                        drop_steps(txn, key)?;
                    }
                }
                Ok(gone.len() as u64)
            })
        })
        .await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let key = key.clone();
        let forgotten = self
            .with_db(move |db| {
                write(db, |txn| {
                    let mut records = txn.open_table(RECORDS)?;
                    let row = Row::read(&records, key.as_str())?;
                    let Some(row) = row.filter(|row| row.exists(now_ms())) else {
                        return Ok(Forgotten::Absent);
                    };
                    let token = FencingToken(row.token);
                    let forgotten = match row.record {
                        Some(_) => Forgotten::Completed { token },
                        None if force => Forgotten::InFlight { token },
                        None => return Err(Error::InFlight { key: Some(key) }.into()),
                    };
                    records.remove(key.as_str())?;
                    drop_steps(txn, key.as_str())?;
                    Ok(forgotten)
                })
            })
            .await?;
        if forgotten != Forgotten::Absent {
            self.inner.changed.notify_waiters();
        }
        Ok(forgotten)
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let after = cursor.map(str::to_owned);
        let limit = limit.max(1);
        self.with_db(move |db| {
            let snapshot = db.begin_read()?;
            let records = snapshot.open_table(RECORDS)?;
            let from = match &after {
                Some(after) => Bound::Excluded(after.as_str()),
                None => Bound::Unbounded,
            };
            let now = now_ms();
            let mut page = ScanPage::default();
            let mut read = 0;
            for entry in records.range::<&str>((from, Bound::Unbounded))? {
                let (key, value) = entry?;
                let key = key.value();
                let storage_key = StorageKey::from_hex(key).ok_or_else(|| {
                    Error::corrupt(format!("redb row: key {key:?} is not a storage key"))
                })?;
                let row = Row::decode(value.value())?;
                if row.exists(now) {
                    page.records.push(row.summary(storage_key));
                }
                read += 1;
                if read == limit {
                    // A full page: the next one starts after its last key.
                    page.next = Some(key.to_owned());
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    /// Steps are rows of `idem_steps`.
    fn keeps_steps(&self) -> bool {
        true
    }

    /// One write transaction: the step's row, if `token` holds the key.
    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        let (key, name, record) = (key.clone(), name.to_owned(), record.to_vec());
        self.with_db(move |db| {
            write(db, |txn| {
                held(&txn.open_table(RECORDS)?, key.as_str(), token, now_ms())?;
                let mut steps = txn.open_table(STEPS)?;
                steps.insert((key.as_str(), name.as_str()), record.as_slice())?;
                Ok(())
            })
        })
        .await
    }

    /// One read of a snapshot: the key's range of `idem_steps`, if `token` holds the key.
    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        let key = key.clone();
        self.with_db(move |db| {
            let snapshot = db.begin_read()?;
            held(
                &snapshot.open_table(RECORDS)?,
                key.as_str(),
                token,
                now_ms(),
            )?;
            let mut found = Vec::new();
            for entry in snapshot.open_table(STEPS)?.range((key.as_str(), "")..)? {
                let (k, record) = entry?;
                let (of, name) = k.value();
                if of != key.as_str() {
                    break;
                }
                found.push((name.to_owned(), Bytes::copy_from_slice(record.value())));
            }
            Ok(found)
        })
        .await
    }

    async fn wait_for_change(&self, key: &StorageKey, max: Duration) {
        let _ = key;
        let _ = tokio::time::timeout(max, self.inner.changed.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a temporary directory (kept alive by the returned guard).
    async fn store() -> (RedbStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("idem.redb")).await.unwrap();
        (store, dir)
    }

    fn key(n: u8) -> StorageKey {
        StorageKey::from_hex(&format!("{n:02x}").repeat(32)).unwrap()
    }

    /// Claims `key` and saves two steps under the claim.
    async fn claim_with_steps(store: &RedbStore, key: &StorageKey) -> FencingToken {
        let Claim::Acquired { token, .. } = store
            .claim(key, None, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        for name in ["a", "b"] {
            store.save_step(key, token, name, b"r").await.unwrap();
        }
        token
    }

    /// Moves the lease of `key` to end longer than the retention ago: its claim is abandoned.
    async fn abandon(store: &RedbStore, key: &StorageKey) {
        let key = key.clone();
        store
            .with_db(move |db| {
                write(db, |txn| {
                    let mut records = txn.open_table(RECORDS)?;
                    let mut row = Row::read(&records, key.as_str())?.expect("a row");
                    row.expires_at = abandoned_before(now_ms()) - 1_000;
                    records.insert(key.as_str(), row.value())?;
                    Ok(())
                })
            })
            .await
            .unwrap();
    }

    /// Every step row of the file, as `(key, name)`.
    async fn all_steps(store: &RedbStore) -> Vec<(String, String)> {
        store
            .with_db(|db| {
                let snapshot = db.begin_read()?;
                let mut all = Vec::new();
                for entry in snapshot.open_table(STEPS)?.iter()? {
                    let (k, _) = entry?;
                    let (key, name) = k.value();
                    all.push((key.to_owned(), name.to_owned()));
                }
                Ok(all)
            })
            .await
            .unwrap()
    }

    /// The steps of an abandoned claim go with it, whether a purge or a claim removes it, and
    /// the steps of the keys around it stay.
    #[tokio::test]
    async fn abandoned_claims_take_their_steps_with_them() {
        let (store, _dir) = store().await;
        let (first, purged, second, reclaimed, last) = (key(1), key(2), key(3), key(4), key(5));
        for k in [&first, &purged, &second, &reclaimed, &last] {
            claim_with_steps(&store, k).await;
        }
        abandon(&store, &purged).await;
        assert_eq!(store.purge_expired().await.unwrap(), 1);
        abandon(&store, &second).await;
        assert_eq!(store.purge_expired_up_to(10).await.unwrap(), 1);
        abandon(&store, &reclaimed).await;
        let Claim::Acquired { token, .. } = store
            .claim(&reclaimed, None, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("an abandoned claim is replaced");
        };
        assert_eq!(store.load_steps(&reclaimed, token).await.unwrap(), vec![]);
        let keys: Vec<String> = all_steps(&store)
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let (first, last) = (first.as_str().to_owned(), last.as_str().to_owned());
        assert_eq!(keys, [first.clone(), first, last.clone(), last]);
    }
}
