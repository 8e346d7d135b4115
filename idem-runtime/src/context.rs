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

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::key::StorageKey;
use crate::store::FencingToken;

tokio::task_local! {
    static CURRENT: CallContext;
}

/// The running call of the body that asks: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct CallContext {
    key: StorageKey,
    token: FencingToken,
    takeover: bool,
    lost: CancellationToken,
}

impl CallContext {
    pub(crate) fn new(key: StorageKey, token: FencingToken, takeover: bool) -> Self {
        CallContext {
            key,
            token,
            takeover,
            lost: CancellationToken::new(),
        }
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

    /// Whether the claim has been lost: another caller took the key over after this call's
    /// lease ran out (its renewal could not reach the store in time). This call's result will
    /// not be stored ([`Error::LeaseLost`]).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
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

    /// Completes when the claim is lost (never, if it is not): select on it to stop a long
    /// body early.
    pub async fn lost(&self) {
        self.lost.cancelled().await
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
