//! Idempotent HTTP endpoints: [`IdempotencyLayer`], a tower [`Layer`] for axum, hyper and any
//! tower service, following the IETF "Idempotency-Key HTTP Header Field" draft and Stripe.
//!
//! A client sends `Idempotency-Key: <unique value>` with a POST or PATCH. The first request with
//! a key runs the handler; its response (status, body, and the headers that matter) is stored
//! and replayed, byte for byte and with `Idempotent-Replayed: true`, to every retry with the same
//! key until the ttl runs out. The flow is the runtime's state machine ([`crate::engine`]): claim
//! the key, then replay, refuse, or run the inner service and store its response (or release the
//! claim so that a retry runs again).
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! # use idem_runtime as idempotency;
//! use idempotency::{http::{IdempotencyLayer, RequestBody}, MemoryStore};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // One scope for every client, on purpose: this example has a single client.
//! let layer = IdempotencyLayer::shared(MemoryStore::new(), "example");
//! let charge = layer.layer(service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
//!     let id = format!("pay_{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos());
//!     let res = Response::builder().status(StatusCode::CREATED).body(Full::new(Bytes::from(id)));
//!     Ok::<_, Infallible>(res.unwrap())
//! }));
//! let request = || {
//!     Request::post("/payments")
//!         .header("idempotency-key", "order-42")
//!         .body(Full::new(Bytes::from(r#"{"amount":500}"#)))
//!         .unwrap()
//! };
//! let first = charge.clone().oneshot(request()).await.unwrap();
//! let retry = charge.clone().oneshot(request()).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! let first = first.into_body().collect().await.unwrap().to_bytes();
//! let retry = retry.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(first, retry); // the handler ran once
//! # }
//! ```
//!
//! # Behaviour
//!
//! | request | response |
//! |---|---|
//! | method not in [`methods`](IdempotencyLayer::methods) (default POST, PATCH) | passed through untouched |
//! | no `Idempotency-Key` | 400, or passed through with [`require_key(false)`](IdempotencyLayer::require_key) |
//! | [`per_client`](IdempotencyLayer::per_client) and the principal function finds no client | 401, the handler does not run |
//! | key empty, longer than 255 bytes, or the header given twice | 400 |
//! | body over [`max_body_bytes`](IdempotencyLayer::max_body_bytes) (default 1 MiB) | 413, the handler does not run |
//! | first request with a key | runs the handler (to its end, even if the client goes away); its response is kept if its status is kept (default: all but 5xx, 408 and 429) and its body is within the limit |
//! | same key, same request, completed | the kept response, with `Idempotent-Replayed: true` |
//! | same key while the first request runs | 409 with `Retry-After: 1` |
//! | same key, different method, path, query or body (JSON bodies compared by their [canonical form](#json-bodies)) | 422 |
//! | new key, and the scope holds its [limit](IdempotencyLayer::limit_per_scope) of kept responses | 429 with `Retry-After`, the handler does not run |
//! | the store fails | 503 with `Retry-After: 1`; the handler does not run (fail closed) |
//!
//! The key may be sent bare (`Idempotency-Key: order-42`, as Stripe does) or as the draft's
//! structured-field string (`Idempotency-Key: "order-42"`); both name the same key.
//!
//! # A handler that started is never run again by accident
//!
//! - **The client goes away**: the handler runs on a task of its own, so it runs to its end
//!   (its lease renewed on another task) and its response is stored; a retry gets 409 while it
//!   runs and the replay afterwards. At shutdown, after the server stopped taking requests,
//!   call [`drain`](crate::engine::drain) (or [`IdempotencyLayer::drain`], the same): running
//!   handlers finish, and those still running at its timeout are cut off and their unknown
//!   outcome recorded before it returns. An exit without a drain is a crash: a handler still
//!   running keeps its claim until its lease lapses, and a retry then runs it again.
//! - **The outcome is unknown**: a 5xx other than 503 without `Retry-After`, a 408 or 504 (a
//!   timeout, which may have cancelled the handler midway: see below), a handler that panicked
//!   or failed, a response streamed (`text/event-stream`, passed through as it comes, never
//!   buffered), over the body limit, failing midway or with trailers. The first client gets the
//!   response as it is. Under the default [`OnUnknown::Refuse`](crate::engine::OnUnknown) (at
//!   most once) the key then keeps a record of the unknown outcome and retries get
//!   `500 #outcome-unknown` until the [`recovery`](IdempotencyLayer::recovery) window passes
//!   (1 hour by default); under [`OnUnknown::Rerun`](crate::engine::OnUnknown) (at least once)
//!   the claim is released and a retry runs the handler again.
//! - **Nothing was done**: a 503, any response with `Retry-After`, a 429 or another status
//!   below 500 that [`keep_status`](IdempotencyLayer::keep_status) refuses releases the claim at
//!   once, so a retry runs the handler. A handler that answers 503 or sets `Retry-After` says
//!   "not now": it must not have done the work.
//!
//! # Which answers release the key, against Stripe and the others
//!
//! | answer | this layer | Stripe | keyed-retry seeds (Powertools, axum-idempotent) |
//! |---|---|---|---|
//! | 2xx, 4xx the handler chose (not 408/429) | kept and replayed | kept | kept |
//! | 503, or any 4xx/5xx with `Retry-After` | **released**: retryable at once | kept (a replayed 503 for 24 h) | released |
//! | 500, 502 (the handler failed somewhere) | unknown: refused for the recovery window (1 h) | kept and replayed for 24 h | released (the body may run twice) |
//! | 408, 504 (a timeout may have cancelled the handler) | unknown | kept | released |
//! | panic, dropped connection, cut off by a drain | unknown | kept as a 500 | released, or stuck until the lease |
//!
//! Why: a 503 and `Retry-After` are the handler's own word that the request was not taken, and
//! HTTP clients (this crate's `client` included) retry them: keeping them (Stripe) turns a
//! passing outage into a key stuck for a day, releasing them costs nothing. A 500 says the
//! handler failed at a point we cannot see, possibly after the charge: releasing it (the seeds)
//! lets a retry charge twice, while Stripe's day-long replay makes a user wait a day for a
//! failure an operator can settle in minutes; an hour refused (the `unknown_outcome` event
//! alerts) is the middle way. A timeout is a 500 whose cause we know: the handler was cut.
//!
//! # Where a timeout layer goes
//!
//! Put a timeout (tower-http's `TimeoutLayer`, tower's `Timeout`) **outside** this layer
//! (`.layer(timeout).layer(idem)` in axum's order, which runs the timeout first): when it fires,
//! it drops this layer's future, the handler runs on by itself to its end and its response is
//! kept, so the client's retry gets a 409 while it runs and the replay after. Inside this layer
//! (between it and the handler), a timeout cancels the handler midway and answers 408 (or
//! 504): that is an unknown outcome here (never "nothing was done"), so the retry is refused
//! rather than run again; `tests/http_timeout.rs` counts handler starts both ways.
//! - Inside the handler, [`crate::context::token`] gives the claim's fencing token, for a
//!   database write that must refuse a stale holder.

