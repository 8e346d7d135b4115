//! The call the `#[idempotent]` macro expands to: claim, run the body at most once, complete or
//! release, replay.
//!
//! Everything here is plain Rust, usable (and tested) without the macro:
//!
//! ```
//! # use idem_runtime::{exec::{Call, ErrorPolicy}, key::StorageKey, MemoryStore, Error};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let out: Result<u32, Error> = Call::new(StorageKey::derive("docs", "k1"))
//!     .store(&store)
//!     .run(ErrorPolicy::never(), async { Ok(42) })
//!     .await;
//! assert_eq!(out.unwrap(), 42);
//! # }
//! ```

use std::any::type_name;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::key::{IntoKey, StorageKey};
use crate::metrics::{bump, COUNTERS};
use crate::record::{Outcome, Record};
use crate::store::{default_store, Claim, FencingToken, RecordState, Store, StoredRecord};

/// Default time a completed result is kept: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lease of an in-flight claim: 30 seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default limit on an encoded result: 8 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 8 << 20;

/// What a call does when its key is in flight elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// Fail at once with [`Error::InFlight`].
    Reject,
    /// Wait up to this long for the other call's result and replay it (or run, if the other call
    /// released its claim); past it, [`Error::WaitTimeout`].
    Wait(Duration),
}

/// A value idem can store and replay: `Serialize + DeserializeOwned`.
///
/// Implemented for every such type; it exists so a missing derive is reported in one clear
/// sentence at the user's type rather than as a list of serde's implementations.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored and replayed by idem",
    label = "`{Self}` must implement `Serialize` and `DeserializeOwned`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}` (results are stored as JSON and replayed)"
)]
pub trait Storable: Serialize + DeserializeOwned {}

#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned> Storable for T {}

/// The return type of an idempotent function: `Result<T, E>` with a storable `T` and an `E`
/// that idem's errors convert into.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` functions must return `Result<T, E>`, not `{Self}`",
    label = "the return type must be `Result<T, E>`",
    note = "`T` must implement `Serialize + DeserializeOwned` (it is stored and replayed), and `E` must implement `From<idem::Error>`"
)]
pub trait IdempotentResult: Sized {
    /// The stored, replayed success value.
    type Ok: Storable;
    /// The function's error type.
    type Err: From<Error>;
    /// Splits into a `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// Rebuilds from a `Result`.
    fn from_result(result: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T: Storable, E: From<Error>> IdempotentResult for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
    fn from_result(result: Result<T, E>) -> Self {
        result
    }
}

type Encode<E> = fn(&E) -> serde_json::Result<Vec<u8>>;
type Decode<E> = fn(&[u8]) -> serde_json::Result<E>;

/// Which `Err` results are kept and replayed (`cache_errors`). By default none: the claim is
/// released so a retry runs the body again.
pub struct ErrorPolicy<E> {
    keep: Option<fn(&E) -> bool>,
    codec: Option<(Encode<E>, Decode<E>)>,
}

impl<E> ErrorPolicy<E> {
    /// Keep no errors (the default).
    pub fn never() -> Self {
        ErrorPolicy {
            keep: None,
            codec: None,
        }
    }
}

impl<E: Storable> ErrorPolicy<E> {
    /// Keep every error (`cache_errors = true`).
    pub fn always() -> Self {
        fn yes<E>(_: &E) -> bool {
            true
        }
        Self::when(yes::<E>)
    }

    /// Keep the errors `keep` accepts (`cache_errors = path::to::predicate`).
    pub fn when(keep: fn(&E) -> bool) -> Self {
        ErrorPolicy {
            keep: Some(keep),
            codec: Some((|e| serde_json::to_vec(e), |b| serde_json::from_slice(b))),
        }
    }
}

/// Computes a fingerprint by adding values to a builder; used by the macro for the parameters.
pub fn fingerprint_with(
    add: impl FnOnce(&mut FingerprintBuilder) -> Result<()>,
) -> Result<Fingerprint> {
    let mut b = FingerprintBuilder::new();
    add(&mut b)?;
    Ok(b.finish())
}

/// One idempotent call: where to look (store, key), what must match (fingerprint), and for how
/// long (ttl, lease). Build it, then [`run`](Call::run) the body.
pub struct Call<'s> {
    store: Option<&'s dyn Store>,
    key: Result<StorageKey>,
    fingerprint: Result<Option<Fingerprint>>,
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    max_record_bytes: usize,
}

