//! The service the layer wraps around the inner one: the HTTP side of the claim state machine.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tower::Service;

use super::body::{to_bytes, RequestBody, ResponseBody};
use super::fingerprint;
use super::problem::{Problem, Subject};
use super::stored::StoredResponse;
use super::{Config, IDEMPOTENCY_KEY};
use crate::engine::{unchanged, Call, ErrorPolicy, Interrupted, Replayer};
use crate::error::{BoxError, Error};
use crate::key::StorageKey;

/// The future of [`IdempotencyService`]: the inner service's response, a replay, or a refusal.
pub type ResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) makes of an inner service.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(super) fn new(inner: S, config: Arc<Config>) -> Self {
        IdempotencyService { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB> Service<Request<B>> for IdempotencyService<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Use the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = &self.config;
        let applies = config.methods.contains(req.method())
            && (config.require_key || req.headers().contains_key(IDEMPOTENCY_KEY));
        if !applies {
            let future = inner.call(req.map(RequestBody::streaming));
            return Box::pin(async move { Ok(future.await?.map(ResponseBody::streaming)) });
        }
        Box::pin(handle(config.clone(), inner, req))
    }
}

/// Why a run's response is not stored.
enum NotKept<B: Body, E> {
    /// idem refused or failed (in flight, key reuse, store error, ...).
    Idem(Error),
    /// The inner service failed: the handler started, its outcome is unknown.
    Service(E),
    /// A response to pass through, whose status says nothing was done (408, 429, or a status
    /// `keep_status` refuses): the claim is released.
    Response(Response<ResponseBody<B>>),
    /// A new key from a scope at its limit: the handler did not run, the claim is released.
    /// Retry after this long.
    ScopeFull(Duration),
    /// A response to pass through that cannot be kept (a 5xx, a stream, a body over the limit,
    /// failed midway or with trailers): the handler's outcome is unknown, handled per the
    /// layer's [`OnUnknown`](crate::engine::OnUnknown).
    Unknown(Response<ResponseBody<B>>),
}

impl<B: Body, E> NotKept<B, E> {
    fn is_unknown(&self) -> bool {
        matches!(self, NotKept::Service(_) | NotKept::Unknown(_))
    }
}

impl<B: Body, E> From<Error> for NotKept<B, E> {
    fn from(e: Error) -> Self {
        NotKept::Idem(e)
    }
}

fn refuse<B: Body>(problem: Problem, detail: &str) -> Response<ResponseBody<B>> {
    problem.response(detail).map(ResponseBody::full)
}