//! # Error responses
//!
//! Every refusal is an RFC 9457 `application/problem+json` body with `type`, `title`, `status` and
//! `detail`. None of them says anything about the other request that used the key.
//!
//! | status | `type` ends in | when |
//! |---|---|---|
//! | 400 | <span id="key-missing">`#key-missing`</span> | the key is required and missing |
//! | 400 | <span id="key-invalid">`#key-invalid`</span> | the key is empty, too long, or given twice |
//! | 401 | <span id="client-unidentified">`#client-unidentified`</span> | [`per_client`](IdempotencyLayer::per_client) could not tell which client sent the request |
//! | 400 | <span id="body-unreadable">`#body-unreadable`</span> | the request body could not be read |
//! | 409 | <span id="request-in-progress">`#request-in-progress`</span> | a request with this key is being processed |
//! | 409 | <span id="claim-lost">`#claim-lost`</span> | this request ran past its lease and another request with the key took over; retry to get that one's response |
//! | 413 | <span id="body-too-large">`#body-too-large`</span> | the request body is over the limit |
//! | 422 | <span id="key-reused">`#key-reused`</span> | the key was used for a different request |
//! | 429 | <span id="too-many-kept-responses">`#too-many-kept-responses`</span> | a new key, and the client's scope holds its [limit](IdempotencyLayer::limit_per_scope) of kept responses; `Retry-After` says when one expires |
//! | 500 | <span id="record-unreadable">`#record-unreadable`</span> | the stored response could not be decoded |
//! | 500 | <span id="outcome-unknown">`#outcome-unknown`</span> | an earlier request with this key started but its outcome is unknown (see above) |
//! | 500 | <span id="idempotency-failed">`#idempotency-failed`</span> | a configuration mistake (a lease below [`MIN_LEASE`](crate::engine::MIN_LEASE)) or a value that cannot be encoded |
//! | 503 | <span id="store-unavailable">`#store-unavailable`</span> | the idempotency store failed |
//!
//! # Scopes: per client, or shared on purpose
//!
//! Records are stored under `StorageKey::derive(scope, key)`, and a layer is built with the
//! scope of its requests; there is no default.
//!
//! - [`IdempotencyLayer::per_client(store, principal)`](IdempotencyLayer::per_client): the scope
//!   is the client's principal, a function of the request (the authenticated user, an API key,
//!   a tenant), so that two clients who pick the same key never see each other's responses
//!   (as in the IETF draft and at Stripe). When the function returns `None` (or an empty
//!   string) the request is refused with `401 #client-unidentified` and the handler does not
//!   run. Never map an unknown client to a constant such as `"anonymous"`: every such client
//!   would share that scope, and one would receive another's response.
//! - [`IdempotencyLayer::shared(store, name)`](IdempotencyLayer::shared): one scope named
//!   `name` for every request. **Every client sees every other client's responses for the same
//!   key and request**: only for a service with one client, or whose responses are public.
//!
//! With axum, add the authentication layer *after* this one (`.layer(idem).layer(auth)`), so
//! that it runs first (refusing unauthenticated requests with its own 401 and its
//! `WWW-Authenticate` header) and its request extensions are visible to the principal function.
//! With `Router::route_layer` instead of `Router::layer`, requests that match no route get
//! axum's 404 rather than the layer's 400 for a missing key.
//!
//! ```
//! # use idem_runtime as idempotency;
//! use idempotency::{http::IdempotencyLayer, MemoryStore};
//!
//! // The client is its `Authorization` header: a request without one, or with one that is not
//! // visible ASCII, is refused with 401 (it is not put in a scope shared with others).
//! let layer = IdempotencyLayer::per_client(MemoryStore::new(), |req| {
//!     let value = req.headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
//!     (!value.is_empty()).then(|| value.to_owned())
//! });
//! ```
//!
//! A layer cannot be built without choosing (`new(store)` and `.scope(..)` are gone; calling
//! `new` is a compile error that says what to write):
//!
//! ```compile_fail
//! # use idem_runtime as idempotency;
//! use idempotency::{http::IdempotencyLayer, MemoryStore};
//! let layer = IdempotencyLayer::new(MemoryStore::new());
//! ```
//!
//! # Limits per scope
//!
//! [`limit_per_scope(records, bytes)`](IdempotencyLayer::limit_per_scope) keeps one client
//! from filling the store for all: a request with a new key, from a scope that already holds
//! `records` kept responses or `bytes` of them, is refused with `429 #too-many-kept-responses`
//! and a `Retry-After` of the seconds until its oldest response expires; the handler does not
//! run. Retries of the keys it holds are still answered (replayed, or 409 while they run).
//!
//! The tally is kept **in this process**, of the responses this layer and its clones kept,
//! each counted until its ttl runs out: the store cannot count per scope, because it sees only
//! storage keys, which are hashes of scope and key. So with N instances behind a load balancer
//! a scope may hold up to N times the limit, and a restart forgets the tally (the records stay
//! in the store until their ttl). A response counts by the size of its body and replayed
//! headers. Requests with new keys that are running count against the record limit, so that
//! concurrent requests cannot exceed it together; the byte limit may be exceeded by their
//! responses (each at most [`max_body_bytes`](IdempotencyLayer::max_body_bytes)).
//!
//! # JSON bodies
//!
//! The request fingerprint (what must match when a key is reused) is the method, the path and
//! query, and the body. A body whose `Content-Type` is `application/json` or `*/*+json` (such
//! as `application/merge-patch+json`; parameters such as `charset` ignored) counts by its
//! canonical JSON, the form the attribute's fingerprints use: object members sorted by key, no
//! whitespace, strings re-escaped as serde_json escapes them. A client that rebuilds its body on
//! retry (another instance, a map with unstable order, another serializer) sends the same
//! request. Numbers are compared as written (`1`, `1.0` and `1e0` differ: parsed as floats,
//! distinct big integers or decimals would merge), as are members with the same key and their
//! order. A body under a JSON content type that is not valid JSON (or nests deeper than 128)
//! counts by its bytes, as do the bodies of every other content type: byte for byte. So the
//! same bytes sent once as JSON and once under another type (or none) are the same request only
//! if they are already in canonical form; a client keeps its `Content-Type` across retries.
//!
//! # axum handlers calling `#[idempotent]` functions
//!
//! With the feature `axum`, [`Error`](crate::Error) implements axum's `IntoResponse` with the
//! mapping of the table above, so a handler can use `?` on the result of an `#[idempotent]`
//! function whose error type is (or converts into) a type that does:
//!
//! | error | response |
//! |---|---|
//! | `InFlight`, `WaitTimeout` | 409 `#request-in-progress`, `Retry-After: 1` |
//! | `LeaseLost` | 409 `#claim-lost`, `Retry-After: 1` |
//! | `KeyReuse` | 422 `#key-reused` |
//! | `InvalidKey` | 400 `#key-invalid` (the key was derived from the request) |
//! | `Store`, `StoreFull` | 503 `#store-unavailable`, `Retry-After: 1` (no backend detail) |
//! | `Corrupt`, `TypeMismatch` | 500 `#record-unreadable` |
//! | `OutcomeUnknown` | 500 `#outcome-unknown` (retrying does not help: resolve the record) |
//! | `Config`, `Encode`, `TooLarge` | 500 `#idempotency-failed` |
//!
//! The body is the same `application/problem+json` document, its detail naming the
//! "idempotency key" and the "call" rather than the header. The storage key is not in it (a
//! hash of scope and key, of use to an operator, not to the client): it is in the `tracing`
//! event (target `idem`) logged for the error, at `error` level for a 5xx.
//!
//! ```ignore
//! use axum::{extract::Path, Json};
//! use idempotency::idempotent;
//!
//! #[idempotent(key = order.clone())]
//! async fn charge(order: String) -> Result<Receipt, idempotency::Error> { /* ... */ }
//!
//! async fn pay(Path(order): Path<String>) -> Result<Json<Receipt>, idempotency::Error> {
//!     Ok(Json(charge(order).await?)) // a call in flight with this key: 409 + Retry-After
//! }
//! ```