impl<'s> Call<'s> {
    /// A call under `key` (usually from [`StorageKey::derive`]; an error there is returned by
    /// [`run`](Call::run) without running anything). Defaults: no fingerprint, 24h ttl, 30s
    /// lease, reject conflicts, the process-wide store.
    pub fn new(key: Result<StorageKey>) -> Self {
        Call {
            store: None,
            key,
            fingerprint: Ok(None),
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_conflict: OnConflict::Reject,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }

    /// A call keyed by content: the key is the fingerprint itself, so equal arguments share one
    /// record (the macro's default when no `key = ...` is given).
    pub fn by_content(scope: &(impl IntoKey + ?Sized), fingerprint: Result<Fingerprint>) -> Self {
        match fingerprint {
            Ok(fp) => Call::new(StorageKey::derive(scope, &fp.to_hex())).fingerprint(Ok(Some(fp))),
            Err(e) => Call::new(Err(e)),
        }
    }

    /// Uses `store` instead of the process-wide one.
    pub fn store(mut self, store: &'s dyn Store) -> Self {
        self.store = Some(store);
        self
    }

    /// What must match when the key is reused; `Ok(None)` turns the check off.
    pub fn fingerprint(mut self, fingerprint: Result<Option<Fingerprint>>) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// How long a completed result is kept and replayed.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a claim is held before another caller may take it over; renewed every third of
    /// it while the body runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// What to do when the key is in flight elsewhere.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// The largest encoded result that is stored; larger ones fail with [`Error::TooLarge`].
    pub fn max_record_bytes(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit;
        self
    }

    /// Runs `body` at most once per key: replays a stored result, or claims the key, runs the
    /// body, and stores its result (and `Err`s the `errors` policy keeps).
    pub async fn run<R, Fut>(self, errors: ErrorPolicy<R::Err>, body: Fut) -> R
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        R::from_result(self.run_inner(errors, body).await)
    }

    async fn run_inner<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
    ) -> Result<R::Ok, R::Err>
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        let key = self.key?;
        let fingerprint = self.fingerprint?;
        let default;
        let store: &dyn Store = match self.store {
            Some(s) => s,
            None => {
                default = default_store();
                &*default
            }
        };
        let (token, mut lease_from) = match claim(
            store,
            &key,
            fingerprint.as_ref(),
            self.lease,
            self.on_conflict,
        )
        .await?
        {
            // `lease_from`: when the lease began, at the latest; moved on by each renewal.
            Claimed::Token(token, sent) => (token, sent),
            Claimed::Replay(bytes) => {
                bump(&COUNTERS.hits);
                tracing::debug!(target: "idem", key = %key, "replay");
                return replay::<R::Ok, R::Err>(&bytes, &errors);
            }
        };
        bump(&COUNTERS.misses);
        tracing::debug!(target: "idem", key = %key, token = token.0, "claimed");
        let mut guard = ReleaseGuard {
            store,
            key: &key,
            token,
            armed: true,
        };
        let output = drive_renewing(store, &key, token, self.lease, &mut lease_from, body)
            .await
            .into_result();

        let (outcome, payload, type_name) = match &output {
            Ok(v) => (Outcome::Ok, serde_json::to_vec(v), type_name::<R::Ok>()),
            Err(e) => match (errors.keep, errors.codec) {
                (Some(keep), Some((encode, _))) if keep(e) => {
                    (Outcome::Err, encode(e), type_name::<R::Err>())
                }
                _ => {
                    guard.release().await;
                    return output;
                }
            },
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                guard.release().await;
                return Err(Error::Encode(e).into());
            }
        };
        // The envelope stores the payload length in 32 bits: larger payloads are refused
        // whatever the configured limit.
        if payload.len() > u32::MAX as usize {
            guard.release().await;
            let limit = u32::MAX as usize;
            return Err(Error::TooLarge {
                size: payload.len(),
                limit,
            }
            .into());
        }
        let record = Record {
            outcome,
            fingerprint,
            token: token.0,
            completed_at_ms: unix_ms(),
            ttl_ms: self.ttl.as_millis() as u64,
            type_name,
            payload: &payload,
        }
        .encode();
        if record.len() > self.max_record_bytes {
            guard.release().await;
            return Err(Error::TooLarge {
                size: record.len(),
                limit: self.max_record_bytes,
            }
            .into());
        }
        guard.armed = false;
        let retry_until = lease_from + self.lease.mul_f64(0.9);
        // If this call is dropped while storing (a client went away), the store finishes in the
        // background: the body ran, and its result must not be lost.
        let mut finish = FinishGuard {
            store,
            key: &key,
            token,
            record: &record,
            ttl: self.ttl,
            until: retry_until,
            armed: true,
        };
        let stored = complete(store, &key, token, &record, self.ttl, retry_until, false).await;
        finish.armed = false;
        match stored {
            Ok(()) => {
                tracing::debug!(target: "idem", key = %key, token = token.0, ?outcome, "completed");
                output
            }
            Err(Error::LeaseLost) => {
                bump(&COUNTERS.leases_lost);
                tracing::warn!(target: "idem", key = %key, token = token.0,
                    "lease lost before completion: the newer holder's result stands");
                Err(Error::LeaseLost.into())
            }
            Err(e) => {
                // The store stayed unreachable for (nearly) the whole lease. The body ran: its
                // effect is real, so the caller gets its result. The claim stays in flight until
                // its lease runs out (releasing it would invite a re-run at once).
                bump(&COUNTERS.store_errors);
                tracing::error!(target: "idem", key = %key, token = token.0, error = %e,
                    "could not store the result; returning it unstored");
                output
            }
        }
    }
}

