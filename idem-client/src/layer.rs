//! [`IdempotencyClientLayer`]: the [`RetryPolicy`] as a tower layer for HTTP clients built on
//! hyper and tower (hyper-util's client, any `Service<http::Request<B>>` whose body is `Clone`;
//! not tonic, whose request bodies are streams that cannot be sent twice).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

use crate::attempts::AttemptTimedOut;
use crate::error::{BoxError, Error};
use crate::key::IdempotencyKey;
use crate::policy::{Outcome, RetryPolicy};
use crate::retry::{self, Ended};

/// A tower [`Layer`] for HTTP clients with the behaviour of
/// [`IdempotencyMiddleware`](crate::IdempotencyMiddleware): one `Idempotency-Key` per request
/// (an [`IdempotencyKey`] request extension, else the request's header, else a new UUIDv7; a
/// header that cannot be sent is [`Error::InvalidKey`] and nothing is sent), the
/// same key on every retry, connection errors, timeouts, 409 and the policy's statuses retried
/// with backoff and `Retry-After`, a 422 problem document as [`Error::KeyReused`], and
/// [`IdempotencyKey`] and [`Attempts`](crate::Attempts) in every response's extensions.
///
/// The request body must be `Clone` (`http_body_util::Full<Bytes>`, `String`...): every attempt
/// sends a copy, so a stream, which could be sent only once, does not compile. The inner service
/// must be `Clone` (hyper-util's legacy `Client` is); each attempt waits
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
            )?;
            let attempt = Attempt {
                inner,
                request,
                policy: policy.clone(),
            };
            match retry::send(&policy, &key, true, attempt).await {
                Ended::Response(mut response, attempts) => {
                    response.extensions_mut().insert(key);
                    response.extensions_mut().insert(attempts);
                    Ok(response)
                }
                Ended::KeyReused(_) => Err(Error::KeyReused {
                    key: key.to_string(),
                    detail: None,
                }),
                Ended::Failed(error) => Err(error),
            }
        })
    }
}

/// The attempts of one request through the inner service: each sends a copy of the request,
/// after the service is ready, within the policy's attempt timeout.
struct Attempt<S, B> {
    inner: S,
    request: Request<B>,
    policy: Arc<RetryPolicy>,
}

impl<S, B, ResB> retry::Attempt for Attempt<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Clone + Send,
    ResB: Send,
{
    type Response = Response<ResB>;
    type Error = BoxError;

    fn send(&mut self) -> impl Future<Output = Result<Response<ResB>, BoxError>> + Send + '_ {
        let request = copy(&self.request);
        let limit = self.policy.per_attempt();
        let inner = &mut self.inner;
        async move {
            let call = async {
                let ready = inner.ready().await.map_err(Into::into)?;
                ready.call(request).await.map_err(Into::into)
            };
            match limit {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result,
                    Err(_) => Err(Box::new(AttemptTimedOut(limit)) as BoxError),
                },
                None => call.await,
            }
        }
    }

    fn outcome(result: &Result<Response<ResB>, BoxError>) -> Outcome {
        match result {
            Ok(response) => Outcome::response(response.status(), response.headers()),
            Err(error) => Outcome::error(error.as_ref()),
        }
    }
}

/// The error of a request the policy does not apply to.
fn passed_through(error: impl Into<BoxError>) -> Error {
    Error::Inner(error.into())
}
