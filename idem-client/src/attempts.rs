//! [`Attempts`]: how many attempts a request took and why the retries stopped, as a response
//! extension; [`AttemptTimedOut`], the error of an attempt over its time limit.

use std::fmt;
use std::time::Duration;

/// A response extension: the attempts the request took, the first included, and why a retry the
/// response asked for was not made. Read it with `response.extensions().get::<Attempts>()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    /// The attempts sent, the first included.
    pub count: u32,
    /// `None` if the response is final (a success, or a status that is not retried); otherwise
    /// the reason a retryable response (a 409, a 503...) is returned as it is.
    pub stopped: Option<StopReason>,
}

/// Why a request that could have been retried was not sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The error was not a connection error or a timeout (a bad URL, a TLS failure...): sending
    /// the request again would fail the same way.
    NotTransient,
    /// The body is a stream (`reqwest::Request::try_clone` gives `None`): it was sent once and
    /// cannot be sent again. Retry the operation yourself with the same key
    /// ([`IdempotencyKey`](crate::IdempotencyKey)) and a body that can be replayed.
    BodyNotReplayable,
    /// [`RetryPolicy::max_attempts`](crate::RetryPolicy::max_attempts) attempts were made.
    AttemptsExhausted,
    /// The next wait would have ended after
    /// [`RetryPolicy::max_elapsed`](crate::RetryPolicy::max_elapsed).
    TimeBudgetExhausted,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::NotTransient => "not retried: not a connection error or a timeout",
            StopReason::BodyNotReplayable => {
                "not retried: the body is a stream, which cannot be sent again"
            }
            StopReason::AttemptsExhausted => "the attempt limit was reached",
            StopReason::TimeBudgetExhausted => "the time budget ran out",
        })
    }
}

/// The error of an attempt that ran over
/// [`RetryPolicy::attempt_timeout`](crate::RetryPolicy::attempt_timeout) in the tower layer
/// (reqwest reports its own timeouts). A timeout is retried with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptTimedOut(pub Duration);

impl fmt::Display for AttemptTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the attempt timed out after {:?}", self.0)
    }
}

impl std::error::Error for AttemptTimedOut {}
