//! A signed webhook receiver: `POST /webhooks/stripe` checks a Stripe-style signature on the raw
//! body, then applies each event once however many times it is delivered.
//!
//! A webhook sender delivers at least once: it redelivers after a timeout or an error answer
//! (Stripe keeps retrying for up to three days), and sometimes delivers the same event twice at
//! the same moment. Each delivery is signed again, and the body itself may differ between
//! attempts in fields that describe the delivery rather than the event (here
//! `delivery_attempt`, standing for Stripe's `request` or `pending_webhooks`).
//!
//! The receiver below:
//! - verifies `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]` (HMAC-SHA256 with the
//!   endpoint secret over `"{t}.{raw body}"`) before anything else: any `v1` may match (the
//!   sender signs with the old and the new secret while a secret is rolled), the comparison is
//!   constant-time, and a timestamp more than five minutes away from now is refused (a
//!   captured delivery cannot be replayed by someone else later). A delivery that fails is
//!   answered 400 and nothing runs;
//! - keys the work by the event id and fingerprints the event's content only (its type and
//!   data), so a redelivery whose delivery metadata changed is the same event, and an event id
//!   reused with other content is refused;
//! - answers a duplicate delivery 200 with the acknowledgement of the first one (the sender
//!   must stop retrying), and logs it (`idempotency::observe` tells a replay from a run).
//!
//! ```text
//! cargo run --example signed_webhook --features http
//! ```
//!
//! It starts the receiver on 127.0.0.1 (a port of the system's choice), sends it a few signed
//! deliveries, a redelivery, a forged and a stale one, prints what each got, and exits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idempotency::{idempotent, observe, Served, Store};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The signature header a Stripe-style sender adds to every delivery.
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// The header that marks an answer replayed to a duplicate delivery (the same name the HTTP
/// layer uses); the body is the first delivery's acknowledgement either way.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// How far a delivery's timestamp may be from the receiver's clock, either way (Stripe's
/// libraries use five minutes too). Past it, a captured delivery cannot be replayed.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a delivery's signature was refused: answered 400 with [`SignatureError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    Missing,
    /// The header is not `t=<digits>,v1=<hex>[,...]`.
    Malformed(&'static str),
    /// No `v1` signature matches the body with this endpoint's secret.
    NoMatch,
    /// The timestamp is outside the tolerance window.
    Stale,
}

impl SignatureError {
    /// A short reason, the body of the 400 answer.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing Stripe-Signature header",
            SignatureError::Malformed(why) => why,
            SignatureError::NoMatch => "no signature matches",
            SignatureError::Stale => "timestamp outside the tolerance window",
        }
    }
}

/// The hex HMAC-SHA256 of `"{t}.{body}"` under `secret`: one `v1` value.
pub fn v1_signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The `Stripe-Signature` header value a sender would put on `body` at time `t` (Unix seconds):
/// `t=<t>,v1=<hex>`. For tests and clients.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", v1_signature(secret, t, body))
}

/// Checks a delivery's signature header against its raw body: returns the signed timestamp, or
/// why the delivery must be refused. `now` is in Unix seconds.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<u64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed(
                "signature header item without '='",
            ))?;
        match name {
            "t" if timestamp.is_some() => {
                return Err(SignatureError::Malformed("more than one timestamp"))
            }
            "t" => timestamp = Some(value),
            "v1" => signatures.push(
                hex::decode(value)
                    .map_err(|_| SignatureError::Malformed("a v1 signature is not hex"))?,
            ),
            // Other schemes (Stripe's test-mode `v0`) are not trusted, and not an error.
            _ => {}
        }
    }
    let text = timestamp.ok_or(SignatureError::Malformed("no timestamp"))?;
    // Digits only: `u64::from_str` would take "+5" too, and the signed text is what the
    // sender wrote, so it must have one spelling.
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed("the timestamp is not a number"));
    }
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    let t: u64 = text
        .parse()
        .map_err(|_| SignatureError::Malformed("the timestamp is not a number"))?;
    let matches = signatures.iter().any(|signature| {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        // The timestamp as the sender wrote it: the signed payload is its text.
        mac.update(text.as_bytes());
        mac.update(b".");
        mac.update(body);
        // Constant-time: how many leading bytes matched is not told by how long it took.
        mac.verify_slice(signature).is_ok()
    });
    if !matches {
        return Err(SignatureError::NoMatch);
    }
    if now.abs_diff(t) > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    Ok(t)
}