mod body;
mod fingerprint;
mod limits;
mod problem;
mod scope;
mod service;
mod stored;

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, CONTENT_ENCODING, CONTENT_TYPE};
use http::{request, Method, StatusCode};
use tower::Layer;

use crate::engine::{DrainReport, IntoDuration, OnUnknown, DEFAULT_LEASE, DEFAULT_TTL};
use crate::store::{IntoStore, Store};
use limits::ScopeLimits;
use scope::Scoping;

pub use body::{RequestBody, ResponseBody};
pub use service::{IdempotencyService, ResponseFuture};

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header that marks a replay: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The default limit on request and kept response bodies: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Which responses are kept and replayed: a function of the status, or a range of status codes.
///
/// Implemented for `Fn(StatusCode) -> bool` closures and functions, and for `Range<u16>` and
/// `RangeInclusive<u16>` (`200..500`, `200..=299`).
pub trait KeepStatus: Send + Sync + 'static {
    /// Whether a response with `status` is kept.
    fn keep(&self, status: StatusCode) -> bool;
}

impl<F: Fn(StatusCode) -> bool + Send + Sync + 'static> KeepStatus for F {
    fn keep(&self, status: StatusCode) -> bool {
        self(status)
    }
}

impl KeepStatus for Range<u16> {
    fn keep(&self, status: StatusCode) -> bool {
        self.contains(&status.as_u16())
    }
}

