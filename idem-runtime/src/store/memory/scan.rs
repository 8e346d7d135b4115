//! Listing the memory store's records a page at a time, in key order, with a cursor that is
//! the last key listed.

use std::collections::BinaryHeap;
use std::time::SystemTime;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::key::StorageKey;
use crate::store::{RecordSummary, ScanPage};

use super::slot::{Slot, SlotState};

/// What a cursor of this store starts with.
const CURSOR_PREFIX: &str = "memory:";

/// The key a cursor resumes after; `None` for the first page. A cursor this store did not hand
/// out is [`Error::Config`].
pub(super) fn resume_after(cursor: Option<&str>) -> Result<Option<StorageKey>> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    cursor
        .strip_prefix(CURSOR_PREFIX)
        .and_then(StorageKey::from_hex)
        .map(Some)
        .ok_or_else(|| {
            Error::config(format!(
                "`{cursor}` is not a cursor of the memory store (pass the `next` of its previous page)"
            ))
        })
}

/// Builds the page of up to `limit` records after `after`, offered every record of the store
/// in any order: the `limit` smallest keys greater than `after`, so a record that exists
/// throughout a listing is on exactly one page. Costs one pass over the store per page.
pub(super) struct Pager<'a> {
    after: Option<&'a StorageKey>,
    limit: usize,
    now: Instant,
    wall: SystemTime,
    /// The `limit` smallest keys offered so far, largest on top.
    smallest: BinaryHeap<Listed>,
    /// Whether a key beyond them was offered.
    more: bool,
}

impl<'a> Pager<'a> {
    pub(super) fn new(after: Option<&'a StorageKey>, limit: usize, now: Instant) -> Self {
        Pager {
            after,
            limit: limit.max(1),
            now,
            wall: SystemTime::now(),
            smallest: BinaryHeap::new(),
            more: false,
        }
    }

    /// Considers one record.
    pub(super) fn offer(&mut self, key: &StorageKey, slot: &Slot) {
        if self.after.is_some_and(|after| key <= after) || !slot.exists(self.now) {
            return;
        }
        if self.smallest.len() == self.limit {
            self.more = true;
            if self.smallest.peek().is_some_and(|top| top.0.key < *key) {
                return;
            }
            self.smallest.pop();
        }
        self.smallest
            .push(Listed(summary(key, slot, self.now, self.wall)));
    }

    /// The page, in key order.
    pub(super) fn finish(self) -> ScanPage {
        let records: Vec<RecordSummary> = self
            .smallest
            .into_sorted_vec()
            .into_iter()
            .map(|l| l.0)
            .collect();
        let next = match records.last() {
            Some(last) if self.more => Some(format!("{CURSOR_PREFIX}{}", last.key.as_str())),
            _ => None,
        };
        ScanPage { records, next }
    }
}

/// A summary, ordered by key.
struct Listed(RecordSummary);

impl PartialEq for Listed {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}
impl Eq for Listed {}
impl PartialOrd for Listed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Listed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

fn summary(key: &StorageKey, slot: &Slot, now: Instant, wall: SystemTime) -> RecordSummary {
    let end = slot.period_end();
    // The store keeps tokio's monotonic clock; the wall clock of the same moment stands in.
    let expires_at = if end >= now {
        wall + (end - now)
    } else {
        wall.checked_sub(now - end)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    RecordSummary {
        key: key.clone(),
        fingerprint: slot.fingerprint,
        state: slot.record_state(),
        expires_at,
        claimed_at: None,
        size: match &slot.state {
            SlotState::InFlight { .. } => 0,
            SlotState::Completed { record, .. } => record.len() as u64,
        },
    }
}