/// A delivered event, as the sender sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// The event's id (`evt_...`): the same in every delivery of the event.
    pub id: String,
    /// What happened (`payment_intent.succeeded`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened, in Unix seconds.
    pub created: u64,
    /// The event's object.
    pub data: serde_json::Value,
    /// Which attempt this delivery is: changes between deliveries of one event (like Stripe's
    /// `request` and `pending_webhooks`), so it is not part of what defines the event.
    #[serde(default)]
    pub delivery_attempt: u32,
}

/// The acknowledgement: stored with the first delivery, answered to every delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always `true`.
    pub received: bool,
    /// The event applied.
    pub event: String,
    /// The sequence number of the effect in the [`Ledger`].
    pub effect: u64,
}

/// What the receiver did: the side effects it started (per event id), the duplicates it
/// answered from the stored acknowledgement, the deliveries it refused with 400.
#[derive(Debug, Default)]
pub struct Ledger {
    effects: Mutex<HashMap<String, u64>>,
    started: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
}

impl Ledger {
    /// How many times the side effect of event `id` started.
    pub fn effects_of(&self, id: &str) -> u64 {
        self.effects.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// How many side effects started, all events together.
    pub fn effects(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// How many distinct events had a side effect.
    pub fn events(&self) -> usize {
        self.effects.lock().unwrap().len()
    }

    /// How many deliveries were answered as duplicates (replayed).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// How many deliveries were refused with 400 (signature or body).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }
}

/// The handler's error: idem's, mapped to a status by [`error_response`].
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The call was not run (in flight, key reuse, store down, ...).
    #[error(transparent)]
    Idempotency(#[from] idempotency::Error),
}

/// Applies one event, at most once per event id.
///
/// - `key = &event.id`: the sender's event id is the one thing every delivery of an event
///   shares.
/// - `fingerprint = (&event.kind, &event.data)`: what defines the event, and nothing about the
///   delivery. `delivery_attempt` (Stripe: `request`, `pending_webhooks`) changes between
///   attempts; fingerprinting all of `event` would make every redelivery a `KeyReuse` instead
///   of a replay. With the content fingerprinted, the same id with other content is refused
///   (`KeyReuse`): a sender bug or a forged id, never silently answered with another event's
///   acknowledgement. The store and ledger are handles, not part of the request.
/// - `ttl = "96h"`: longer than the sender's retry horizon (Stripe retries for up to 3 days),
///   so a late redelivery still finds the record instead of running again.
/// - `on_conflict = "wait"`, `wait = "5s"`: a duplicate delivered while the first is still
///   running waits for its result and answers 200 with the same acknowledgement. The default
///   (`reject`, `InFlight`) would answer it 409 and make the sender retry a delivery that is
///   being applied: more traffic, and a failed delivery in the sender's dashboard. The wait is
///   kept well under the sender's request timeout; past it, 409 (retry later).
#[idempotent(
    name = "webhooks.stripe",
    key = &event.id,
    fingerprint = (&event.kind, &event.data),
    store = store.clone(),
    ttl = "96h",
    on_conflict = "wait",
    wait = "5s"
)]
pub async fn apply_event(
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    event: Event,
) -> Result<Ack, WebhookError> {
    // The side effect starts here: counted before any work, so a second start would show.
    let effect = ledger.started.fetch_add(1, Ordering::SeqCst) + 1;
    *ledger
        .effects
        .lock()
        .unwrap()
        .entry(event.id.clone())
        .or_insert(0) += 1;
    tracing::info!(event = %event.id, kind = %event.kind, effect, "applying event");
    // The work itself (fulfil an order, credit an account): long enough that duplicates
    // delivered together overlap it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Ack {
        received: true,
        event: event.id,
        effect,
    })
}

