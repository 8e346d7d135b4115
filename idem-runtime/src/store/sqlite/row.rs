//! Rows of `idem_records`: read, decoded and checked (a value idem did not write is
//! [`Error::Corrupt`], never a panic), and judged against the clock.

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};

use super::{abandoned_before, sql_err};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::store::{Claim, FencingToken};

/// The row of a key.
const READ: &str = include_str!("read.sql");

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
}

type RawRow = (Option<Vec<u8>>, i64, i64, i64, Option<Vec<u8>>);

impl Row {
    fn decode((fingerprint, token, state, expires_at, record): RawRow) -> Result<Row> {
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
}

/// The row of `key`, if any, decoded and checked (whether live or not).
pub(super) fn read_row(conn: &Connection, key: &str) -> Result<Option<Row>> {
    let raw: Option<RawRow> = conn
        .prepare_cached(READ)
        .and_then(|mut stmt| {
            stmt.query_row([key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(sql_err)?;
    raw.map(Row::decode).transpose()
}