/// Stores a result. The body has run, so a result left unstored would let a later call run it
/// again once the lease runs out: a store error (a dropped connection, a restarting server) is
/// retried with backoff while the lease lasts (`until`). Retrying is safe: a stale token changes
/// nothing (fencing), and a retry that finds the key already completed under this call's own
/// token means an earlier attempt was stored but its reply was lost.
async fn complete(
    store: &dyn Store,
    key: &StorageKey,
    token: FencingToken,
    record: &[u8],
    ttl: Duration,
    until: Instant,
    mut attempted: bool,
) -> Result<()> {
    let mut pause = Duration::from_millis(10);
    loop {
        let error = match store.complete(key, token, record, ttl).await {
            Ok(()) => return Ok(()),
            Err(Error::LeaseLost) if attempted => match store.get(key).await {
                Ok(Some(StoredRecord {
                    state: RecordState::Completed { token: t, .. },
                    ..
                })) if t == token => return Ok(()),
                Ok(_) => return Err(Error::LeaseLost),
                Err(e) => e,
            },
            Err(e @ Error::LeaseLost) => return Err(e),
            Err(e) => e,
        };
        attempted = true;
        if Instant::now() + pause >= until {
            return Err(error);
        }
        bump(&COUNTERS.store_errors);
        tracing::warn!(target: "idem", key = %key, token = token.0, error = %error,
            "could not store the result; retrying while the lease lasts");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Finishes storing a result in the background when the call is dropped while storing it.
struct FinishGuard<'a> {
    store: &'a dyn Store,
    key: &'a StorageKey,
    token: FencingToken,
    record: &'a [u8],
    ttl: Duration,
    until: Instant,
    armed: bool,
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(store), Ok(runtime)) =
            (self.store.detached(), tokio::runtime::Handle::try_current())
        else {
            tracing::warn!(target: "idem", key = %self.key, token = self.token.0,
                "call dropped while storing its result; the claim stays in flight until its lease expires");
            return;
        };
        let (key, token, record, ttl, until) = (
            self.key.clone(),
            self.token,
            self.record.to_vec(),
            self.ttl,
            self.until,
        );
        tracing::debug!(target: "idem", key = %key, token = token.0, "call dropped while storing its result; finishing in the background");
        runtime.spawn(async move {
            // The dropped attempt may have been applied: `attempted = true`.
            if let Err(e) = complete(&*store, &key, token, &record, ttl, until, true).await {
                tracing::warn!(target: "idem", key = %key, token = token.0, error = %e,
                    "could not store a dropped call's result");
            }
        });
    }
}

enum Claimed {
    /// The token, and when the claim that got it was sent.
    Token(FencingToken, Instant),
    Replay(bytes::Bytes),
}