async fn handle<S, B, ResB>(
    config: Arc<Config>,
    inner: S,
    req: Request<B>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send,
{
    if let Some(mistake) = &config.mistake {
        tracing::error!(target: "idem", mistake = &**mistake, "http: the layer is misconfigured; request refused");
        let (problem, detail) =
            Problem::from_error(&Error::config(mistake.to_string()), Subject::Header);
        return Ok(refuse(problem, &detail));
    }
    let (parts, body) = req.into_parts();
    let Some(scope) = config.scope.of(&parts) else {
        tracing::debug!(target: "idem", method = %parts.method, uri = %parts.uri, "http: client not identified");
        return Ok(refuse(
            Problem::ClientUnidentified,
            "This endpoint keeps the Idempotency-Keys of each client apart and could not tell which client sent this request: send the credentials it expects.",
        ));
    };
    let key = match idempotency_key(&parts.headers) {
        Ok(Some(key)) => key,
        Ok(None) => {
            tracing::debug!(target: "idem", method = %parts.method, uri = %parts.uri, "http: Idempotency-Key missing");
            let detail = format!(
                "{} requests to this endpoint need an Idempotency-Key header with a unique value, such as a UUID.",
                parts.method
            );
            return Ok(refuse(Problem::KeyMissing, &detail));
        }
        Err(reason) => {
            tracing::debug!(target: "idem", method = %parts.method, uri = %parts.uri, reason, "http: invalid Idempotency-Key");
            return Ok(refuse(
                Problem::KeyInvalid,
                &format!("Invalid Idempotency-Key: {reason}."),
            ));
        }
    };
    let storage_key = match StorageKey::derive(&*scope, &key[..]) {
        Ok(k) => k,
        Err(e) => {
            let (problem, detail) = Problem::from_error(&e, Subject::Header);
            tracing::debug!(target: "idem", method = %parts.method, uri = %parts.uri, error = %e, "http: invalid Idempotency-Key");
            return Ok(refuse(problem, &detail));
        }
    };

    let limit = config.max_body_bytes;
    let too_large = || {
        tracing::debug!(target: "idem", key = %storage_key, limit, "http: request body over the limit");
        let detail = format!("The request body is larger than the limit of {limit} bytes.");
        refuse(Problem::BodyTooLarge, &detail)
    };
    if body.size_hint().lower() > limit as u64 {
        return Ok(too_large());
    }
    let (data, trailers) = match read_request(body, limit).await {
        Ok(read) => read,
        Err(ReadError::TooLarge) => return Ok(too_large()),
        Err(ReadError::Failed(e)) => {
            let e: BoxError = e.into();
            tracing::debug!(target: "idem", key = %storage_key, error = %e, "http: request body failed");
            return Ok(refuse(
                Problem::BodyUnreadable,
                "The request body could not be read completely.",
            ));
        }
    };
    let fingerprint = fingerprint::of_request(&parts, &data);
    let scope = scope.into_owned();
    let request = Request::from_parts(parts, RequestBody::buffered(data, trailers));

    // The limits on bodies bound the record; the engine's own record limit must not drop a
    // response whose handler already ran.
    let mut call = Call::new(storage_key.clone())
        .fingerprint(Some(fingerprint))
        .ttl(config.ttl)
        .lease(config.lease)
        .on_unknown(config.on_unknown)
        .max_record_bytes(usize::MAX);
    if let Some(window) = config.recovery {
        call = call.recovery(window);
    }
    // The layer's store is already shared: no second `Arc` around it.
    call.store = Some(config.store.clone());
    // A stored response's encoding round-trips by construction (`http::stored`'s tests): no
    // decode-back check of each response.
    call.check_decodes = false;
    let errors = ErrorPolicy::never().unknown_when(NotKept::is_unknown);
    // The handler runs on a task of its own (the engine's, counted for `drain`): if the client
    // goes away, the handler still runs to its end and its response is stored for the retry.
    let joined = call
        .run_spawned(
            errors,
            run(inner, request, config.clone(), storage_key.clone(), scope),
            unchanged::<StoredResponse>,
            // Replays clone the response this process decoded last time (bodies are shared).
            Some(Replayer::cloning()),
        )
        .await;
    let outcome: Result<StoredResponse, NotKept<ResB, S::Error>> = match joined {
        Ok(outcome) => outcome,
        Err(Interrupted::Panicked(_)) => {
            tracing::error!(target: "idem", key = %storage_key, "http: the handler panicked");
            let detail = "The request failed while it was being processed; its effect is unknown.";
            return Ok(refuse(Problem::OutcomeUnknown, detail));
        }
    };

    match outcome {
        Ok(stored) => {
            let fresh = stored.is_fresh();
            match stored.into_response() {
                Ok(response) => {
                    if !fresh {
                        tracing::debug!(target: "idem", key = %storage_key, status = response.status().as_u16(), "http: replayed");
                    }
                    Ok(response.map(ResponseBody::full))
                }
                Err(e) => {
                    tracing::error!(target: "idem", key = %storage_key, error = %e, "http: stored response is unreadable");
                    let (problem, detail) = Problem::from_error(&e, Subject::Header);
                    Ok(refuse(problem, &detail))
                }
            }
        }
        Err(NotKept::Response(response) | NotKept::Unknown(response)) => Ok(response),
        Err(NotKept::Service(e)) => Err(e),
        Err(NotKept::ScopeFull(wait)) => {
            let detail = "The responses kept for this client reached the limit of this endpoint: a request with a new Idempotency-Key is refused until one of them expires (see Retry-After). Retries with earlier keys are still answered.";
            let mut response = refuse(Problem::ScopeFull, detail);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
            Ok(response)
        }
        Err(NotKept::Idem(e)) => {
            let (problem, detail) = Problem::from_error(&e, Subject::Header);
            if problem.status().is_server_error() {
                tracing::error!(target: "idem", key = %storage_key, error = %e, "http: request refused");
            } else {
                tracing::debug!(target: "idem", key = %storage_key, error = %e, status = problem.status().as_u16(), "http: request refused");
            }
            Ok(refuse(problem, &detail))
        }
    }
}

/// The body the engine runs under the claim: call the inner service and capture its response, or
/// say why it is not kept (then the engine releases the claim, or records an unknown outcome).
async fn run<S, B, ResB>(
    mut inner: S,
    request: Request<RequestBody<B>>,
    config: Arc<Config>,
    key: StorageKey,
    scope: String,
) -> Result<StoredResponse, NotKept<ResB, S::Error>>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>>,
    ResB: Body,
{
    let key = &key;
    // Only a request with a new key gets here (replays and conflicts were answered from the
    // claim): it needs a place in its scope before its handler runs.
    let admitted = match &config.limits {
        None => None,
        Some(limits) => match limits.admit(&scope) {
            Ok(admitted) => Some(admitted),
            Err(wait) => {
                tracing::debug!(target: "idem", key = %key, ?wait, "http: scope at its limit of kept responses; refused");
                return Err(NotKept::ScopeFull(wait));
            }
        },
    };
    let response = inner.call(request).await.map_err(NotKept::Service)?;
    let status = response.status().as_u16();
    if !config.keep.keep(response.status()) {
        return Err(match not_kept(&response) {
            Unkept::Unknown(why) => {
                tracing::debug!(target: "idem", key = %key, status, why, "http: not kept; outcome unknown");
                NotKept::Unknown(response.map(ResponseBody::streaming))
            }
            Unkept::NothingDone(why) => {
                tracing::debug!(target: "idem", key = %key, status, why, "http: not kept; released");
                NotKept::Response(response.map(ResponseBody::streaming))
            }
        });
    }
    let limit = config.max_body_bytes;
    let (head, body) = response.into_parts();
    let streamed = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streamed || body.size_hint().lower() > limit as u64 {
        tracing::debug!(target: "idem", key = %key, status, limit, streamed, "http: streamed or over the limit, passed through as it comes, not kept; outcome unknown");
        return Err(NotKept::Unknown(Response::from_parts(
            head,
            ResponseBody::streaming(body),
        )));
    }
    let mut body = Box::pin(body);
    let mut frames = VecDeque::new();
    let mut size = 0usize;
    let pass = |head, frames, error, body| {
        NotKept::Unknown(Response::from_parts(
            head,
            ResponseBody::resumed(frames, error, body),
        ))
    };
    loop {
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let data = to_bytes(data);
                    size += data.len();
                    frames.push_back(Frame::data(data));
                    if size > limit {
                        tracing::debug!(target: "idem", key = %key, status, limit, "http: response body over the limit, not kept; outcome unknown");
                        return Err(pass(head, frames, None, body));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        frames.push_back(Frame::trailers(trailers));
                    }
                    tracing::debug!(target: "idem", key = %key, status, "http: response has trailers, not kept; outcome unknown");
                    return Err(pass(head, frames, None, body));
                }
            },
            Some(Err(e)) => {
                tracing::debug!(target: "idem", key = %key, status, "http: response body failed, not kept; outcome unknown");
                return Err(pass(head, frames, Some(e), body));
            }
        }
    }
    let data = concat(frames.into_iter().filter_map(|f| f.into_data().ok()));
    let stored = StoredResponse::capture(head, data, &config.replay_headers);
    if let Some(admitted) = admitted {
        admitted.kept(stored.size(), config.ttl);
    }
    Ok(stored)
}

