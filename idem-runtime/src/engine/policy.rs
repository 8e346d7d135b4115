//! What a call may be told: its defaults and limits, what to do on a conflict or an unknown
//! outcome, which errors are kept, and what its body may return.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

/// Default time a completed result is kept: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lease of an in-flight claim: 30 seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default recovery window of an unknown outcome (`recovery`): 1 hour, or the ttl if that is
/// shorter. Long enough for the body's downstream to settle and for an operator alerted by the
/// `unknown_outcome` event to look (a processor's webhook, a reconciliation job); short enough
/// that a client retrying with backoff is not refused for the rest of a day. Outcomes a handler
/// chose (an `Err`, a 4xx, a 503 or any response with `Retry-After`) are never unknown: they
/// release at once.
pub const DEFAULT_RECOVERY: Duration = Duration::from_secs(3600);
/// Default limit on an encoded result: 8 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 8 << 20;

/// What a call does when its key is in flight elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// Fail at once with [`Error::InFlight`].
    Reject,
    /// Wait up to this long for the other call's result and replay it (or run, if the other call
    /// released its claim); past it, [`Error::WaitTimeout`].
    Wait(Duration),
}

/// A value idem can store and replay: `Serialize + DeserializeOwned`.
///
/// Implemented for every such type; it exists so a missing derive is reported in one clear
/// sentence at the user's type rather than as a list of serde's implementations.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored and replayed by idem",
    label = "`{Self}` must implement `Serialize` and `DeserializeOwned`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}` (results are stored as JSON and replayed)"
)]
pub trait Storable: Serialize + DeserializeOwned {}

#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned> Storable for T {}

/// The return type of an idempotent function: `Result<T, E>` with a storable `T` and an `E`
/// that idem's errors convert into.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` functions must return `Result<T, E>`, not `{Self}`",
    label = "the return type must be `Result<T, E>`",
    note = "`T` must implement `Serialize + DeserializeOwned` (it is stored and replayed), and `E` must implement `From<idempotency::Error>`"
)]
pub trait IdempotentResult: Sized {
    /// The stored, replayed success value.
    type Ok: Storable;
    /// The function's error type.
    type Err: From<Error>;
    /// Splits into a `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// Rebuilds from a `Result`.
    fn from_result(result: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T: Storable, E: From<Error>> IdempotentResult for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
    fn from_result(result: Result<T, E>) -> Self {
        result
    }
}

type Encode<E> = fn(&E) -> serde_json::Result<Vec<u8>>;
type Decode<E> = fn(&[u8]) -> serde_json::Result<E>;

/// Which `Err` results are kept and replayed (`cache_errors`). By default none: the claim is
/// released so a retry runs the body again.
///
/// The same policy decides which errors of the call's [steps](crate::step) are kept, for the
/// steps whose error type is the call's.
pub struct ErrorPolicy<E> {
    pub(super) keep: Option<fn(&E) -> bool>,
    pub(super) codec: Option<(Encode<E>, Decode<E>)>,
    pub(super) unknown: Option<fn(&E) -> bool>,
    /// The policy as a `dyn Any`, for the call's steps to find by their error type: set where
    /// `E: 'static` is known (a policy that keeps errors).
    pub(super) erase: Option<fn(&Self) -> ErasedPolicy>,
}

/// An [`ErrorPolicy`] of some error type, for the steps of a call.
pub(super) type ErasedPolicy = std::sync::Arc<dyn std::any::Any + Send + Sync>;

impl<E> Clone for ErrorPolicy<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for ErrorPolicy<E> {}

impl<E> ErrorPolicy<E> {
    /// Keep no errors (the default).
    pub fn never() -> Self {
        ErrorPolicy {
            keep: None,
            codec: None,
            unknown: None,
            erase: None,
        }
    }

    /// Errors (not kept) that `unknown` accepts mean the body's outcome is unknown rather than
    /// "nothing happened": they are handled per [`OnUnknown`] instead of releasing the claim.
    /// The HTTP layer uses it for responses it cannot keep.
    pub fn unknown_when(mut self, unknown: fn(&E) -> bool) -> Self {
        self.unknown = Some(unknown);
        self
    }
}

impl<E: Storable + 'static> ErrorPolicy<E> {
    /// Keep every error (`cache_errors = true`).
    pub fn always() -> Self {
        fn yes<E>(_: &E) -> bool {
            true
        }
        Self::when(yes::<E>)
    }

    /// Keep the errors `keep` accepts (`cache_errors = path::to::predicate`).
    pub fn when(keep: fn(&E) -> bool) -> Self {
        ErrorPolicy {
            keep: Some(keep),
            codec: Some((|e| serde_json::to_vec(e), |b| serde_json::from_slice(b))),
            unknown: None,
            erase: Some(|policy| std::sync::Arc::new(*policy)),
        }
    }
}

/// The shortest lease accepted: 100 ms. A shorter lease expires before a store round trip and
/// a renewal can land, so every concurrent caller would take the key over and run the body.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The default limit of `on_conflict = "wait"` for a given lease: long enough for the holder's
/// lease to run out and for a caller that takes the key over to run the body within a lease of
/// its own (`2 × lease + 1 s`), so the waiters of a crashed holder get the taker's result.
pub fn default_wait(lease: Duration) -> Duration {
    lease
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1))
}

/// What becomes of a key whose body started but whose outcome is unknown: the body panicked,
/// the call was abandoned while its body ran (and the body could not go on by itself), or its
/// result could not be kept (too large, not encodable; for HTTP a 5xx, a streamed or failed
/// response). Its side effect may or may not have happened.
///
/// An `Err` the body returns is not unknown (the body said what happened): it releases the
/// claim at once unless it is kept (`cache_errors`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnUnknown {
    /// At most once (the default): the key keeps a record of the unknown outcome, and every
    /// call with it fails with [`Error::OutcomeUnknown`] until the record is removed or the
    /// recovery window (by default an hour, [`DEFAULT_RECOVERY`]) passes. What a payments team expects: a charge
    /// that may have gone through is never sent again by accident. Stripe keeps 500s the same
    /// way.
    #[default]
    Refuse,
    /// At least once: the claim is released, so the next call runs the body again. For bodies
    /// whose side effects are themselves idempotent or harmless to repeat.
    Rerun,
}

/// A value usable as `ttl = EXPR`, `lease = EXPR` or `wait = EXPR`: a `Duration`, or whole
/// seconds as an integer.
pub trait IntoDuration {
    /// The duration.
    fn into_duration(self) -> Duration;
}

impl IntoDuration for Duration {
    fn into_duration(self) -> Duration {
        self
    }
}

macro_rules! seconds {
    ($($t:ty),*) => {$(
        impl IntoDuration for $t {
            fn into_duration(self) -> Duration {
                // Negative seconds make no sense as a duration; they count as zero.
                Duration::from_secs(u64::try_from(self).unwrap_or(0))
            }
        }
    )*};
}
seconds!(u64, u32, usize, i64, i32);
