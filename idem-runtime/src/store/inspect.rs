//! What an operator sees of a store: one record's summary, a page of a listing, and what
//! [`Store::forget`](super::Store::forget) removed. Read by the `idem` command and
//! [`forget`](crate::forget).

use std::time::{Duration, SystemTime};

use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;

use super::{FencingToken, RecordState, StoredRecord};

/// What [`Store::forget`](super::Store::forget) removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgotten {
    /// A completed record (a stored result, or an unknown outcome) was removed: the next call
    /// with the key runs the body.
    Completed {
        /// The token of the claim that had completed it.
        token: FencingToken,
    },
    /// An in-flight record was removed because the removal was forced. Its holder's token is
    /// fenced off: whatever that holder does next (`complete`, `renew`, `release`) fails with
    /// [`Error::LeaseLost`](crate::Error::LeaseLost), also after a new claim of the key.
    InFlight {
        /// The token of the holder whose claim was removed.
        token: FencingToken,
    },
    /// There was no record (none, or one that had expired).
    Absent,
}

/// One record as a listing ([`Store::scan`](super::Store::scan)) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSummary {
    /// The storage key.
    pub key: StorageKey,
    /// The fingerprint stored with the claim, if any.
    pub fingerprint: Option<Fingerprint>,
    /// In flight (with its holder's token) or completed (with the record bytes).
    pub state: RecordState,
    /// When the record's current period ends, on the store's clock: the lease of an in-flight
    /// record (in the past for a lease that ended and that nobody took over), the ttl of a
    /// completed one.
    pub expires_at: SystemTime,
    /// When the key was claimed (by the current holder, or by the claim that completed it), if
    /// the store keeps it.
    pub claimed_at: Option<SystemTime>,
    /// The bytes the record takes in the store: the stored result, or 0 while in flight.
    pub size: u64,
}

impl RecordSummary {
    /// The summary of `record` under `key`: its state and fingerprint, and as its
    /// [`size`](Self::size) the length of the stored result (0 in flight).
    pub fn new(
        key: StorageKey,
        record: StoredRecord,
        expires_at: SystemTime,
        claimed_at: Option<SystemTime>,
    ) -> Self {
        let size = match &record.state {
            RecordState::Completed { record, .. } => record.len() as u64,
            RecordState::InFlight { .. } => 0,
        };
        RecordSummary {
            key,
            fingerprint: record.fingerprint,
            state: record.state,
            expires_at,
            claimed_at,
            size,
        }
    }

    /// How long until [`expires_at`](Self::expires_at) (`Ok`), or how long ago it passed
    /// (`Err`), seen from `now`.
    pub fn expires_in(&self, now: SystemTime) -> Result<Duration, Duration> {
        self.expires_at
            .duration_since(now)
            .map_err(|passed| passed.duration())
    }

    /// How long ago the key was claimed, seen from `now`, where the store keeps it.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.claimed_at
            .map(|at| now.duration_since(at).unwrap_or_default())
    }

    /// Whether the record is in flight.
    pub fn in_flight(&self) -> bool {
        matches!(self.state, RecordState::InFlight { .. })
    }
}

/// A page of a listing: records in no particular order, and the cursor of the next page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The records of this page (possibly none, even when more follow).
    pub records: Vec<RecordSummary>,
    /// Pass to the next [`Store::scan`](super::Store::scan); `None` once the listing is done.
    pub next: Option<String>,
}

/// The instant `ms` milliseconds after the Unix epoch, for the stores that keep times in Unix
/// milliseconds. Times are capped at the end of the year 9999, which every platform's
/// [`SystemTime`] holds (a ttl of `Duration::MAX` is stored as the largest number); a negative
/// `ms`, which no store writes, is the epoch.
#[cfg(any(feature = "sqlite", feature = "redis"))]
pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    use std::time::UNIX_EPOCH;
    let latest = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let ms = u64::try_from(ms).unwrap_or(0);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .map_or(latest, |at| at.min(latest))
}