impl KeepStatus for RangeInclusive<u16> {
    fn keep(&self, status: StatusCode) -> bool {
        self.contains(&status.as_u16())
    }
}

/// The default of [`IdempotencyLayer::keep_status`]: every status but 5xx, 408 Request Timeout
/// and 429 Too Many Requests. Of those not kept, 503, 429 and any response with `Retry-After`
/// release the key (nothing was done); 408, 504 and the other 5xx are unknown outcomes (see
/// [`IdempotencyLayer::on_unknown`] and the [module docs](self#which-answers-release-the-key-against-stripe-and-the-others)).
pub fn keep_by_default(status: StatusCode) -> bool {
    !status.is_server_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

#[derive(Clone)]
struct Config {
    store: Arc<dyn Store>,
    methods: Vec<Method>,
    require_key: bool,
    keep: Arc<dyn KeepStatus>,
    replay_headers: Vec<HeaderName>,
    scope: Scoping,
    limits: Option<Arc<ScopeLimits>>,
    max_body_bytes: usize,
    ttl: Duration,
    lease: Duration,
    on_unknown: OnUnknown,
    recovery: Option<Duration>,
    /// The first mistake made building the layer (a setter given a value it cannot use): every
    /// request the layer applies to is then refused with `500 #idempotency-failed`, and the
    /// handler does not run. Setters never panic.
    mistake: Option<Arc<str>>,
}

/// A tower [`Layer`] that makes POST and PATCH endpoints idempotent by their `Idempotency-Key`
/// header. See the [module documentation](self) for the behaviour and the error responses.
///
/// Works with axum's `Router::layer` and with any tower service taking
/// `Request<RequestBody<B>>` and giving `Response<ResB>`, served by hyper or anything else.
/// Any [`Store`] works ([`IntoStore`]: a store by value, `&store` of a
/// built-in one, an `Arc`, or the `Arc<dyn Store>` of [`connect`](crate::store::connect)); with
/// a shared one (Redis, PostgreSQL) every instance of the service replays the same responses.
///
/// # Mistakes
///
/// Setters take values as they come (durations as a `Duration` or seconds, like
/// [`Call`](crate::Call)'s) and never panic. A value the layer cannot use (an empty
/// [`shared`](Self::shared) name, an invalid [`replay_headers`](Self::replay_headers) name, a
/// [`limit_per_scope`](Self::limit_per_scope) of 0, a [`lease`](Self::lease) under
/// [`MIN_LEASE`](crate::engine::MIN_LEASE)) is logged as an error when the layer is built, and
/// every request the layer applies to is refused with `500 #idempotency-failed` (its `error`
/// event, target `idem`, names the mistake; the client is not told), and the handler does not
/// run.
///
/// With axum 0.8 (the same code is compiled in `examples/http_server.rs`):
///
/// ```ignore
/// use axum::{routing::post, Json, Router, http::StatusCode};
/// use idempotency::http::IdempotencyLayer;
///
/// async fn create_payment(Json(req): Json<serde_json::Value>) -> (StatusCode, Json<serde_json::Value>) {
///     (StatusCode::CREATED, Json(serde_json::json!({ "id": "pay_123", "amount": req["amount"] })))
/// }
///
/// let store = idempotency::connect("redis://127.0.0.1:6379").await?;
/// let app = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(
///         // One namespace per client (its `Authorization` header): clients never see each
///         // other's responses; a request whose client is unknown is refused with 401.
///         IdempotencyLayer::per_client(store, |req| {
///             let value = req.headers.get("authorization")?.to_str().ok()?;
///             (!value.is_empty()).then(|| value.to_owned())
///         })
///         .replay_headers(["location"])
///         .limit_per_scope(10_000, 64 << 20)
///         .ttl(std::time::Duration::from_secs(24 * 3600)),
///     );
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("store", &c.store.backend())
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("replay_headers", &c.replay_headers)
            .field("scope", &c.scope)
            .field("limit_per_scope", &c.limits.as_ref().map(|l| l.limits()))
            .field("max_body_bytes", &c.max_body_bytes)
            .field("ttl", &c.ttl)
            .field("lease", &c.lease)
            .field("on_unknown", &c.on_unknown)
            .field("recovery", &c.recovery)
            .finish_non_exhaustive()
    }
}

