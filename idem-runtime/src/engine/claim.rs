//! Claiming a key: the claim itself (waiting for a holder if the call says so), and the replay
//! of a stored result.

use std::any::type_name;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Labels, Stopwatch, StoreOp};
use crate::record::{Expected, Outcome, Record};
use crate::served::ReplayInfo;
use crate::store::{Claim, FencingToken, Store, WAIT_SAFETY_NET};

use super::policy::{ErrorPolicy, OnConflict};

/// What a claim found.
pub(super) enum Claimed {
    /// The token, whether the claim took over an expired lease, and when the claim that
    /// acquired it was sent (the holder's lease runs from then, by its own clock).
    Token(FencingToken, bool, Instant),
    /// A stored result.
    Replay(bytes::Bytes),
}

/// Claims `key`: a token to run the body under, or the stored result to replay. An in-flight
/// key fails at once ([`OnConflict::Reject`]) or is waited for ([`OnConflict::Wait`]), through
/// the store's change notification. `labels`: the call's, for its metrics.
pub(super) async fn claim(
    store: &dyn Store,
    key: &StorageKey,
    fingerprint: Option<&Fingerprint>,
    lease: Duration,
    on_conflict: OnConflict,
    labels: Labels,
) -> Result<Claimed> {
    let deadline = match on_conflict {
        OnConflict::Reject => None,
        OnConflict::Wait(d) => Some((Instant::now() + d, d)),
    };
    let mut pause = Duration::from_millis(2);
    let mut counted_conflict = false;
    // Times the wait for a holder, however the claim ends (or is dropped), once it began.
    let mut waiting: Option<Waiting> = None;
    loop {
        let sent = Instant::now();
        match timed(StoreOp::Claim, labels, store.claim(key, fingerprint, lease)).await {
            Err(e) => {
                count(Event::StoreError, labels);
                tracing::warn!(target: "idem", key = %key, error = %e, "claim failed");
                return Err(e);
            }
            Ok(Claim::Acquired { token, takeover }) => {
                if takeover {
                    count(Event::Takeover, labels);
                    tracing::info!(target: "idem", key = %key, token = token.0, "took over an expired lease");
                }
                return Ok(Claimed::Token(token, takeover, sent));
            }
            Ok(Claim::Completed(bytes)) => return Ok(Claimed::Replay(bytes)),
            Ok(Claim::KeyReuse) => {
                count(Event::KeyReuse, labels);
                tracing::warn!(target: "idem", key = %key, "key reused with a different fingerprint");
                return Err(Error::KeyReuse {
                    key: Some(key.clone()),
                });
            }
            Ok(Claim::InFlight) => {
                if !counted_conflict {
                    counted_conflict = true;
                    count(Event::Conflict, labels);
                    tracing::debug!(target: "idem", key = %key, ?on_conflict, "in flight elsewhere");
                }
                let Some((deadline, limit)) = deadline else {
                    return Err(Error::InFlight {
                        key: Some(key.clone()),
                    });
                };
                waiting.get_or_insert_with(|| Waiting(Stopwatch::start(), labels));
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::WaitTimeout {
                        waited: limit,
                        key: Some(key.clone()),
                    });
                }
                // A store that announces changes wakes the waiter itself; the sleep between
                // claims is then only the safety net. Others are polled with growing pauses.
                let wait = if store.notifies_changes() {
                    WAIT_SAFETY_NET
                } else {
                    pause
                };
                store.wait_for_change(key, wait.min(deadline - now)).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Records how long a call waited for a holder when dropped: when the claim ends, however it
/// ends.
struct Waiting(Stopwatch, Labels);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.wait_ended(self.1);
    }
}

/// The stored result in `bytes`, decoded as the caller's `Ok` or kept `Err` with what is known
/// of it, or the error that says why it cannot be replayed (an unknown outcome, another
/// operation or version, a damaged record).
#[allow(clippy::type_complexity)]
pub(super) fn decode_stored<T: DeserializeOwned, E: From<Error>>(
    key: &StorageKey,
    bytes: &[u8],
    errors: &ErrorPolicy<E>,
    expected: &Expected<'_>,
) -> Result<(Result<T, E>, ReplayInfo), E> {
    let record = Record::decode(bytes).map_err(|e| e.with_key(key))?;
    let info = |kept_error| {
        ReplayInfo::new(
            key.clone(),
            record.token,
            record.completed_at_ms,
            kept_error,
        )
    };
    match record.outcome {
        Outcome::Unknown => Err(Error::OutcomeUnknown {
            reason: record.reason(),
            key: Some(key.clone()),
        }
        .into()),
        Outcome::Ok => {
            let value = record
                .decode_payload(expected, type_name::<T>(), |payload| {
                    serde_json::from_slice(payload)
                })
                .map_err(|e| e.with_key(key))?;
            Ok((Ok(value), info(false)))
        }
        Outcome::Err => {
            let ty = type_name::<E>();
            let Some((_, decode)) = errors.codec else {
                // An error was kept by a build that cached errors; this one cannot decode errors.
                return Err(record
                    .mismatch(
                        expected,
                        ty,
                        Some("a kept error, and this function does not keep errors".into()),
                    )
                    .with_key(key)
                    .into());
            };
            let kept = record
                .decode_payload(expected, ty, decode)
                .map_err(|e| e.with_key(key))?;
            Ok((Err(kept), info(true)))
        }
    }
}