/// What a response that is not kept says about its handler's work.
enum Unkept {
    /// It may have been done, in part or whole: an unknown outcome.
    Unknown(&'static str),
    /// The handler says nothing was done: the claim is released, and a retry runs it.
    NothingDone(&'static str),
}

/// Reads a response that is not kept (see the layer's docs, "Which answers release the key"):
/// a timeout (408, 504) may have cancelled the handler midway, so its outcome is unknown,
/// whoever produced it; a 503 or any response with `Retry-After` is the handler saying "not
/// now, nothing was done"; any other 5xx failed somewhere, unknown; any other status below
/// 500 is an answer the handler chose.
fn not_kept<B>(response: &Response<B>) -> Unkept {
    let status = response.status();
    if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::GATEWAY_TIMEOUT {
        Unkept::Unknown("a timeout may have cancelled the handler midway")
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        Unkept::NothingDone("503: the handler did not take the request")
    } else if response.headers().contains_key(RETRY_AFTER) {
        Unkept::NothingDone("Retry-After: the handler asks for a retry later")
    } else if status.is_server_error() {
        Unkept::Unknown("a server error: the handler may have failed midway")
    } else {
        Unkept::NothingDone("a status the layer does not keep")
    }
}

enum ReadError<E> {
    TooLarge,
    Failed(E),
}

/// Reads a request body of at most `limit` bytes, and its trailers.
async fn read_request<B: Body>(
    body: B,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), ReadError<B::Error>> {
    let mut body = pin!(body);
    let mut chunks = Vec::new();
    let mut size = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame.map_err(ReadError::Failed)?.into_data() {
            Ok(data) => {
                let data = to_bytes(data);
                size += data.len();
                if size > limit {
                    return Err(ReadError::TooLarge);
                }
                chunks.push(data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
            }
        }
    }
    Ok((concat(chunks), trailers))
}

/// Joins chunks, without copying when there is only one.
fn concat(chunks: impl IntoIterator<Item = Bytes>) -> Bytes {
    let mut chunks = chunks.into_iter();
    let Some(first) = chunks.next() else {
        return Bytes::new();
    };
    let Some(second) = chunks.next() else {
        return first;
    };
    let mut out = BytesMut::from(&first[..]);
    out.extend_from_slice(&second);
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    out.freeze()
}

/// The key in the request's `Idempotency-Key` header: `Ok(None)` if there is none. The value is
/// taken as is (`order-42`, Stripe's form) or, if quoted, as the draft's structured-field
/// string (`"order-42"`), so both forms name the same key.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<Vec<u8>>, &'static str> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("the header is given more than once");
    }
    match value.as_bytes() {
        [b'"', quoted @ .., b'"'] => unquote(quoted).map(Some),
        raw => Ok(Some(raw.to_vec())),
    }
}

