//! [`IdempotencyMiddleware`]: the [`RetryPolicy`] as a `reqwest-middleware` middleware.

use std::sync::Arc;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::attempts::{Attempts, StopReason};
use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::policy::{Outcome, RetryPolicy, Step};

/// The most of a 422 problem document kept in [`Error::KeyReused`].
const MAX_DETAIL_BYTES: usize = 1024;

/// A [`reqwest_middleware::Middleware`] that gives every POST and PATCH (by default) an
/// `Idempotency-Key`, keeps it across every retry of that request, and retries connection
/// errors, timeouts, 409 and the statuses of its [`RetryPolicy`].
///
/// - The key: an [`IdempotencyKey`] request extension
///   (`RequestBuilder::with_extension`), else the request's own `Idempotency-Key` header, else a
///   new UUIDv7. It is set as the request's header and put in the response's extensions.
/// - Every response of a request it applies to carries [`IdempotencyKey`] and [`Attempts`] in
///   its extensions.
/// - A streaming body (`Request::try_clone` gives `None`) is sent once, with its key, and never
///   retried: a retryable response comes back with `Attempts::stopped ==
///   Some(StopReason::BodyNotReplayable)`, an error as [`Error::Failed`] with that reason.
/// - A 422 problem document (the key was used for another request) is [`Error::KeyReused`].
/// - Every error of a request it applies to is an [`Error`] (get it with
///   [`Error::from_middleware`]), which names the key; requests with other methods pass through
///   untouched.
///
/// Put it first in the chain (`ClientBuilder::new(client).with(IdempotencyMiddleware::default())`)
/// so that middleware added after it (logging, auth, tracing) sees every attempt.
#[derive(Clone, Debug, Default)]
pub struct IdempotencyMiddleware {
    policy: Arc<RetryPolicy>,
}

impl IdempotencyMiddleware {
    /// A middleware with this policy.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }

    /// Its policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

fn wrap(error: Error) -> reqwest_middleware::Error {
    reqwest_middleware::Error::Middleware(error.into())
}

/// The problem document of a 422, read up to [`MAX_DETAIL_BYTES`].
async fn detail(response: Response) -> Option<String> {
    let body = response.bytes().await.ok()?;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_DETAIL_BYTES)]);
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.policy.applies_to(request.method()) {
            return next.run(request, extensions).await;
        }
        let key = IdempotencyKey::for_request(extensions.get(), request.headers_mut());
        if request.timeout().is_none() {
            *request.timeout_mut() = self.policy.per_attempt();
        }
        // A request whose body can be cloned is kept as the template of every attempt; one
        // whose body is a stream is sent once, as it is.
        let replayable = request.try_clone().is_some();
        let mut template = Some(request);
        let mut retrier = self.policy.start(replayable);
        loop {
            let attempt = match template.as_ref().and_then(Request::try_clone) {
                Some(copy) => copy,
                None => template
                    .take()
                    .expect("a request is sent once when not clonable"),
            };
            let result = next.clone().run(attempt, extensions).await;
            let outcome = match &result {
                Ok(response) => Outcome::response(response.status(), response.headers()),
                Err(reqwest_middleware::Error::Reqwest(error))
                    if error.is_timeout() || error.is_connect() =>
                {
                    Outcome::TransientError
                }
                Err(reqwest_middleware::Error::Reqwest(error)) => Outcome::error(error),
                Err(reqwest_middleware::Error::Middleware(error)) => Outcome::error(error.as_ref()),
            };
            let step = retrier.after(&outcome);
            tracing::debug!(key = %key, attempt = retrier.attempts(), ?outcome, ?step, "idempotent request attempt");
            let stopped = match step {
                Step::Retry(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Step::Done => None,
                Step::Stop(reason) => Some(reason),
                Step::KeyReused => {
                    let detail = match result {
                        Ok(response) => detail(response).await,
                        Err(_) => None,
                    };
                    return Err(wrap(Error::KeyReused {
                        key: key.to_string(),
                        detail,
                    }));
                }
            };
            return match result {
                Ok(mut response) => {
                    let attempts = Attempts {
                        count: retrier.attempts(),
                        stopped,
                    };
                    response.extensions_mut().insert(key);
                    response.extensions_mut().insert(attempts);
                    Ok(response)
                }
                Err(error) => Err(wrap(Error::Failed {
                    key: key.to_string(),
                    attempts: retrier.attempts(),
                    reason: stopped.unwrap_or(StopReason::NotTransient),
                    source: error.into(),
                })),
            };
        }
    }
}