/// The bound of the removed `IdempotencyLayer::new`, implemented by no type: calling `new`
/// fails to compile with this message.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`IdempotencyLayer::new(store)` is gone: choose how requests are scoped",
    label = "a layer built from a store alone would let one client receive another's responses",
    note = "write `IdempotencyLayer::per_client(store, |parts| /* the client's principal, None to refuse */)`",
    note = "or, for one scope shared on purpose by every client, `IdempotencyLayer::shared(store, \"public-api\")`"
)]
pub trait ChooseHowRequestsAreScoped {}

impl IdempotencyLayer {
    /// A layer keeping its records in `store` (`MemoryStore`, `Arc<dyn Store>` from
    /// [`connect`](crate::store::connect) or [`default_store`](crate::store::default_store), ...),
    /// each client's keys in a scope of their own: `principal` names the client of a request
    /// (the authenticated user, an API key, a tenant). Two clients who send the same key never
    /// see each other's responses.
    ///
    /// When `principal` returns `None` (or an empty string, or one with a NUL byte) the request
    /// is refused with `401 #client-unidentified` and the handler does not run; return `None`
    /// for every client you cannot tell apart, never a shared placeholder such as
    /// `"anonymous"` (its clients would receive each other's responses). A request the layer
    /// does not apply to (another method, or no key with [`require_key(false)`](Self::require_key))
    /// passes through without a principal.
    ///
    /// Defaults: POST and PATCH, key required, every status but 5xx/408/429 kept,
    /// `Content-Type` and `Content-Encoding` replayed, 1 MiB body limit, 24h ttl, 30s lease, no
    /// [limit per scope](Self::limit_per_scope).
    pub fn per_client<F>(store: impl IntoStore, principal: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self::from_parts(store.into_store(), Scoping::PerClient(Arc::new(principal)))
    }

