//! Decoding the rows the statements return: a value idem did not write is [`Error::Corrupt`],
//! an unexpected result shape [`Error::Store`], never a panic.

use bytes::Bytes;
use tokio_postgres::Row;

use super::failure::pg_error;
use super::BACKEND;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{
    steps_blob, Claim, FencingToken, Forgotten, RecordState, RecordSummary, StoredRecord,
};

/// What the claim statement reports: its one row (`outcome`, `token`, `record`, `takeover`).
pub(super) fn claim(row: &Row) -> Result<Claim> {
    let outcome: &str = column(row, 0)?;
    let token = token(column(row, 1)?)?;
    Ok(match outcome {
        "acquired" => Claim::Acquired {
            token,
            takeover: column(row, 3)?,
        },
        "completed" => {
            let record: Option<Vec<u8>> = column(row, 2)?;
            let record = record.ok_or_else(|| {
                Error::corrupt("completed PostgreSQL record without record bytes")
            })?;
            Claim::Completed(Bytes::from(record))
        }
        "in_flight" => Claim::InFlight,
        "key_reuse" => Claim::KeyReuse,
        other => {
            return Err(Error::store(
                BACKEND,
                format!("claim returned an unknown outcome `{other}`"),
            ))
        }
    })
}

/// The record the get statement found: its row (`token`, `fingerprint`, `state`, `record`).
pub(super) fn record(row: &Row) -> Result<StoredRecord> {
    let token = token(column(row, 0)?)?;
    let fingerprint: Option<Vec<u8>> = column(row, 1)?;
    let fingerprint = match fingerprint {
        None => None,
        Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|b: Vec<u8>| {
            Error::corrupt(format!(
                "PostgreSQL fingerprint of {} bytes, expected 32",
                b.len()
            ))
        })?)),
    };
    let state = match column::<&str>(row, 2)? {
        "in_flight" => RecordState::InFlight { token },
        "completed" => {
            let record: Option<Vec<u8>> = column(row, 3)?;
            let record = record.ok_or_else(|| {
                Error::corrupt("completed PostgreSQL record without record bytes")
            })?;
            RecordState::Completed {
                token,
                record: Bytes::from(record),
            }
        }
        other => {
            return Err(Error::corrupt(format!(
                "unknown PostgreSQL record state `{other}`"
            )))
        }
    };
    Ok(StoredRecord { fingerprint, state })
}

/// A record of a listing: a row of the scan statement (the columns of the get statement, then
/// `key`, `expires_at` and `created_at`, the claim time).
pub(super) fn summary(row: &Row) -> Result<RecordSummary> {
    let raw_key: &str = column(row, 4)?;
    let key = StorageKey::from_hex(raw_key).ok_or_else(|| {
        Error::corrupt(format!(
            "PostgreSQL storage key {raw_key:?} is not 64 hex digits"
        ))
    })?;
    let stored = record(row).map_err(|e| e.with_key(&key))?;
    // The claim time is NULL for rows claimed before the column existed.
    Ok(RecordSummary::new(
        key,
        stored,
        column(row, 5)?,
        column(row, 6)?,
    ))
}

/// What the forget statement found and did: no row for no record, else its one row (`state`,
/// `token`, `removed`); an in-flight record it did not remove is [`Error::InFlight`].
pub(super) fn forgotten(key: &StorageKey, row: Option<&Row>) -> Result<Forgotten> {
    let Some(row) = row else {
        return Ok(Forgotten::Absent);
    };
    let token = token(column(row, 1)?)?;
    let removed: i64 = column(row, 2)?;
    match (column::<&str>(row, 0)?, removed) {
        ("completed", _) => Ok(Forgotten::Completed { token }),
        ("in_flight", 0) => Err(Error::InFlight {
            key: Some(key.clone()),
        }),
        ("in_flight", _) => Ok(Forgotten::InFlight { token }),
        (other, _) => {
            Err(Error::corrupt(format!("unknown PostgreSQL record state `{other}`")).with_key(key))
        }
    }
}

/// The steps of a claim: the one column (`steps`) of the load_steps statement, `NULL` for none.
pub(super) fn steps(row: &Row) -> Result<Vec<(String, Bytes)>> {
    let blob: Option<&[u8]> = column(row, 0)?;
    blob.map_or_else(|| Ok(Vec::new()), steps_blob::decode)
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx)
        .map_err(|e| pg_error("unexpected result column", e))
}

fn token(raw: i64) -> Result<FencingToken> {
    u64::try_from(raw)
        .map(FencingToken)
        .map_err(|_| Error::corrupt(format!("negative fencing token {raw} in PostgreSQL")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_the_database_are_checked() {
        assert_eq!(token(7).unwrap(), FencingToken(7));
        assert!(matches!(token(-1), Err(Error::Corrupt { .. })));
    }
}
