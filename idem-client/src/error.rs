//! [`Error`]: what the middleware and the layer report when a request ends without a response
//! to return.

use crate::attempts::StopReason;
use crate::key::KeyRule;

/// A boxed error, the source of [`Error::Failed`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request with an `Idempotency-Key` ended without a response to return. Every variant
/// names the key, so that the operation can be retried later with the same one.
///
/// From the reqwest middleware it arrives as `reqwest_middleware::Error::Middleware`; get it
/// back with [`Error::from_middleware`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered 422 with a problem document: the key was already used for another
    /// request (another method, path or body), so the server neither runs this one nor replays
    /// the other's response. Not retried. Send a new key for a new operation, or the same request
    /// as before for the same operation.
    #[error(
        "the Idempotency-Key `{key}` was already used for another request (a different method, path or body): the server answered 422 Unprocessable Content and neither ran this request nor replayed the other one's response; use a new key for a new operation{}",
        detail.as_deref().map(|d| format!(" (server said: {d})")).unwrap_or_default()
    )]
    KeyReused {
        /// The key that was sent.
        key: String,
        /// The body of the server's problem document, if it could be read (at most 1 KiB).
        detail: Option<String>,
    },
    /// The request failed without a response (a connection error, a timeout...) and no further
    /// attempt was made, for `reason`. The server may have run it: retry later with `key`.
    #[error("the request with Idempotency-Key `{key}` failed after {attempts} attempt(s) ({reason}): {source}")]
    Failed {
        /// The key that was sent with every attempt.
        key: String,
        /// The attempts sent, the first included.
        attempts: u32,
        /// Why no further attempt was made.
        reason: StopReason,
        /// The last attempt's error.
        #[source]
        source: BoxError,
    },
    /// The inner tower service failed on a request whose method the policy does not cover: it
    /// was sent once, without a key. (The reqwest middleware passes such errors through as
    /// they are.)
    #[error(transparent)]
    Inner(BoxError),
    /// The key given to [`IdempotencyKey::new`](crate::IdempotencyKey::new), or set by the
    /// caller in the request's `Idempotency-Key` header, cannot be sent: `rule` says which rule
    /// it broke (empty, longer than 255 bytes, not visible ASCII, the header given twice). The
    /// request was not sent, and no other key was put in its place: a replacement would lose the
    /// deduplication that the caller's key asked for. Fix the key (the same fix for every retry
    /// of the operation, e.g. `order-42` instead of `order 42`).
    #[error("invalid Idempotency-Key {key:?}: {rule}; the request was not sent")]
    InvalidKey {
        /// The rejected key (invalid UTF-8 replaced by U+FFFD).
        key: String,
        /// The rule it broke.
        rule: KeyRule,
    },
}

impl Error {
    /// The key the request was sent with (`None` for [`Error::InvalidKey`]: nothing was sent).
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::KeyReused { key, .. } | Error::Failed { key, .. } => Some(key),
            Error::InvalidKey { .. } | Error::Inner(_) => None,
        }
    }

    /// This crate's error inside a `reqwest_middleware::Error`, if it is one.
    pub fn from_middleware(error: &reqwest_middleware::Error) -> Option<&Error> {
        match error {
            reqwest_middleware::Error::Middleware(error) => error.downcast_ref(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }
}