async fn claim(
    store: &dyn Store,
    key: &StorageKey,
    fingerprint: Option<&Fingerprint>,
    lease: Duration,
    on_conflict: OnConflict,
) -> Result<Claimed> {
    let deadline = match on_conflict {
        OnConflict::Reject => None,
        OnConflict::Wait(d) => Some((Instant::now() + d, d)),
    };
    let mut pause = Duration::from_millis(2);
    let mut counted_conflict = false;
    loop {
        let sent = Instant::now();
        match store.claim(key, fingerprint, lease).await {
            Err(e) => {
                bump(&COUNTERS.store_errors);
                tracing::warn!(target: "idem", key = %key, error = %e, "claim failed");
                return Err(e);
            }
            Ok(Claim::Acquired { token, takeover }) => {
                if takeover {
                    bump(&COUNTERS.takeovers);
                    tracing::info!(target: "idem", key = %key, token = token.0, "took over an expired lease");
                }
                return Ok(Claimed::Token(token, sent));
            }
            Ok(Claim::Completed(bytes)) => return Ok(Claimed::Replay(bytes)),
            Ok(Claim::KeyReuse) => {
                bump(&COUNTERS.key_reuses);
                tracing::warn!(target: "idem", key = %key, "key reused with a different fingerprint");
                return Err(Error::KeyReuse);
            }
            Ok(Claim::InFlight) => {
                if !counted_conflict {
                    counted_conflict = true;
                    bump(&COUNTERS.conflicts);
                    tracing::debug!(target: "idem", key = %key, ?on_conflict, "in flight elsewhere");
                }
                let Some((deadline, limit)) = deadline else {
                    return Err(Error::InFlight);
                };
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::WaitTimeout(limit));
                }
                store.wait_for_change(key, pause.min(deadline - now)).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

fn replay<T: DeserializeOwned, E: From<Error>>(
    bytes: &[u8],
    errors: &ErrorPolicy<E>,
) -> Result<T, E> {
    let record = Record::decode(bytes)?;
    let check = |expected: &str| {
        if record.type_name == crate::record::type_name_key(expected) {
            Ok(())
        } else {
            Err(Error::TypeMismatch {
                expected: expected.to_owned(),
                found: record.type_name.to_owned(),
            })
        }
    };
    match record.outcome {
        Outcome::Ok => {
            check(type_name::<T>())?;
            serde_json::from_slice(record.payload).map_err(|e| {
                Error::corrupt(format!(
                    "stored value does not decode as {}: {e}",
                    type_name::<T>()
                ))
                .into()
            })
        }
        Outcome::Err => {
            let Some((_, decode)) = errors.codec else {
                // An error was kept by an earlier version that cached errors; this caller cannot
                // decode errors at all.
                return Err(Error::TypeMismatch {
                    expected: type_name::<T>().to_owned(),
                    found: record.type_name.to_owned(),
                }
                .into());
            };
            check(type_name::<E>())?;
            match decode(record.payload) {
                Ok(e) => Err(e),
                Err(e) => Err(Error::corrupt(format!(
                    "stored error does not decode as {}: {e}",
                    type_name::<E>()
                ))
                .into()),
            }
        }
    }
}

/// Polls `body` to completion while renewing the lease every third of it. The body is polled
/// once before any timer exists, so bodies that finish at once pay nothing for renewal.
async fn drive_renewing<F: Future>(
    store: &dyn Store,
    key: &StorageKey,
    token: FencingToken,
    lease: Duration,
    lease_from: &mut Instant,
    body: F,
) -> F::Output {
    let mut body = pin!(body);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll(cx))).await {
        return out;
    }
    let period = (lease / 3).max(Duration::from_millis(10));
    let mut tick = pin!(tokio::time::sleep(period));
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            out = body.as_mut() => return out,
            _ = tick.as_mut(), if !lost => {
                // Renew while still polling the body: a slow store must not stall it.
                let sent = Instant::now();
                let mut renew = store.renew(key, token, lease);
                let result = tokio::select! {
                    biased;
                    out = body.as_mut() => return out,
                    r = renew.as_mut() => r,
                };
                match result {
                    Ok(()) => {
                        *lease_from = sent;
                        tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed")
                    }
                    Err(Error::LeaseLost) => {
                        lost = true;
                        tracing::warn!(target: "idem", key = %key, token = token.0, "lease lost while the body runs");
                    }
                    Err(e) => {
                        bump(&COUNTERS.store_errors);
                        tracing::warn!(target: "idem", key = %key, error = %e, "lease renewal failed; will retry");
                    }
                }
                tick.as_mut().reset(Instant::now() + period);
            }
        }
    }
}

/// Releases the claim if the call ends without completing: on `Err`, and (in the background)
/// when the body panics or the call's future is dropped.
struct ReleaseGuard<'a> {
    store: &'a dyn Store,
    key: &'a StorageKey,
    token: FencingToken,
    armed: bool,
}

impl ReleaseGuard<'_> {
    async fn release(&mut self) {
        self.armed = false;
        bump(&COUNTERS.releases);
        match self.store.release(self.key, self.token).await {
            Ok(()) => {
                tracing::debug!(target: "idem", key = %self.key, token = self.token.0, "released")
            }
            Err(e) => {
                if !matches!(e, Error::LeaseLost) {
                    bump(&COUNTERS.store_errors);
                }
                tracing::warn!(target: "idem", key = %self.key, error = %e, "release failed; the lease will expire");
            }
        }
    }
}

impl Drop for ReleaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            bump(&COUNTERS.releases);
            tracing::debug!(target: "idem", key = %self.key, token = self.token.0,
                panicking = std::thread::panicking(), "body did not finish; releasing");
            self.store
                .release_in_background(self.key.clone(), self.token);
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A value usable as `ttl = EXPR`, `lease = EXPR` or `wait = EXPR`: a `Duration`, or whole
/// seconds as an integer.
pub trait IntoDuration {
    /// The duration.
    fn into_duration(self) -> Duration;
}

impl IntoDuration for Duration {
    fn into_duration(self) -> Duration {
        self
    }
}

macro_rules! seconds {
    ($($t:ty),*) => {$(
        impl IntoDuration for $t {
            fn into_duration(self) -> Duration {
                // Negative seconds make no sense as a duration; they count as zero.
                Duration::from_secs(u64::try_from(self).unwrap_or(0))
            }
        }
    )*};
}
seconds!(u64, u32, usize, i64, i32);