    /// A layer keeping its records in `store` in one scope named `name`, deliberately shared
    /// by every client: **every client sees every other client's responses for the same key**
    /// (and the same request). For a service with a single client, or whose responses are
    /// public; otherwise use [`per_client`](Self::per_client). The defaults are those of
    /// `per_client`.
    ///
    /// The name is part of every storage key: two layers on one store with the same name (or
    /// one whose name is a principal of the other) share records. An empty name, or one with a
    /// NUL byte, is a mistake: the layer then refuses every request it applies to (see
    /// [Mistakes](#mistakes)).
    pub fn shared(store: impl IntoStore, name: impl Into<String>) -> Self {
        let name = name.into();
        match Scoping::shared(name.clone()) {
            Ok(scoping) => Self::from_parts(store.into_store(), scoping),
            Err(mistake) => {
                Self::from_parts(store.into_store(), Scoping::Shared(name.into())).mistaken(mistake)
            }
        }
    }

    /// Gone: a layer built from a store alone put every client in one scope, where a client
    /// that sent another's key received the other's response. Kept only so that code calling
    /// it gets a compile error that says what to write instead ([`per_client`](Self::per_client)
    /// or [`shared`](Self::shared)); no type satisfies its bound.
    #[doc(hidden)]
    pub fn new<S: ChooseHowRequestsAreScoped>(store: S) -> Self {
        let _ = store;
        unreachable!("no type implements ChooseHowRequestsAreScoped")
    }

    fn from_parts(store: Arc<dyn Store>, scope: Scoping) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store,
                methods: vec![Method::POST, Method::PATCH],
                require_key: true,
                keep: Arc::new(keep_by_default),
                replay_headers: vec![CONTENT_TYPE, CONTENT_ENCODING],
                scope,
                limits: None,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                ttl: DEFAULT_TTL,
                lease: DEFAULT_LEASE,
                on_unknown: OnUnknown::Refuse,
                recovery: None,
                mistake: None,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// Keeps the first mistake made building the layer.
    fn mistaken(self, mistake: String) -> Self {
        tracing::error!(target: "idem", mistake, "IdempotencyLayer: refusing every request until fixed");
        self.with(|c| {
            c.mistake.get_or_insert_with(|| mistake.into());
        })
    }

