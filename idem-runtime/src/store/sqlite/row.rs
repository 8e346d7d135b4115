//! Rows of `idem_records`: read, decoded and checked (a value idem did not write is
//! [`Error::Corrupt`], never a panic), and judged against the clock.

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};

use super::{abandoned_before, sql_err};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::inspect::from_unix_ms;
use crate::store::{Claim, FencingToken, RecordState, RecordSummary, StoredRecord};

/// The row of a key.
const READ: &str = include_str!("read.sql");
/// A page of rows in key order.
const SCAN: &str = include_str!("scan.sql");

/// `state` of a claim in flight.
pub(super) const STATE_IN_FLIGHT: i64 = 0;
/// `state` of a completed record.
pub(super) const STATE_COMPLETED: i64 = 1;

/// A row of `idem_records`, decoded and checked.
pub(super) struct Row {
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) token: FencingToken,
    expires_at: i64,
    /// `None` while in flight; the encoded record once completed.
    pub(super) record: Option<Bytes>,
    /// When the key was claimed (unix ms); `None` for rows claimed before the column existed.
    claimed_at: Option<i64>,
}

/// The columns of read.sql, and of scan.sql after the key.
type RawRow = (Option<Vec<u8>>, i64, i64, i64, Option<Vec<u8>>, Option<i64>);

/// Reads the columns of a [`RawRow`] starting at column `from`.
fn raw_row(r: &rusqlite::Row<'_>, from: usize) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(from)?,
        r.get(from + 1)?,
        r.get(from + 2)?,
        r.get(from + 3)?,
        r.get(from + 4)?,
        r.get(from + 5)?,
    ))
}

impl Row {
    fn decode((fingerprint, token, state, expires_at, record, claimed_at): RawRow) -> Result<Row> {
        let fingerprint = match fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|b: Vec<u8>| {
                Error::corrupt(format!(
                    "SQLite row: fingerprint of {} bytes, expected 32",
                    b.len()
                ))
            })?)),
        };
        let token = match u64::try_from(token) {
            Ok(t) if t > 0 => FencingToken(t),
            _ => {
                return Err(Error::corrupt(format!(
                    "SQLite row: invalid fencing token {token}"
                )))
            }
        };
        let record = match (state, record) {
            (STATE_IN_FLIGHT, _) => None,
            (STATE_COMPLETED, Some(bytes)) => Some(Bytes::from(bytes)),
            (STATE_COMPLETED, None) => {
                return Err(Error::corrupt("SQLite row: completed without a record"))
            }
            (other, _) => return Err(Error::corrupt(format!("SQLite row: unknown state {other}"))),
        };
        Ok(Row {
            fingerprint,
            token,
            expires_at,
            record,
            claimed_at,
        })
    }

    /// Whether the row stands in a claim's way: completed within its ttl, or in flight within
    /// its lease.
    pub(super) fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Whether the row still exists for `get`: completed within its ttl, or in flight and not
    /// abandoned (its lease may have ended).
    pub(super) fn exists(&self, now: i64) -> bool {
        match self.record {
            Some(_) => self.expires_at > now,
            None => self.expires_at > abandoned_before(now),
        }
    }

    /// What a claim reports for this live row.
    pub(super) fn live_claim(self, fingerprint: Option<&Fingerprint>) -> Claim {
        Claim::on_live_record(self.fingerprint.as_ref(), fingerprint, self.record)
    }

    /// The row as [`Store::get`](crate::store::Store::get) reports it.
    pub(super) fn stored(self) -> StoredRecord {
        StoredRecord {
            fingerprint: self.fingerprint,
            state: match self.record {
                None => RecordState::InFlight { token: self.token },
                Some(record) => RecordState::Completed {
                    token: self.token,
                    record,
                },
            },
        }
    }

    /// The row of `key` as a listing reports it.
    fn summary(self, key: StorageKey) -> RecordSummary {
        let expires_at = from_unix_ms(self.expires_at);
        let claimed_at = self.claimed_at.map(from_unix_ms);
        RecordSummary::new(key, self.stored(), expires_at, claimed_at)
    }
}

/// The row of `key`, if any, decoded and checked (whether live or not).
pub(super) fn read_row(conn: &Connection, key: &str) -> Result<Option<Row>> {
    let raw: Option<RawRow> = conn
        .prepare_cached(READ)
        .and_then(|mut stmt| stmt.query_row([key], |r| raw_row(r, 0)).optional())
        .map_err(sql_err)?;
    raw.map(Row::decode).transpose()
}

/// A page of the listing: up to `limit` (at least 1) rows after the key `after` in key order,
/// those that exist at `now` as summaries, and the last key read if the page was full (the
/// listing goes on after it).
pub(super) fn scan_rows(
    conn: &Connection,
    after: &str,
    limit: usize,
    now: i64,
) -> Result<(Vec<RecordSummary>, Option<String>)> {
    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let raw: Vec<(String, RawRow)> = conn
        .prepare_cached(SCAN)
        .and_then(|mut stmt| {
            stmt.query_map(rusqlite::params![after, limit], |r| {
                Ok((r.get(0)?, raw_row(r, 1)?))
            })?
            .collect()
        })
        .map_err(sql_err)?;
    let full = raw.len() as i64 == limit;
    let next = raw.last().filter(|_| full).map(|(key, _)| key.clone());
    let mut records = Vec::with_capacity(raw.len());
    for (key, raw) in raw {
        let key = StorageKey::from_hex(&key).ok_or_else(|| {
            Error::corrupt(format!(
                "SQLite row: storage key {key:?} is not 64 hex digits"
            ))
        })?;
        let row = Row::decode(raw).map_err(|e| e.with_key(&key))?;
        if row.exists(now) {
            records.push(row.summary(key));
        }
    }
    Ok((records, next))
}
