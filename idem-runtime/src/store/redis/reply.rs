//! Decoding the replies of the store's scripts and of `HGETALL`: anything idem did not write is
//! [`Error::Corrupt`] (bad record data) or [`Error::Store`] (an unexpected reply shape), never a
//! panic.

use bytes::Bytes;
use redis::Value;

use super::store_error;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::store::{Claim, FencingToken, RecordState, StoredRecord};

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn parse_token(v: &[u8]) -> Result<FencingToken> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(FencingToken)
        .ok_or_else(|| {
            Error::corrupt(format!(
                "Redis record has a malformed token {:?}",
                String::from_utf8_lossy(v)
            ))
        })
}

fn parse_fingerprint(v: &[u8]) -> Result<Fingerprint> {
    <[u8; 32]>::try_from(v).map(Fingerprint).map_err(|_| {
        Error::corrupt(format!(
            "Redis record has a fingerprint of {} bytes, not 32",
            v.len()
        ))
    })
}

pub(super) fn parse_claim(reply: Value) -> Result<Claim> {
    let Value::Array(items) = reply else {
        return Err(store_error(format!(
            "unexpected reply from the claim script: {reply:?}"
        )));
    };
    let unexpected = || store_error(format!("unexpected reply from the claim script: {items:?}"));
    let tag = items.first().and_then(as_bytes).ok_or_else(unexpected)?;
    match tag {
        b"acquired" => {
            let token = items.get(1).and_then(as_bytes).ok_or_else(unexpected)?;
            let token = parse_token(token)?;
            let takeover = matches!(items.get(2), Some(Value::Int(1)));
            Ok(Claim::Acquired { token, takeover })
        }
        b"completed" => match items.into_iter().nth(1) {
            // Take the reply's buffer rather than copy it: records may be megabytes.
            Some(Value::BulkString(record)) => Ok(Claim::Completed(Bytes::from(record))),
            other => Err(store_error(format!(
                "unexpected record in a claim reply: {other:?}"
            ))),
        },
        b"in_flight" => Ok(Claim::InFlight),
        b"reuse" => Ok(Claim::KeyReuse),
        b"corrupt" => {
            let why = items.get(1).and_then(as_bytes).unwrap_or(b"?");
            Err(Error::corrupt(format!(
                "Redis record: {}",
                String::from_utf8_lossy(why)
            )))
        }
        _ => Err(unexpected()),
    }
}