fn unquote(quoted: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(c),
                _ => return Err("a quoted key may escape only `\"` and `\\`"),
            },
            b'"' => return Err("a quoted key contains an unescaped `\"`"),
            _ => out.push(b),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key_of(values: &[&'static str]) -> Result<Option<Vec<u8>>, &'static str> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static(v));
        }
        idempotency_key(&headers)
    }

    #[test]
    fn bare_and_quoted_keys_are_the_same_key() {
        assert_eq!(key_of(&[]), Ok(None));
        assert_eq!(key_of(&["order-42"]), Ok(Some(b"order-42".to_vec())));
        assert_eq!(key_of(&["\"order-42\""]), Ok(Some(b"order-42".to_vec())));
        assert_eq!(key_of(&[r#""a\"b\\c""#]), Ok(Some(br#"a"b\c"#.to_vec())));
        assert_eq!(
            key_of(&["\"\""]),
            Ok(Some(Vec::new())),
            "empty: refused later by StorageKey::derive"
        );
        assert_eq!(
            key_of(&["\""]),
            Ok(Some(b"\"".to_vec())),
            "a lone quote is a bare key"
        );
    }

    #[test]
    fn malformed_and_repeated_keys_are_refused() {
        assert!(key_of(&["a", "b"]).is_err());
        assert!(key_of(&[r#""a"b""#]).is_err());
        assert!(key_of(&[r#""a\nb""#]).is_err());
    }

    #[test]
    fn concat_joins_without_copying_single_chunks() {
        let one = Bytes::from_static(b"abc");
        assert_eq!(concat([one.clone()]).as_ptr(), one.as_ptr());
        assert_eq!(
            concat([
                Bytes::from_static(b"a"),
                Bytes::from_static(b"b"),
                Bytes::from_static(b"c")
            ]),
            "abc"
        );
        assert_eq!(concat(Vec::<Bytes>::new()), "");
    }
}
