//! One record of the memory store: its state, and when it stands in a claim's way, exists, and
//! is due for removal.

use bytes::Bytes;
// tokio's clock, so tests with a paused runtime (`start_paused`) move expiry forward instantly.
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::store::{Claim, FencingToken, RecordState, StoredRecord, ABANDONED_CLAIM_RETENTION};

/// A record under one key.
pub(super) struct Slot {
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) token: u64,
    pub(super) state: SlotState,
    /// When the record is due for removal (the ttl's end, or the lease's end plus
    /// [`ABANDONED_CLAIM_RETENTION`]); `None` for never (a period too long to represent). The
    /// expiry index holds exactly this deadline for the record.
    pub(super) due: Option<Instant>,
}

/// The steps of a call in flight: `(name, record)`, one per name, in the order first saved.
pub(super) type Steps = Vec<(Box<str>, Bytes)>;

/// In flight or completed.
pub(super) enum SlotState {
    /// `steps`: the call's saved steps, if any (kept through renewals and takeovers).
    InFlight {
        lease_until: Instant,
        steps: Option<Box<Steps>>,
    },
    Completed {
        expires_at: Instant,
        record: Bytes,
    },
}

/// When an in-flight record whose lease ends at `lease_until` is abandoned and may be purged;
/// `None` for never (a lease too long to add the retention to).
pub(super) fn abandoned_at(lease_until: Instant) -> Option<Instant> {
    lease_until.checked_add(ABANDONED_CLAIM_RETENTION)
}

/// The bytes a step takes, for the store's byte limit.
pub(super) fn step_len(name: &str, record: &[u8]) -> usize {
    name.len() + record.len()
}

impl Slot {
    /// A new in-flight record.
    pub(super) fn in_flight(
        fingerprint: Option<&Fingerprint>,
        token: u64,
        lease_until: Instant,
    ) -> Slot {
        Slot {
            fingerprint: fingerprint.copied(),
            token,
            state: SlotState::InFlight {
                lease_until,
                steps: None,
            },
            due: abandoned_at(lease_until),
        }
    }

    /// The bytes of the stored result, or of the steps while in flight.
    pub(super) fn record_len(&self) -> usize {
        match &self.state {
            SlotState::InFlight { steps, .. } => steps
                .iter()
                .flat_map(|s| s.iter())
                .map(|(name, record)| step_len(name, record))
                .sum(),
            SlotState::Completed { record, .. } => record.len(),
        }
    }

    /// What a claim reports for this live record.
    pub(super) fn live_claim(&self, fingerprint: Option<&Fingerprint>) -> Claim {
        let completed = match &self.state {
            SlotState::Completed { record, .. } => Some(record.clone()),
            SlotState::InFlight { .. } => None,
        };
        Claim::on_live_record(self.fingerprint.as_ref(), fingerprint, completed)
    }

    /// Whether the record stands in a claim's way: a completed record within its ttl, or an
    /// in-flight one within its lease.
    pub(super) fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            SlotState::InFlight { lease_until, .. } => *lease_until > now,
            SlotState::Completed { expires_at, .. } => *expires_at > now,
        }
    }

    /// Whether the record still exists for `get`, its holder and purge: a completed record
    /// within its ttl, or an in-flight one not yet abandoned (its lease may have ended).
    pub(super) fn exists(&self, now: Instant) -> bool {
        self.due.is_none_or(|due| due > now)
    }

    /// Whether the record is in flight.
    pub(super) fn in_flight_now(&self) -> bool {
        matches!(self.state, SlotState::InFlight { .. })
    }

    /// The record as [`Store::get`](crate::store::Store::get) reports it.
    pub(super) fn stored(&self) -> StoredRecord {
        StoredRecord {
            fingerprint: self.fingerprint,
            state: self.record_state(),
        }
    }

    /// In flight or completed, with the token.
    pub(super) fn record_state(&self) -> RecordState {
        let token = FencingToken(self.token);
        match &self.state {
            SlotState::InFlight { .. } => RecordState::InFlight { token },
            SlotState::Completed { record, .. } => RecordState::Completed {
                token,
                record: record.clone(),
            },
        }
    }

    /// When the record's current period ends: its lease, or its ttl.
    pub(super) fn period_end(&self) -> Instant {
        match &self.state {
            SlotState::InFlight { lease_until, .. } => *lease_until,
            SlotState::Completed { expires_at, .. } => *expires_at,
        }
    }
}

impl Slot {
    /// Takes the steps out of an in-flight record (none from a completed one).
    pub(super) fn take_steps(&mut self) -> Option<Box<Steps>> {
        match &mut self.state {
            SlotState::InFlight { steps, .. } => steps.take(),
            SlotState::Completed { .. } => None,
        }
    }

    /// Puts steps into an in-flight record (a completed one has none).
    pub(super) fn put_steps(&mut self, taken: Option<Box<Steps>>) {
        if let SlotState::InFlight { steps, .. } = &mut self.state {
            *steps = taken;
        }
    }

    /// The steps of an in-flight record, as `(name, record)` pairs.
    pub(super) fn steps(&self) -> Vec<(String, Bytes)> {
        match &self.state {
            SlotState::InFlight {
                steps: Some(steps), ..
            } => steps
                .iter()
                .map(|(name, record)| (name.to_string(), record.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }
}
