//! One item of the table, read: the attributes of a record (or of a released key's tombstone)
//! and the rules that say whether it is live, as every method of the store applies them.

use std::collections::HashMap;
use std::time::SystemTime;

use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;

use super::attr;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::store::{FencingToken, RecordState, StoredRecord, ABANDONED_CLAIM_RETENTION};

/// An item's attributes, as the SDK returns them.
pub(super) type Attributes = HashMap<String, AttributeValue>;

/// The state an item is in (its `st` attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Claimed: `until` is the end of the lease.
    InFlight,
    /// Completed: `until` is the end of the ttl, `rec` holds the record.
    Completed,
    /// Released by its holder: no record, only the key's last token.
    Released,
    /// Removed by `forget`: no record, only the key's last token.
    Forgotten,
}

impl State {
    /// The value of the `st` attribute.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            State::InFlight => "in_flight",
            State::Completed => "completed",
            State::Released => "released",
            State::Forgotten => "forgotten",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "in_flight" => State::InFlight,
            "completed" => State::Completed,
            "released" => State::Released,
            "forgotten" => State::Forgotten,
            _ => return None,
        })
    }
}

/// An item of the table, checked: what idem wrote, or [`Error::Corrupt`].
#[derive(Clone, Debug)]
pub(super) struct Item {
    pub(super) state: State,
    /// The token of the key's latest claim.
    pub(super) token: FencingToken,
    pub(super) fingerprint: Option<Fingerprint>,
    /// The end of the lease (in flight) or of the ttl (completed), in Unix milliseconds of the
    /// writer's clock; 0 for a tombstone.
    pub(super) until_ms: u64,
    /// When the key was claimed, in Unix milliseconds, if known.
    pub(super) claimed_at_ms: Option<u64>,
    /// The record bytes (completed only).
    pub(super) record: Option<Bytes>,
    /// The step frames (in flight only), each one frame of [`crate::store::steps_blob`].
    pub(super) steps: Vec<Bytes>,
}

impl Item {
    /// Reads `attrs`: [`Error::Corrupt`] for an item idem did not write (no state or token, an
    /// unknown state, a number that is not one, a fingerprint that is not 32 bytes, a completed
    /// item without its record).
    pub(super) fn parse(attrs: &Attributes) -> Result<Item> {
        let state = match attrs.get(attr::STATE) {
            Some(AttributeValue::S(s)) => State::parse(s)
                .ok_or_else(|| Error::corrupt(format!("DynamoDB item: unknown state `{s}`")))?,
            _ => return Err(Error::corrupt("DynamoDB item: no state")),
        };
        let token = number(attrs, attr::TOKEN)?
            .filter(|t| *t > 0)
            .ok_or_else(|| Error::corrupt("DynamoDB item: no valid token"))?;
        let fingerprint = match attrs.get(attr::FINGERPRINT) {
            None => None,
            Some(AttributeValue::B(b)) => {
                let bytes: [u8; 32] = b.as_ref().try_into().map_err(|_| {
                    Error::corrupt(format!(
                        "DynamoDB item: a fingerprint of {} bytes, not 32",
                        b.as_ref().len()
                    ))
                })?;
                Some(Fingerprint(bytes))
            }
            Some(_) => {
                return Err(Error::corrupt(
                    "DynamoDB item: a fingerprint that is not binary",
                ));
            }
        };
        let until_ms = number(attrs, attr::UNTIL)?
            .ok_or_else(|| Error::corrupt("DynamoDB item: no expiry (`until`)"))?;
        let claimed_at_ms = number(attrs, attr::CLAIMED_AT)?;
        let record = match attrs.get(attr::RECORD) {
            None => None,
            Some(AttributeValue::B(b)) => Some(Bytes::copy_from_slice(b.as_ref())),
            Some(_) => return Err(Error::corrupt("DynamoDB item: a record that is not binary")),
        };
        if state == State::Completed && record.is_none() {
            return Err(Error::corrupt(
                "DynamoDB item: completed without its record",
            ));
        }
        let steps = match attrs.get(attr::STEPS) {
            None => Vec::new(),
            Some(AttributeValue::L(frames)) => frames
                .iter()
                .map(|f| match f {
                    AttributeValue::B(b) => Ok(Bytes::copy_from_slice(b.as_ref())),
                    _ => Err(Error::corrupt("DynamoDB item: a step that is not binary")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(Error::corrupt("DynamoDB item: steps that are not a list")),
        };
        Ok(Item {
            state,
            token: FencingToken(token),
            fingerprint,
            until_ms,
            claimed_at_ms,
            record,
            steps,
        })
    }

    /// Whether the item is a record [`Store::get`](crate::store::Store::get) reports at
    /// `now_ms`: a completed record within its ttl, or a claim not abandoned (its lease ended
    /// less than [`ABANDONED_CLAIM_RETENTION`] ago). DynamoDB deletes expired items late (its
    /// TTL sweep runs within days), so every read applies this rule itself.
    pub(super) fn exists(&self, now_ms: u64) -> bool {
        match self.state {
            State::Completed => self.until_ms > now_ms,
            State::InFlight => self.until_ms > abandoned_before(now_ms),
            State::Released | State::Forgotten => false,
        }
    }

    /// Whether `token` holds the key at `now_ms`: in flight under exactly it, not abandoned.
    pub(super) fn held_by(&self, token: FencingToken, now_ms: u64) -> bool {
        self.state == State::InFlight && self.token == token && self.exists(now_ms)
    }

    /// The record as [`Store::get`](crate::store::Store::get) reports it (the caller checked
    /// [`exists`](Self::exists)).
    pub(super) fn stored(&self) -> StoredRecord {
        let state = match (&self.state, &self.record) {
            (State::Completed, Some(record)) => RecordState::Completed {
                token: self.token,
                record: record.clone(),
            },
            _ => RecordState::InFlight { token: self.token },
        };
        StoredRecord {
            fingerprint: self.fingerprint,
            state,
        }
    }

    /// The end of the lease or ttl, as an instant.
    pub(super) fn until(&self) -> SystemTime {
        system_time(self.until_ms)
    }

    /// When the key was claimed, as an instant.
    pub(super) fn claimed_at(&self) -> Option<SystemTime> {
        self.claimed_at_ms.map(system_time)
    }
}

/// The instant before which a lease that ended makes its claim abandoned, seen at `now_ms`.
pub(super) fn abandoned_before(now_ms: u64) -> u64 {
    now_ms.saturating_sub(ABANDONED_CLAIM_RETENTION.as_millis() as u64)
}

/// The instant `ms` milliseconds after the Unix epoch, capped at the end of the year 9999.
fn system_time(ms: u64) -> SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let latest = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .map_or(latest, |at| at.min(latest))
}

/// The number attribute `name` as a `u64`, `None` if missing, [`Error::Corrupt`] if it is not a
/// non-negative integer.
fn number(attrs: &Attributes, name: &str) -> Result<Option<u64>> {
    match attrs.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| {
            Error::corrupt(format!(
                "DynamoDB item: `{name}` is `{n}`, not a whole number"
            ))
        }),
        Some(_) => Err(Error::corrupt(format!(
            "DynamoDB item: `{name}` is not a number"
        ))),
    }
}
