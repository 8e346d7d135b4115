//! What a running body can know about its own call: its fencing token, and whether its claim
//! was lost.
//!
//! Fencing only protects what checks the token. A body that writes to a downstream resource
//! (a database row, a payment processor that accepts a monotonic request number) should pass
//! [`token`] along and have the resource refuse a write older than one it has seen; a body with
//! a long or slow side effect should check [`CallContext::check`] (or select on
//! [`CallContext::lost`]) right before it, so that a body whose claim was taken over stops
//! before doing the work twice.
//!
//! ```
//! # use idem_runtime as idempotency;
//! use idempotency::{Call, ErrorPolicy, StorageKey, MemoryStore, Error, context};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let out: Result<u64, Error> = Call::new(StorageKey::derive("docs", "k1").unwrap())
//!     .store(&store)
//!     .run(ErrorPolicy::never(), async {
//!         let call = context::current().expect("inside an idempotent call");
//!         call.check()?; // Err(LeaseLost) once another caller took the key over
//!         // e.g. UPDATE accounts SET ..., fence = $token WHERE id = $1 AND fence < $token
//!         Ok(call.token().0)
//!     })
//!     .await;
//! assert!(out.unwrap() > 0);
//! assert!(context::current().is_none(), "only inside a body");
//! # }
//! ```
//!
//! The context belongs to the body's task: a task the body spawns does not see it (pass the
//! [`CallContext`] along, it is cheap to clone).
//!
//! # A holder knows its own deadline
//!
//! The claim is lost in two ways, and [`CallContext::is_lost`] answers `true` for both:
//!
//! - the store said so: a renewal was refused (another caller took the key over, or an operator
//!   forced it free);
//! - **the holder's own clock says so**, whether or not the store could be asked: a call
//!   tracks the moment its lease lapses as *the moment its last acknowledged claim or renewal
//!   was sent, plus the lease less a margin of a tenth of it* ([`CLOCK_MARGIN`]), measured on
//!   the monotonic clock of this process. The margin covers the store's clock running faster
//!   than this one (Redis and PostgreSQL time leases by their own clocks) by up to 10 %, and
//!   the request's way to the store. A body paused past its lease (a stopped process, a long
//!   stall, a store it could not reach to renew) reads `true` on its first check after it
//!   resumes, though no refusal could reach it.
//!
//! The check narrows the window; it cannot close it (a pause can fall between the check and
//! the side effect). The fencing [`token`](CallContext::token), checked by the resource that
//! takes the side effect, is the guarantee.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::step::{self, StepBook};
use crate::engine::Storable;
use crate::error::{Error, Result};
use crate::key::StorageKey;
use crate::store::FencingToken;

tokio::task_local! {
    static CURRENT: CallContext;
}

/// The share of a lease a holder keeps in hand for clocks that drift and requests on their
/// way: a holder counts its lease as lapsed once `lease - lease / CLOCK_MARGIN` has passed since
/// its last acknowledged claim or renewal was sent (a tenth of the lease: 3 s of the default
/// 30 s). See the [module docs](self#a-holder-knows-its-own-deadline).
pub const CLOCK_MARGIN: u32 = 10;

/// When a holder's lease lapses by its own clock: see [`CLOCK_MARGIN`].
#[derive(Debug)]
pub(crate) struct Deadline {
    lease: Duration,
    at: Mutex<Instant>,
}

impl Deadline {
    /// The deadline of a claim or renewal of `lease` sent at `sent`.
    pub(crate) fn new(sent: Instant, lease: Duration) -> Self {
        Deadline {
            lease,
            at: Mutex::new(sent + Self::held(lease)),
        }
    }

    /// A claim or renewal sent at `sent` was acknowledged: the lease runs from then on.
    pub(crate) fn acknowledged(&self, sent: Instant) {
        let until = sent + Self::held(self.lease);
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if until > *at {
            *at = until;
        }
    }

    /// How much of a lease a holder counts on.
    fn held(lease: Duration) -> Duration {
        lease - lease / CLOCK_MARGIN
    }