    /// The methods the layer applies to (default POST and PATCH); requests with other methods
    /// pass through untouched, whatever their headers.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Whether a request without `Idempotency-Key` is refused with 400 (`true`, the default) or
    /// passed through to the inner service without idempotency (`false`).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|c| c.require_key = required)
    }

    /// Which responses are kept and replayed: a function of the status or a range
    /// (`.keep_status(200..300)`). Responses not kept are returned as they are: a 503, a
    /// response with `Retry-After` or a status below 500 other than 408 releases the claim, so
    /// a retry runs the handler again; a 408, 504 or other 5xx is an unknown outcome
    /// ([`on_unknown`](Self::on_unknown)). Default: [`keep_by_default`].
    pub fn keep_status(self, keep: impl KeepStatus) -> Self {
        let keep: Arc<dyn KeepStatus> = Arc::new(keep);
        self.with(|c| c.keep = keep)
    }

    /// Response headers stored and replayed besides `Content-Type` and `Content-Encoding`
    /// (e.g. `Location`). Other headers are sent with the first response only. A name that is
    /// not a valid header name is a mistake (see [Mistakes](#mistakes)).
    pub fn replay_headers<N>(self, names: impl IntoIterator<Item = N>) -> Self
    where
        N: TryInto<HeaderName>,
        N::Error: fmt::Display,
    {
        let mut extra = Vec::new();
        let mut mistake = None;
        for name in names {
            match name.try_into() {
                Ok(name) => extra.push(name),
                Err(e) => {
                    mistake.get_or_insert(format!(
                        "IdempotencyLayer::replay_headers: an invalid header name ({e})"
                    ));
                }
            }
        }
        let this = match mistake {
            Some(m) => self.mistaken(m),
            None => self,
        };
        this.with(|c| {
            for name in extra {
                if !c.replay_headers.contains(&name) {
                    c.replay_headers.push(name);
                }
            }
        })
    }

    /// At most `records` kept responses, and new keys only while under `bytes` of them, per
    /// scope (per client with [`per_client`](Self::per_client)): a request with a new key from
    /// a scope at its limit is refused with `429 #too-many-kept-responses` and a `Retry-After`
    /// of the seconds until its oldest kept response expires, and the handler does not run;
    /// retries of the keys it holds are still answered. Default: no limit.
    ///
    /// The tally is per process (see [Limits per scope](self#limits-per-scope)): the
    /// responses this layer and its clones kept, each until its ttl runs out. A limit of 0
    /// would refuse every request: it is a mistake (see [Mistakes](#mistakes)).
    pub fn limit_per_scope(self, records: usize, bytes: u64) -> Self {
        match ScopeLimits::new(records, bytes) {
            Ok(limits) => {
                let limits = Arc::new(limits);
                self.with(|c| c.limits = Some(limits))
            }
            Err(mistake) => self.mistaken(mistake),
        }
    }

    /// The largest request body accepted (larger: 413) and the largest response body kept
    /// (larger: passed through, not kept). Default [`DEFAULT_MAX_BODY_BYTES`], 1 MiB. Bodies
    /// are never buffered past this.
    pub fn max_body_bytes(self, limit: usize) -> Self {
        self.with(|c| c.max_body_bytes = limit)
    }

    /// How long a kept response is replayed: a `Duration` or whole seconds. Default 24h.
    pub fn ttl(self, ttl: impl IntoDuration) -> Self {
        let ttl = ttl.into_duration();
        self.with(|c| c.ttl = ttl)
    }

    /// How long a request's claim is held before another request with the key may take it over
    /// (if this one's process died); renewed while the handler runs. Default 30s; at least
    /// [`MIN_LEASE`](crate::engine::MIN_LEASE) (a shorter lease answers every request with 500).
    pub fn lease(self, lease: impl IntoDuration) -> Self {
        let lease = lease.into_duration();
        self.with(|c| c.lease = lease)
    }

    /// What becomes of a key whose handler started but whose response cannot be kept: a 5xx
    /// (but a 503) without `Retry-After`, a 408 or 504, a streamed response, a body over the limit or failing midway, a handler that panicked or
    /// failed. [`OnUnknown::Refuse`] (the default, at most once): retries get
    /// `500 #outcome-unknown` until the [`recovery`](Self::recovery) window passes.
    /// [`OnUnknown::Rerun`] (at least once): the claim is released and a retry runs the
    /// handler again.
    pub fn on_unknown(self, on_unknown: OnUnknown) -> Self {
        self.with(|c| c.on_unknown = on_unknown)
    }

    /// How long a key with an unknown outcome refuses retries under [`OnUnknown::Refuse`].
    /// Default: [`DEFAULT_RECOVERY`](crate::engine::DEFAULT_RECOVERY), 1 hour (the
    /// [`ttl`](Self::ttl) if shorter).
    pub fn recovery(self, window: impl IntoDuration) -> Self {
        let window = window.into_duration();
        self.with(|c| c.recovery = Some(window))
    }

    /// For a graceful shutdown: [`engine::drain`](crate::engine::drain), which waits up to
    /// `timeout` for every handler (of every layer) and detached body of this process to
    /// finish, then cuts off those still running and records their unknown outcome before it
    /// returns. Call it after the server stopped accepting requests and before `main` returns.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        crate::engine::drain(timeout).await
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, self.config.clone())
    }
}
