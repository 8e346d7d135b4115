//! Decoding the replies of the store's scripts and of `HGETALL`: anything idem did not write is
//! [`Error::Corrupt`] (bad record data) or [`Error::Store`] (an unexpected reply shape), never a
//! panic.

use bytes::Bytes;
use redis::Value;

use super::store_error;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::inspect::from_unix_ms;
use crate::store::{Claim, FencingToken, Forgotten, RecordState, RecordSummary, StoredRecord};

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

/// A field holding Unix milliseconds (`lease_until`, `claimed_at`).
fn parse_millis(name: &str, v: &[u8]) -> Result<i64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .and_then(|ms| i64::try_from(ms).ok())
        .ok_or_else(|| {
            Error::corrupt(format!(
                "Redis record has a malformed {name} {:?}",
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
    Ok(parse_hash(reply)?.map(|hash| hash.record))
}

/// A record hash, decoded and checked.
struct Hash {
    record: StoredRecord,
    /// The end of the lease (Unix ms, server time), in flight only; none in records written
    /// before it existed.
    lease_until: Option<i64>,
    /// When the key was claimed (Unix ms, server time); none in records written before it
    /// existed.
    claimed_at: Option<i64>,
}

/// Decodes an `HGETALL` reply: `None` for no hash.
fn parse_hash(reply: Value) -> Result<Option<Hash>> {
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
    let (mut state, mut token, mut fingerprint, mut record, mut lease_until, mut claimed_at) =
        (None, None, None, None, None, None);
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
            b"claimed_at" => claimed_at = Some(v),
            _ => {}
        }
    }
    let token = parse_token(
        token.ok_or_else(|| Error::corrupt("Redis record hash without a token field"))?,
    )?;
    let fingerprint = fingerprint.map(parse_fingerprint).transpose()?;
    // Checked, as the claim script does, though `get` does not need it (a record in flight is
    // reported as such, lease ended or not).
    let lease_until = lease_until
        .map(|v| parse_millis("lease_until", v))
        .transpose()?;
    let claimed_at = claimed_at
        .map(|v| parse_millis("claimed_at", v))
        .transpose()?;
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
    Ok(Some(Hash {
        record: StoredRecord { fingerprint, state },
        lease_until,
        claimed_at,
    }))
}

/// Decodes the reply of the inspect script (the record's `HGETALL`, its `PTTL` and the server's
/// time in ms) as a listing reports the record: `None` if it is gone.
pub(super) fn parse_summary(key: StorageKey, reply: Value) -> Result<Option<RecordSummary>> {
    let shape = |v: Value| store_error(format!("unexpected reply from the inspect script: {v:?}"));
    let items = match reply {
        Value::Array(items) => items,
        other => return Err(shape(other)),
    };
    let [fields, pttl, now_ms] =
        <[Value; 3]>::try_from(items).map_err(|items| shape(Value::Array(items)))?;
    let (Value::Int(pttl), Value::Int(now_ms)) = (&pttl, &now_ms) else {
        return Err(shape(Value::Array(vec![pttl, now_ms])));
    };
    let (pttl, now_ms) = (*pttl, *now_ms);
    let Some(hash) = parse_hash(fields).map_err(|e| e.with_key(&key))? else {
        return Ok(None);
    };
    // The lease's end while in flight; else (or for a claim of before `lease_until`) the
    // expiry Redis keeps, which a completed record's ttl set. A key without one (-1) does not
    // expire.
    let expires_at = match (&hash.record.state, hash.lease_until) {
        (RecordState::InFlight { .. }, Some(lease_until)) => lease_until,
        _ if pttl < 0 => i64::MAX,
        _ => now_ms.saturating_add(pttl),
    };
    Ok(Some(RecordSummary::new(
        key,
        hash.record,
        from_unix_ms(expires_at),
        hash.claimed_at.map(from_unix_ms),
    )))
}

/// Decodes the reply of the forget script: `{'absent'}`, `{'refused', token}` (in flight, not
/// forced), `{state, token}` of the record it removed, or `{'corrupt', reason}`.
pub(super) fn parse_forgotten(key: &StorageKey, reply: Value) -> Result<Forgotten> {
    let unexpected = || {
        store_error(format!(
            "unexpected reply from the forget script: {reply:?}"
        ))
    };
    let Value::Array(items) = &reply else {
        return Err(unexpected());
    };
    let tag = items.first().and_then(as_bytes).ok_or_else(unexpected)?;
    let token = || {
        let token = items.get(1).and_then(as_bytes).ok_or_else(unexpected)?;
        parse_token(token).map_err(|e| e.with_key(key))
    };
    match tag {
        b"absent" => Ok(Forgotten::Absent),
        b"refused" => Err(Error::InFlight {
            key: Some(key.clone()),
        }),
        b"completed" => Ok(Forgotten::Completed { token: token()? }),
        b"in_flight" => Ok(Forgotten::InFlight { token: token()? }),
        b"corrupt" => {
            let why = items.get(1).and_then(as_bytes).unwrap_or(b"?");
            Err(
                Error::corrupt(format!("Redis record: {}", String::from_utf8_lossy(why)))
                    .with_key(key),
            )
        }
        _ => Err(unexpected()),
    }
}

/// Decodes the reply of the load-steps script: a flat array of step names and records, or 0
/// when the token does not hold the key ([`Error::LeaseLost`]). A name that is not UTF-8 was not
/// written by idem (names are `&str`): [`Error::Corrupt`].
pub(super) fn parse_steps(key: &StorageKey, reply: Value) -> Result<Vec<(String, Bytes)>> {
    let flat = match reply {
        Value::Array(flat) => flat,
        Value::Int(0) => return Err(Error::lease_lost(key)),
        other => {
            return Err(store_error(format!(
                "unexpected reply from the load-steps script: {other:?}"
            )))
        }
    };
    let mut steps = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let Some(name) = it.next() {
        let (Value::BulkString(name), Some(Value::BulkString(record))) = (name, it.next()) else {
            return Err(store_error(
                "unexpected reply from the load-steps script: not name, record pairs",
            ));
        };
        let name = String::from_utf8(name).map_err(|e| {
            Error::corrupt(format!(
                "Redis record has a step whose name is not UTF-8: {:?}",
                String::from_utf8_lossy(e.as_bytes())
            ))
            .with_key(key)
        })?;
        // Take the reply's buffer rather than copy it, as for a completed record.
        steps.push((name, Bytes::from(record)));
    }
    Ok(steps)
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

    fn key() -> StorageKey {
        StorageKey::from_hex(&"0f".repeat(32)).unwrap()
    }

    #[test]
    fn forget_replies_decode() {
        let reply = |items: &[&[u8]]| Value::Array(items.iter().map(|i| bulk(i)).collect());
        assert_eq!(
            parse_forgotten(&key(), reply(&[b"completed", b"12"])).unwrap(),
            Forgotten::Completed {
                token: FencingToken(12)
            }
        );
        assert_eq!(
            parse_forgotten(&key(), reply(&[b"in_flight", b"13"])).unwrap(),
            Forgotten::InFlight {
                token: FencingToken(13)
            }
        );
        assert_eq!(
            parse_forgotten(&key(), reply(&[b"absent"])).unwrap(),
            Forgotten::Absent
        );
        match parse_forgotten(&key(), reply(&[b"refused", b"13"])) {
            Err(Error::InFlight { key: Some(k) }) => assert_eq!(k, key()),
            other => panic!("{other:?}"),
        }
        for corrupt in [
            reply(&[b"corrupt", b"unknown state"]),
            reply(&[b"completed", b"x1"]),
        ] {
            let err = parse_forgotten(&key(), corrupt).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
            assert_eq!(err.storage_key(), Some(&key()));
        }
        for junk in [Value::Nil, reply(&[b"what"]), reply(&[b"completed"])] {
            assert!(matches!(
                parse_forgotten(&key(), junk),
                Err(Error::Store { .. })
            ));
        }
    }

    #[test]
    fn inspect_replies_decode_as_summaries() {
        let hash = |pairs: &[(&[u8], &[u8])]| {
            Value::Array(pairs.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect())
        };
        let inspect = |fields: Value, pttl: i64| {
            Value::Array(vec![fields, Value::Int(pttl), Value::Int(1_000_000)])
        };
        let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        // Completed: expires when Redis expires it; claimed when the claim said.
        let done = hash(&[
            (b"state", b"completed"),
            (b"token", b"7"),
            (b"record", b"rec"),
            (b"claimed_at", b"999000"),
        ]);
        let summary = parse_summary(key(), inspect(done, 5_000)).unwrap().unwrap();
        assert_eq!(summary.expires_at, at(1_005_000));
        assert_eq!(summary.claimed_at, Some(at(999_000)));
        assert_eq!(summary.size, 3);
        assert!(!summary.in_flight());
        // In flight: expires at the end of its lease (here ended), not when Redis drops it.
        let live = hash(&[
            (b"state", b"in_flight"),
            (b"token", b"8"),
            (b"lease_until", b"990000"),
        ]);
        let summary = parse_summary(key(), inspect(live, 86_400_000))
            .unwrap()
            .unwrap();
        assert_eq!(summary.expires_at, at(990_000));
        assert_eq!(summary.claimed_at, None, "a claim of before claimed_at");
        assert_eq!(summary.size, 0);
        assert_eq!(
            summary.state,
            RecordState::InFlight {
                token: FencingToken(8)
            }
        );
        // A claim of before lease_until: its lease is its expiry.
        let old = hash(&[(b"state", b"in_flight"), (b"token", b"9")]);
        let summary = parse_summary(key(), inspect(old, 30_000)).unwrap().unwrap();
        assert_eq!(summary.expires_at, at(1_030_000));
        // Gone between SCAN and the read.
        assert_eq!(
            parse_summary(key(), inspect(Value::Array(vec![]), -2)).unwrap(),
            None
        );
        let bad = hash(&[
            (b"state", b"in_flight"),
            (b"token", b"9"),
            (b"claimed_at", b"soon"),
        ]);
        let err = parse_summary(key(), inspect(bad, 30_000)).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert_eq!(err.storage_key(), Some(&key()));
        assert!(matches!(
            parse_summary(key(), Value::Array(vec![Value::Nil, Value::Nil])),
            Err(Error::Store { .. })
        ));
    }

    #[test]
    fn step_replies_decode() {
        let reply = |items: &[&[u8]]| Value::Array(items.iter().map(|i| bulk(i)).collect());
        assert_eq!(
            parse_steps(
                &key(),
                reply(&[b"a", b"\x00r1", "b/2 \u{fc}".as_bytes(), b""])
            )
            .unwrap(),
            vec![
                ("a".to_owned(), Bytes::from_static(b"\x00r1")),
                ("b/2 \u{fc}".to_owned(), Bytes::new()),
            ]
        );
        assert_eq!(parse_steps(&key(), reply(&[])).unwrap(), vec![]);
        match parse_steps(&key(), Value::Int(0)) {
            Err(Error::LeaseLost { key: Some(k) }) => assert_eq!(k, key()),
            other => panic!("{other:?}"),
        }
        let err = parse_steps(&key(), reply(&[b"\xff", b"r"])).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert_eq!(err.storage_key(), Some(&key()));
        for junk in [Value::Nil, Value::Int(1), reply(&[b"a"])] {
            assert!(matches!(
                parse_steps(&key(), junk),
                Err(Error::Store { .. })
            ));
        }
    }
}