    fn at(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn passed(&self) -> bool {
        Instant::now() >= self.at()
    }
}

/// The running call of the body that asks: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct CallContext {
    key: StorageKey,
    token: FencingToken,
    takeover: bool,
    lost: CancellationToken,
    deadline: Arc<Deadline>,
    steps: Arc<StepBook>,
}

impl std::fmt::Debug for StepBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepBook")
    }
}

impl CallContext {
    pub(crate) fn new(
        key: StorageKey,
        token: FencingToken,
        takeover: bool,
        deadline: Arc<Deadline>,
        steps: Arc<StepBook>,
    ) -> Self {
        CallContext {
            key,
            token,
            takeover,
            lost: CancellationToken::new(),
            deadline,
            steps,
        }
    }

    pub(crate) fn steps(&self) -> &StepBook {
        &self.steps
    }

    /// Runs `body` as the step `name` of this call: [`step`](fn@crate::step), for a task that
    /// does not see the call as its own (a task the body spawned, given this context).
    pub async fn step<T, E, F>(&self, name: impl AsRef<str>, body: F) -> Result<T, E>
    where
        T: Storable,
        E: From<Error> + 'static,
        F: std::future::Future<Output = Result<T, E>>,
    {
        step::run(self, name.as_ref(), body).await
    }

    /// An idempotency key for the downstream system of this call's step `name`:
    /// [`step_key`](crate::step_key).
    pub fn step_key(&self, name: &str) -> String {
        step::derive_key(&self.key, name)
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.cancel();
    }

    /// Runs `body` with this context as the current one.
    pub(crate) async fn scope<F: std::future::Future>(self, body: F) -> F::Output {
        CURRENT.scope(self, body).await
    }

    /// The storage key of the call.
    pub fn key(&self) -> &StorageKey {
        &self.key
    }

    /// The call's fencing token: larger than the token of every earlier claim of this key.
    /// Give it to the downstream resource, and have it refuse writes with a smaller token than
    /// one it has already seen.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether this call took the key over from an earlier holder whose lease ran out (a crash,
    /// a stall). That holder may have done part of the work: check the downstream state before
    /// repeating a side effect.
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// Whether the claim has been lost: the store refused a renewal (another caller took the
    /// key over, or an operator forced it free), or this call's lease lapsed by its own clock
    /// (its last acknowledged claim or renewal is older than the lease less [`CLOCK_MARGIN`]:
    /// the process was paused, or the store could not be reached to renew). This call's result
    /// will then not be stored ([`Error::LeaseLost`]) unless the store still holds the claim.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled() || self.deadline.passed()
    }

    /// When this call's lease lapses by its own clock, unless a renewal is acknowledged before
    /// then (renewals move it forward every quarter of the lease while the body runs).
    pub fn deadline(&self) -> Instant {
        self.deadline.at()
    }

    /// `Err(Error::LeaseLost)` once the claim is lost, else `Ok(())`: call it right before a
    /// side effect.
    pub fn check(&self) -> Result<()> {
        if self.is_lost() {
            Err(Error::lease_lost(&self.key))
        } else {
            Ok(())
        }
    }

    /// Completes when the claim is lost, by the store's word or by this call's own deadline
    /// (never, if neither happens): select on it to stop a long body early.
    pub async fn lost(&self) {
        loop {
            let at = self.deadline.at();
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {
                    // A renewal may have moved the deadline while this slept.
                    if self.deadline.passed() {
                        return;
                    }
                }
            }
        }
    }
}

/// The context of the idempotent call whose body is running on this task, if any.
pub fn current() -> Option<CallContext> {
    CURRENT.try_with(CallContext::clone).ok()
}

/// The fencing token of the idempotent call whose body is running on this task, if any: a
/// shorthand for `current().map(|c| c.token())`.
pub fn token() -> Option<FencingToken> {
    CURRENT.try_with(|c| c.token).ok()
}