/// Decodes an `HGETALL` reply (an array of field, value pairs over RESP2, a map over RESP3).
pub(super) fn parse_record(reply: Value) -> Result<Option<StoredRecord>> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Nil => Vec::new(),
        other => {
            return Err(store_error(format!(
                "unexpected reply to HGETALL: {other:?}"
            )))
        }
    };
    if pairs.is_empty() {
        return Ok(None);
    }
    let (mut state, mut token, mut fingerprint, mut record, mut lease_until) =
        (None, None, None, None, None);
    for (k, v) in &pairs {
        let (Some(k), Some(v)) = (as_bytes(k), as_bytes(v)) else {
            continue;
        };
        match k {
            b"state" => state = Some(v),
            b"token" => token = Some(v),
            b"fp" => fingerprint = Some(v),
            b"record" => record = Some(v),
            b"lease_until" => lease_until = Some(v),
            _ => {}
        }
    }
    let token = parse_token(
        token.ok_or_else(|| Error::corrupt("Redis record hash without a token field"))?,
    )?;
    let fingerprint = fingerprint.map(parse_fingerprint).transpose()?;
    // Not needed to answer (a record in flight is reported as such, lease ended or not), but
    // checked, as the claim script does.
    if let Some(v) = lease_until {
        if std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_none()
        {
            return Err(Error::corrupt(format!(
                "Redis record has a malformed lease_until {:?}",
                String::from_utf8_lossy(v)
            )));
        }
    }
    let state = match state {
        Some(b"in_flight") => RecordState::InFlight { token },
        Some(b"completed") => RecordState::Completed {
            token,
            record: Bytes::copy_from_slice(record.ok_or_else(|| {
                Error::corrupt("completed Redis record without its record field")
            })?),
        },
        Some(other) => {
            return Err(Error::corrupt(format!(
                "Redis record has an unknown state {:?}",
                String::from_utf8_lossy(other)
            )))
        }
        None => return Err(Error::corrupt("Redis record hash without a state field")),
    };
    Ok(Some(StoredRecord { fingerprint, state }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn claim_replies_decode() {
        let acquired = Value::Array(vec![
            bulk(b"acquired"),
            bulk(b"1795449131462724"),
            Value::Int(1),
        ]);
        assert_eq!(
            parse_claim(acquired).unwrap(),
            Claim::Acquired {
                token: FencingToken(1_795_449_131_462_724),
                takeover: true
            }
        );
        let done = Value::Array(vec![bulk(b"completed"), bulk(b"\x00rec")]);
        assert_eq!(
            parse_claim(done).unwrap(),
            Claim::Completed(Bytes::from_static(b"\x00rec"))
        );
        assert_eq!(
            parse_claim(Value::Array(vec![bulk(b"in_flight")])).unwrap(),
            Claim::InFlight
        );
        assert_eq!(
            parse_claim(Value::Array(vec![bulk(b"reuse")])).unwrap(),
            Claim::KeyReuse
        );
        let corrupt = Value::Array(vec![bulk(b"corrupt"), bulk(b"unknown state")]);
        assert!(matches!(parse_claim(corrupt), Err(Error::Corrupt { .. })));
        let bad_token = Value::Array(vec![bulk(b"acquired"), bulk(b"1.5e15"), Value::Int(0)]);
        assert!(matches!(parse_claim(bad_token), Err(Error::Corrupt { .. })));
        for junk in [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![]),
            Value::Array(vec![bulk(b"what")]),
        ] {
            assert!(matches!(
                parse_claim(junk),
                Err(Error::Store {
                    backend: "redis",
                    ..
                })
            ));
        }
    }

    #[test]
    fn hashes_decode_over_resp2_and_resp3() {
        let fields = [
            (bulk(b"state"), bulk(b"completed")),
            (bulk(b"token"), bulk(b"7")),
            (bulk(b"fp"), bulk(&[9; 32])),
            (bulk(b"record"), bulk(b"r")),
        ];
        let want = StoredRecord {
            fingerprint: Some(Fingerprint([9; 32])),
            state: RecordState::Completed {
                token: FencingToken(7),
                record: Bytes::from_static(b"r"),
            },
        };
        let map = Value::Map(fields.to_vec());
        let flat = Value::Array(
            fields
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect(),
        );
        assert_eq!(parse_record(map).unwrap(), Some(want.clone()));
        assert_eq!(parse_record(flat).unwrap(), Some(want));
        assert_eq!(parse_record(Value::Map(vec![])).unwrap(), None);
        assert_eq!(parse_record(Value::Array(vec![])).unwrap(), None);
    }

    #[test]
    fn bad_hashes_are_corrupt_not_panics() {
        let with = |pairs: &[(&[u8], &[u8])]| {
            Value::Map(pairs.iter().map(|(k, v)| (bulk(k), bulk(v))).collect())
        };
        let cases = [
            with(&[(b"state", b"in_flight")]),
            with(&[(b"token", b"1")]),
            with(&[(b"state", b"done"), (b"token", b"1")]),
            with(&[(b"state", b"in_flight"), (b"token", b"-1")]),
            with(&[
                (b"state", b"in_flight"),
                (b"token", b"1"),
                (b"fp", b"short"),
            ]),
            with(&[(b"state", b"completed"), (b"token", b"1")]),
            with(&[
                (b"state", b"in_flight"),
                (b"token", b"1"),
                (b"lease_until", b"soon"),
            ]),
            with(&[(b"junk", b"x")]),
        ];
        for case in cases {
            assert!(
                matches!(parse_record(case.clone()), Err(Error::Corrupt { .. })),
                "{case:?}"
            );
        }
    }
}
