//! Telling a replay from a first run, without changing a function's signature: [`observe`] a
//! future to learn how the idempotent call inside it was served ([`Served`]), and give a call a
//! hook that adjusts replayed values (`#[idempotent(on_replay = path::to::hook)]`, or
//! [`Call::on_replay`](crate::Call::on_replay)).
//!
//! ```
//! # use idem_runtime as idempotency;
//! use idempotency::{observe, Call, Error, ErrorPolicy, MemoryStore, ReplayInfo, Served, StorageKey};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let call = || {
//!     Call::new(StorageKey::derive("docs", "evt_1").unwrap())
//!         .store(&store)
//!         // Runs on replays only, on the value the caller gets; the stored record is untouched.
//!         .on_replay(|ack: String, _: &ReplayInfo| format!("{ack} (again)"))
//!         .run(ErrorPolicy::never(), async { Ok::<_, Error>("applied".to_string()) })
//! };
//!
//! let (first, how) = observe(call()).await;
//! assert_eq!(first.unwrap(), "applied");
//! assert!(matches!(how, Some(Served::Ran { .. })));
//!
//! let (retry, how) = observe(call()).await;
//! assert_eq!(retry.unwrap(), "applied (again)");
//! assert!(matches!(how, Some(Served::Replayed(_))));
//! # }
//! ```
//!
//! [`observe`] reports the last idempotent call *answered* inside the future: with a call whose
//! body makes idempotent calls of its own, the outer call is answered last, so it is the one
//! reported. Calls on other tasks (spawned by the future) are not seen. The HTTP layer marks
//! replayed responses with its own header (`Idempotent-Replayed: true`).

use std::cell::RefCell;
use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::key::StorageKey;
use crate::store::FencingToken;

tokio::task_local! {
    static OBSERVED: RefCell<Option<Served>>;
}

/// How an idempotent call was served: see [`observe`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// The call claimed the key and ran its body: the result is fresh (an `Err` the body
    /// returned included).
    #[non_exhaustive]
    Ran {
        /// The call's storage key.
        key: StorageKey,
        /// The fencing token of the claim the body ran under.
        token: FencingToken,
        /// Whether the claim took over an expired lease (an earlier holder may have done part
        /// of the work).
        takeover: bool,
    },
    /// The body did not run: the call got the result a first call stored (a value, or a kept
    /// `Err`).
    Replayed(ReplayInfo),
    /// The body did not run and nothing was replayed: the call failed with an idem error
    /// before (in flight elsewhere, a wait that timed out, key reuse, an unknown outcome on
    /// record, a record that could not be decoded, the store unreachable, a configuration
    /// mistake).
    Refused,
}

impl Served {
    /// Whether the call got a stored result back instead of running its body.
    pub fn is_replay(&self) -> bool {
        matches!(self, Served::Replayed(_))
    }
}

/// A replayed result: what a replay hook and [`Served::Replayed`] are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayInfo {
    key: StorageKey,
    token: FencingToken,
    completed_at: SystemTime,
    kept_error: bool,
}

impl ReplayInfo {
    pub(crate) fn new(key: StorageKey, token: u64, completed_at_ms: u64, kept_error: bool) -> Self {
        ReplayInfo {
            key,
            token: FencingToken(token),
            completed_at: SystemTime::UNIX_EPOCH + Duration::from_millis(completed_at_ms),
            kept_error,
        }
    }

    /// When the result was stored, in ms since the Unix epoch (as the record says).
    pub(crate) fn completed_at_ms(&self) -> u64 {
        self.completed_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// The call's storage key.
    pub fn key(&self) -> &StorageKey {
        &self.key
    }

    /// The fencing token of the call whose body ran and stored this result.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// When that call stored it, by the clock of the process that stored it.
    pub fn completed_at(&self) -> SystemTime {
        self.completed_at
    }

    /// Whether the replayed result is a kept `Err` (`cache_errors`) rather than a value. Replay
    /// hooks see values only.
    pub fn is_kept_error(&self) -> bool {
        self.kept_error
    }
}

/// Runs `future` and tells how the last idempotent call answered inside it was served: `None`
/// if none was. The function called keeps its signature; see the [module docs](self).
///
/// Observations nest: an `observe` inside another sees the calls inside it, and the outer one
/// sees only the calls answered outside the inner one.
pub async fn observe<F: Future>(future: F) -> (F::Output, Option<Served>) {
    OBSERVED
        .scope(RefCell::new(None), async move {
            let output = future.await;
            let served = OBSERVED.with(|served| served.borrow_mut().take());
            (output, served)
        })
        .await
}

/// Whether an [`observe`] is waiting on this task (so that [`record`] is worth preparing for).
pub(crate) fn observing() -> bool {
    OBSERVED.try_with(|_| ()).is_ok()
}

/// Tells the enclosing [`observe`], if any, how a call was served (`served` is only made if one
/// is listening).
pub(crate) fn record(served: impl FnOnce() -> Served) {
    let _ = OBSERVED.try_with(|slot| *slot.borrow_mut() = Some(served()));
}
