//! The one retry loop: sends attempts through an [`Attempt`] (the reqwest middleware's `Next`,
//! the tower layer's inner service) and follows the [`RetryPolicy`]'s step after each, so that
//! both front ends wait, stop and report alike.

use std::future::Future;

use crate::attempts::{Attempts, StopReason};
use crate::error::{BoxError, Error};
use crate::key::IdempotencyKey;
use crate::policy::{Outcome, RetryPolicy, Step};

/// One front end's way of sending an attempt of a request and reading what came back.
pub(crate) trait Attempt {
    /// A response.
    type Response;
    /// The error of an attempt without a response.
    type Error: Into<BoxError>;

    /// Sends one attempt (a copy of the request, or the request itself if it cannot be copied).
    fn send(&mut self) -> impl Future<Output = Result<Self::Response, Self::Error>> + Send + '_;

    /// What an attempt's result means to the retry rules.
    fn outcome(result: &Result<Self::Response, Self::Error>) -> Outcome;
}

/// How a request's attempts ended.
pub(crate) enum Ended<R> {
    /// A response to return (final, or retryable but not retried: `Attempts::stopped` says why).
    Response(R, Attempts),
    /// The server answered that the key was already used for another request; its response,
    /// to read the problem document from.
    KeyReused(Option<R>),
    /// No response to return: [`Error::Failed`].
    Failed(Error),
}

/// Sends `attempt` until the policy says the outcome is final or no retry may be made.
pub(crate) async fn send<A: Attempt>(
    policy: &RetryPolicy,
    key: &IdempotencyKey,
    replayable: bool,
    mut attempt: A,
) -> Ended<A::Response> {
    let mut retrier = policy.start(replayable);
    loop {
        let result = attempt.send().await;
        let outcome = A::outcome(&result);
        let step = retrier.after(&outcome);
        tracing::debug!(key = %key, attempt = retrier.attempts(), ?outcome, ?step, "idempotent request attempt");
        let stopped = match step {
            Step::Retry(wait) => {
                tokio::time::sleep(wait).await;
                continue;
            }
            Step::Done => None,
            Step::Stop(reason) => Some(reason),
            Step::KeyReused => return Ended::KeyReused(result.ok()),
        };
        let count = retrier.attempts();
        return match result {
            Ok(response) => Ended::Response(response, Attempts { count, stopped }),
            Err(source) => Ended::Failed(Error::Failed {
                key: key.to_string(),
                attempts: count,
                reason: stopped.unwrap_or(StopReason::NotTransient),
                source: source.into(),
            }),
        };
    }
}
