//! Decoding the rows the statements return: a value idem did not write is [`Error::Corrupt`],
//! an unexpected result shape [`Error::Store`], never a panic.

use std::borrow::Cow;
use std::collections::HashMap;

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
/// `key` and `expires_at`).
pub(super) fn summary(row: &Row) -> Result<RecordSummary> {
    let raw_key: &str = column(row, 4)?;
    let key = StorageKey::from_hex(raw_key).ok_or_else(|| {
        Error::corrupt(format!(
            "PostgreSQL storage key {raw_key:?} is not 64 hex digits"
        ))
    })?;
    let stored = record(row).map_err(|e| e.with_key(&key))?;
    // The table keeps no claim time.
    Ok(RecordSummary::new(key, stored, column(row, 5)?, None))
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
    blob.map_or_else(
        || Ok(Vec::new()),
        |blob| steps_blob::decode(&latest_frames(blob)),
    )
}

/// `blob` with only the last frame of each name, where the first of that name stood.
///
/// save_step.sql appends a step's frame without looking at those before it, so a name saved
/// again (a save repeated after a lost reply) is in the value more than once, and the last
/// frame is the step; [`steps_blob::decode`] takes a name twice for damage. What does not split
/// into whole frames is kept as it is from there on, for `decode` to report.
fn latest_frames(blob: &[u8]) -> Cow<'_, [u8]> {
    let mut frames: Vec<&[u8]> = Vec::new();
    // The index in `frames` of each name's frame.
    let mut by_name: HashMap<&[u8], usize> = HashMap::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let Some((name, len)) = frame(rest) else {
            frames.push(rest);
            break;
        };
        let (whole, after) = rest.split_at(len);
        match by_name.get(name) {
            Some(&at) => frames[at] = whole,
            None => {
                by_name.insert(name, frames.len());
                frames.push(whole);
            }
        }
        rest = after;
    }
    if frames.iter().map(|f| f.len()).sum::<usize>() == blob.len() {
        // No name twice: the value as it is.
        return Cow::Borrowed(blob);
    }
    Cow::Owned(frames.concat())
}

/// The name of the frame `bytes` starts with, and the frame's whole length; `None` if `bytes`
/// does not start with a whole frame (the layout of [`steps_blob`]: u32 big-endian name length,
/// name, u32 big-endian record length, record).
fn frame(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let part = |at: usize| -> Option<(usize, usize)> {
        let len = bytes.get(at..at.checked_add(4)?)?;
        let len = usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?;
        let end = (at + 4).checked_add(len)?;
        (end <= bytes.len()).then_some((at + 4, end))
    };
    let (name_at, name_end) = part(0)?;
    let (_, end) = part(name_end)?;
    Some((&bytes[name_at..name_end], end))
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

    /// A frame as steps_blob writes it.
    fn frame_of(name: &str, record: &[u8]) -> Vec<u8> {
        steps_blob::append(None, name, record)
    }

    fn decoded(blob: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(steps_blob::decode(&latest_frames(blob))?
            .into_iter()
            .map(|(n, r)| (n, r.to_vec()))
            .collect())
    }

    #[test]
    fn the_last_frame_of_a_name_is_its_step() {
        let blob = [
            frame_of("a", b"1"),
            frame_of("b", b"2"),
            frame_of("a", b"333"),
            frame_of("", b""),
            frame_of("a", b""),
        ]
        .concat();
        assert_eq!(
            decoded(&blob).unwrap(),
            vec![
                ("a".into(), vec![]),
                ("b".into(), b"2".to_vec()),
                ("".into(), vec![])
            ]
        );
        // No name twice: the value is not copied.
        let once = [frame_of("a", b"1"), frame_of("b", b"2")].concat();
        assert!(matches!(latest_frames(&once), Cow::Borrowed(_)));
        assert!(decoded(&[]).unwrap().is_empty());
    }

    #[test]
    fn damaged_steps_are_corrupt() {
        let good = [frame_of("a", b"1"), frame_of("a", b"2")].concat();
        for cut in 1..good.len() {
            if cut == good.len() / 2 {
                continue; // a whole first frame
            }
            let err = decoded(&good[..cut]).expect_err("a cut value");
            assert!(matches!(err, Error::Corrupt { .. }), "{cut}: {err:?}");
        }
        let mut not_utf8 = frame_of("a", b"1");
        not_utf8[4] = 0xff;
        assert!(matches!(decoded(&not_utf8), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn tokens_from_the_database_are_checked() {
        assert_eq!(token(7).unwrap(), FencingToken(7));
        assert!(matches!(token(-1), Err(Error::Corrupt { .. })));
    }
}