/// An idem error as an answer to the sender. The status tells a sender that retries on any
/// non-2xx whether retrying can help; none of these ran the event.
pub fn error_response(error: &idempotency::Error) -> Response {
    use idempotency::Error;
    let (status, reason) = match error {
        // Another delivery of this event is being applied and did not finish within the wait:
        // transient, the retry will be answered with its acknowledgement.
        Error::InFlight { .. } | Error::WaitTimeout { .. } => (
            StatusCode::CONFLICT,
            "this event is being applied: retry later",
        ),
        // A known event id with other content. 422, not 409: the delivery is well-formed and
        // signed, but its content contradicts what was applied for this id, and retrying it
        // can never succeed; 409 is kept for the transient conflict above.
        Error::KeyReuse { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "event id already applied with other content",
        ),
        Error::InvalidKey { .. } => (StatusCode::BAD_REQUEST, "invalid event id"),
        // The store is unreachable or full: nothing ran; the sender's retry may find it back.
        Error::Store { .. } | Error::StoreFull { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot record deliveries now: retry later",
        ),
        // An earlier attempt started and its outcome is unknown (crash, panic): not 200,
        // because the effect may be missing; an operator resolves the record.
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot apply the event"),
    };
    (status, reason).into_response()
}

struct Receiver {
    secret: Vec<u8>,
    tolerance: Duration,
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
}

/// `POST /webhooks/stripe` for the endpoint secret `secret`, recording into `store`, with
/// [`DEFAULT_TOLERANCE`] for timestamps.
pub fn router(secret: impl Into<Vec<u8>>, store: Arc<dyn Store>, ledger: Arc<Ledger>) -> Router {
    router_with_tolerance(secret, store, ledger, DEFAULT_TOLERANCE)
}

/// [`router`] with another timestamp tolerance.
pub fn router_with_tolerance(
    secret: impl Into<Vec<u8>>,
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    tolerance: Duration,
) -> Router {
    let receiver = Arc::new(Receiver {
        secret: secret.into(),
        tolerance,
        store,
        ledger,
    });
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .with_state(receiver)
}

/// The endpoint: verify the raw bytes, then parse, then apply once.
async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The raw bytes, before any parsing: a JSON round trip would change them (spacing, key
    // order, number spelling) and no signature would match.
    let header = match headers.get(SIGNATURE_HEADER).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(text)) => Some(text),
        Some(Err(_)) => {
            return reject(
                &rx,
                SignatureError::Malformed("signature header is not text").reason(),
            )
        }
    };
    if let Err(e) = verify(header, &body, &rx.secret, now, rx.tolerance) {
        return reject(&rx, e.reason());
    }
    let event: Event = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(_) => return reject(&rx, "the body is not an event"),
    };
    let id = event.id.clone();
    let attempt = event.delivery_attempt;
    let (result, served) = observe(apply_event(rx.store.clone(), rx.ledger.clone(), event)).await;
    match result {
        Ok(ack) => {
            if let Some(Served::Replayed(info)) = &served {
                rx.ledger.duplicates.fetch_add(1, Ordering::SeqCst);
                tracing::info!(
                    event = %id,
                    attempt,
                    first_token = info.token().0,
                    "duplicate delivery: answered with the stored acknowledgement"
                );
                // 200 as for the first delivery: the sender must stop retrying.
                return (
                    StatusCode::OK,
                    [(REPLAYED_HEADER, HeaderValue::from_static("true"))],
                    Json(ack),
                )
                    .into_response();
            }
            (StatusCode::OK, Json(ack)).into_response()
        }
        Err(WebhookError::Idempotency(e)) => {
            tracing::warn!(event = %id, attempt, error = %e, "delivery not applied");
            error_response(&e)
        }
    }
}

fn reject(rx: &Receiver, reason: &'static str) -> Response {
    rx.ledger.rejected.fetch_add(1, Ordering::SeqCst);
    tracing::warn!(reason, "delivery refused");
    (StatusCode::BAD_REQUEST, reason).into_response()
}

/// A plain HTTP/1 client (hyper-util's), as a sender would use.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new [`HttpClient`].
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Posts `body` to `url` with the signature header `signature` (none if `None`): the status,
/// the headers and the body of the answer.
pub async fn deliver(
    client: &HttpClient,
    url: &str,
    signature: Option<&str>,
    body: &[u8],
) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let mut request = axum::http::Request::post(url).header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header(SIGNATURE_HEADER, signature);
    }
    let response = client
        .request(request.body(Full::new(Bytes::copy_from_slice(body)))?)
        .await?;
    let (parts, body) = response.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await?.to_bytes(),
    ))
}

