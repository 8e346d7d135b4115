//! [`IdempotencyMiddleware`]: the [`RetryPolicy`] as a `reqwest-middleware` middleware.

use std::sync::Arc;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::policy::{Outcome, RetryPolicy};
use crate::retry::{self, Ended};

/// The most of a 422 problem document kept in [`Error::KeyReused`].
const MAX_DETAIL_BYTES: usize = 1024;

/// A [`reqwest_middleware::Middleware`] that gives every POST and PATCH (by default) an
/// `Idempotency-Key`, keeps it across every retry of that request, and retries connection
/// errors, timeouts, 409 and the statuses of its [`RetryPolicy`].
///
/// - The key: an [`IdempotencyKey`] request extension
///   (`RequestBuilder::with_extension`), else the request's own `Idempotency-Key` header, else
///   (the caller set none) a new UUIDv7. It is set as the request's header and put in the
///   response's extensions. A header that breaks a [`KeyRule`](crate::KeyRule) (`order 42`, empty,
///   over 255 bytes, given twice) is [`Error::InvalidKey`] and nothing is sent: it is never
///   replaced by a new key.
/// - Every response of a request it applies to carries [`IdempotencyKey`] and [`Attempts`](crate::Attempts) in
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
        // A key the caller set but that cannot be sent is refused here, before any attempt.
        let key =
            IdempotencyKey::for_request(extensions.get(), request.headers_mut()).map_err(wrap)?;
        if request.timeout().is_none() {
            *request.timeout_mut() = self.policy.per_attempt();
        }
        // A request whose body can be cloned is kept as the template of every attempt; one
        // whose body is a stream is sent once, as it is.
        let replayable = request.try_clone().is_some();
        let attempt = Attempt {
            template: Some(request),
            next,
            extensions,
        };
        match retry::send(&self.policy, &key, replayable, attempt).await {
            Ended::Response(mut response, attempts) => {
                response.extensions_mut().insert(key);
                response.extensions_mut().insert(attempts);
                Ok(response)
            }
            Ended::KeyReused(response) => {
                let detail = match response {
                    Some(response) => detail(response).await,
                    None => None,
                };
                Err(wrap(Error::KeyReused {
                    key: key.to_string(),
                    detail,
                }))
            }
            Ended::Failed(error) => Err(wrap(error)),
        }
    }
}

/// The attempts of one request through the rest of the middleware chain.
struct Attempt<'a> {
    /// The request every attempt copies; taken by the one attempt of a body that cannot be
    /// copied (a stream), which the policy never retries.
    template: Option<Request>,
    next: Next<'a>,
    extensions: &'a mut Extensions,
}

impl retry::Attempt for Attempt<'_> {
    type Response = Response;
    type Error = reqwest_middleware::Error;

    fn send(
        &mut self,
    ) -> impl std::future::Future<Output = reqwest_middleware::Result<Response>> + Send + '_ {
        let request = match self.template.as_ref().and_then(Request::try_clone) {
            Some(copy) => copy,
            // The policy stops before a second attempt of a request it was told cannot be
            // copied (`replayable == false`).
            None => self
                .template
                .take()
                .expect("a request is sent once when not clonable"),
        };
        self.next.clone().run(request, self.extensions)
    }

    fn outcome(result: &reqwest_middleware::Result<Response>) -> Outcome {
        match result {
            Ok(response) => Outcome::response(response.status(), response.headers()),
            Err(reqwest_middleware::Error::Reqwest(error))
                if error.is_timeout() || error.is_connect() =>
            {
                Outcome::TransientError
            }
            Err(reqwest_middleware::Error::Reqwest(error)) => Outcome::error(error),
            Err(reqwest_middleware::Error::Middleware(error)) => Outcome::error(error.as_ref()),
        }
    }
}
