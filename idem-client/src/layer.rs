//! [`IdempotencyClientLayer`]: the [`RetryPolicy`] as a tower layer for HTTP clients built on
//! hyper and tower (hyper-util's client, tonic channels, any `Service<http::Request<B>>`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

use crate::attempts::{AttemptTimedOut, Attempts, StopReason};
use crate::error::{BoxError, Error};
use crate::key::IdempotencyKey;
use crate::policy::{Outcome, RetryPolicy, Step};

/// A tower [`Layer`] for HTTP clients with the behaviour of
/// [`IdempotencyMiddleware`](crate::IdempotencyMiddleware): one `Idempotency-Key` per request
/// (an [`IdempotencyKey`] request extension, else the request's header, else a new UUIDv7), the
/// same key on every retry, connection errors, timeouts, 409 and the policy's statuses retried
/// with backoff and `Retry-After`, a 422 problem document as [`Error::KeyReused`], and
/// [`IdempotencyKey`] and [`Attempts`] in every response's extensions.
///
/// The request body must be `Clone` (`http_body_util::Full<Bytes>`, `String`...): every attempt
/// sends a copy, so a stream, which could be sent only once, does not compile. The inner service
/// must be `Clone` (hyper-util's legacy `Client` and tonic's `Channel` are); each attempt waits
/// for its readiness. [`RetryPolicy::attempt_timeout`] bounds each attempt
/// ([`AttemptTimedOut`]).
///
/// ```no_run
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use idem_client::{IdempotencyClientLayer, IdempotencyKey, RetryPolicy};
/// use std::time::Duration;
/// use tower::{Layer, ServiceExt};
///
/// # #[tokio::main] async fn main() -> Result<(), idem_client::Error> {
/// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let client = IdempotencyClientLayer::new(
///     RetryPolicy::new().attempt_timeout(Duration::from_secs(2)),
/// )
/// .layer(http);
/// let request = http::Request::post("http://127.0.0.1:3000/payments")
///     .header("content-type", "application/json")
///     .body(Full::new(Bytes::from(r#"{"amount":500,"currency":"usd"}"#)))
///     .unwrap();
/// let response = client.oneshot(request).await?;
/// let key = response.extensions().get::<IdempotencyKey>().unwrap();
/// println!("{} with key {key}", response.status());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct IdempotencyClientLayer {
    policy: Arc<RetryPolicy>,
}

impl IdempotencyClientLayer {
    /// A layer with this policy.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for IdempotencyClientLayer {
    type Service = IdempotencyClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyClient {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service of [`IdempotencyClientLayer`]. Its error is [`Error`]; the error of a request
/// whose method the policy does not cover (sent once, without a key) is [`Error::Inner`].
#[derive(Clone, Debug)]
pub struct IdempotencyClient<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

/// The future of [`IdempotencyClient`].
pub type ResponseFuture<R> = Pin<Box<dyn Future<Output = Result<R, Error>> + Send>>;

/// A copy of `request` for one attempt: method, URI, version, headers, extensions and body.
fn copy<B: Clone>(request: &Request<B>) -> Request<B> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

impl<S, B, ResB> Service<Request<B>> for IdempotencyClient<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Clone + Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = Error;
    type Future = ResponseFuture<Response<ResB>>;

    /// Always ready: each attempt waits for the inner service's readiness.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let policy = self.policy.clone();
        if !policy.applies_to(request.method()) {
            return Box::pin(async move {
                let inner = inner.ready().await.map_err(passed_through)?;
                inner.call(request).await.map_err(passed_through)
            });
        }
        Box::pin(async move {
            let key = IdempotencyKey::for_request(
                request
                    .extensions()
                    .get::<IdempotencyKey>()
                    .cloned()
                    .as_ref(),
                request.headers_mut(),
            );
            let mut retrier = policy.start(true);
            loop {
                let attempt = attempt(&mut inner, copy(&request), &policy).await;
                let outcome = match &attempt {
                    Ok(response) => Outcome::response(response.status(), response.headers()),
                    Err(error) => Outcome::error(error.as_ref()),
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
                        return Err(Error::KeyReused {
                            key: key.to_string(),
                            detail: None,
                        })
                    }
                };
                return match attempt {
                    Ok(mut response) => {
                        let attempts = Attempts {
                            count: retrier.attempts(),
                            stopped,
                        };
                        response.extensions_mut().insert(key);
                        response.extensions_mut().insert(attempts);
                        Ok(response)
                    }
                    Err(source) => Err(Error::Failed {
                        key: key.to_string(),
                        attempts: retrier.attempts(),
                        reason: stopped.unwrap_or(StopReason::NotTransient),
                        source,
                    }),
                };
            }
        })
    }
}

/// One attempt: wait for readiness, call, within the policy's attempt timeout.
async fn attempt<S, B, ResB>(
    inner: &mut S,
    request: Request<B>,
    policy: &RetryPolicy,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    let call = async {
        let ready = inner.ready().await.map_err(Into::into)?;
        ready.call(request).await.map_err(Into::into)
    };
    match policy.per_attempt() {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(Box::new(AttemptTimedOut(limit))),
        },
        None => call.await,
    }
}

/// The error of a request the policy does not apply to.
fn passed_through(error: impl Into<BoxError>) -> Error {
    Error::Inner(error.into())
}