/// The current time in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An event body as the sender would serialize it.
pub fn event_body(id: &str, kind: &str, data: serde_json::Value, attempt: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "type": kind,
        "created": 1_700_000_000u64,
        "data": data,
        "delivery_attempt": attempt,
    }))
    .expect("JSON")
}

#[allow(dead_code)] // Not called when the tests include this file as a module.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let secret = b"whsec_example_only".to_vec();
    let store: Arc<dyn Store> = Arc::new(idempotency::MemoryStore::new());
    let ledger = Arc::new(Ledger::default());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}/webhooks/stripe", listener.local_addr()?);
    let app = router(secret.clone(), store, ledger.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("receiver on {url}");

    let client = client();
    let paid = serde_json::json!({ "object": { "id": "pi_1", "amount": 2500 } });
    let show = |what: &str, (status, headers, body): (StatusCode, HeaderMap, Bytes)| {
        let replayed = headers.contains_key(REPLAYED_HEADER);
        println!(
            "{what:<44} -> {status} {}{}",
            String::from_utf8_lossy(&body),
            if replayed { " (replayed)" } else { "" }
        );
        status
    };

    // A first delivery, and two duplicates delivered at the same moment.
    let body = event_body("evt_1", "payment_intent.succeeded", paid.clone(), 1);
    let header = sign(&secret, unix_now(), &body);
    let (a, b, c) = tokio::join!(
        deliver(&client, &url, Some(&header), &body),
        deliver(&client, &url, Some(&header), &body),
        deliver(&client, &url, Some(&header), &body),
    );
    let mut statuses = vec![
        show("evt_1 delivered three times at once", a?),
        show("", b?),
        show("", c?),
    ];

    // A redelivery: another attempt, so another body and another signature, the same event.
    let body = event_body("evt_1", "payment_intent.succeeded", paid.clone(), 2);
    let header = sign(&secret, unix_now(), &body);
    statuses.push(show(
        "evt_1 redelivered (attempt 2)",
        deliver(&client, &url, Some(&header), &body).await?,
    ));

    // Another event.
    let refund = serde_json::json!({ "object": { "id": "re_1", "amount": 500 } });
    let body = event_body("evt_2", "charge.refunded", refund, 1);
    let header = sign(&secret, unix_now(), &body);
    statuses.push(show(
        "evt_2 delivered",
        deliver(&client, &url, Some(&header), &body).await?,
    ));

    // Refused: signed with another secret, signed too long ago, an event id reused with other
    // content.
    let forged = event_body("evt_3", "payment_intent.succeeded", paid.clone(), 1);
    let header = sign(b"whsec_guessed", unix_now(), &forged);
    let forged_status = show(
        "evt_3 forged (another secret)",
        deliver(&client, &url, Some(&header), &forged).await?,
    );
    let stale = event_body("evt_4", "payment_intent.succeeded", paid, 1);
    let header = sign(&secret, unix_now() - 3600, &stale);
    let stale_status = show(
        "evt_4 signed an hour ago",
        deliver(&client, &url, Some(&header), &stale).await?,
    );
    let other = serde_json::json!({ "object": { "id": "pi_1", "amount": 999_999 } });
    let reused = event_body("evt_1", "payment_intent.succeeded", other, 3);
    let header = sign(&secret, unix_now(), &reused);
    let reused_status = show(
        "evt_1 with other content",
        deliver(&client, &url, Some(&header), &reused).await?,
    );

    println!(
        "\neffects started: evt_1 {}, evt_2 {}, evt_3 {}, evt_4 {}; duplicates answered: {}; refused with 400: {}",
        ledger.effects_of("evt_1"),
        ledger.effects_of("evt_2"),
        ledger.effects_of("evt_3"),
        ledger.effects_of("evt_4"),
        ledger.duplicates(),
        ledger.rejected(),
    );
    server.abort();

    let expected = statuses.iter().all(|s| *s == StatusCode::OK)
        && forged_status == StatusCode::BAD_REQUEST
        && stale_status == StatusCode::BAD_REQUEST
        && reused_status == StatusCode::UNPROCESSABLE_ENTITY
        && ledger.effects() == 2
        && ledger.duplicates() == 3;
    if !expected {
        return Err("the receiver did not behave as described".into());
    }
    Ok(())
}
