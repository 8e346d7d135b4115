//! The call the `#[idempotent]` macro expands to: claim, run the body at most once, complete or
//! release, replay.
//!
//! Everything here is plain Rust, usable (and tested) without the macro:
//!
//! ```
//! # use idem_runtime as idempotency;
//! use idempotency::{exec::{Call, ErrorPolicy}, key::StorageKey, MemoryStore, Error};
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
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::context::CallContext;
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::key::{IntoKey, Operation, StorageKey};
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
    note = "`T` must implement `Serialize + DeserializeOwned` (it is stored and replayed), and `E` must implement `From<idempotency::Error>`"
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
    unknown: Option<fn(&E) -> bool>,
}

impl<E> ErrorPolicy<E> {
    /// Keep no errors (the default).
    pub fn never() -> Self {
        ErrorPolicy {
            keep: None,
            codec: None,
            unknown: None,
        }
    }

    /// Errors (not kept) that `unknown` accepts mean the body's outcome is unknown rather than
    /// "nothing happened": they are handled per [`OnUnknown`] instead of releasing the claim.
    /// The HTTP layer uses it for responses it cannot keep.
    pub fn unknown_when(mut self, unknown: fn(&E) -> bool) -> Self {
        self.unknown = Some(unknown);
        self
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
            unknown: None,
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

/// The shortest lease accepted: 100 ms. A shorter lease expires before a store round trip and
/// a renewal can land, so every concurrent caller would take the key over and run the body.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The default limit of `on_conflict = "wait"` for a given lease: long enough for the holder's
/// lease to run out and for a caller that takes the key over to run the body within a lease of
/// its own (`2 × lease + 1 s`), so the waiters of a crashed holder get the taker's result.
pub fn default_wait(lease: Duration) -> Duration {
    lease
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1))
}

/// What becomes of a key whose body started but whose outcome is unknown: the body panicked,
/// the call was abandoned while its body ran (and the body could not go on by itself), or its
/// result could not be kept (too large, not encodable; for HTTP a 5xx, a streamed or failed
/// response). Its side effect may or may not have happened.
///
/// An `Err` the body returns is not unknown (the body said what happened): it releases the
/// claim at once unless it is kept (`cache_errors`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnUnknown {
    /// At most once (the default): the key keeps a record of the unknown outcome, and every
    /// call with it fails with [`Error::OutcomeUnknown`] until the record is removed or the
    /// recovery window (by default the ttl) passes. What a payments team expects: a charge
    /// that may have gone through is never sent again by accident. Stripe keeps 500s the same
    /// way.
    #[default]
    Refuse,
    /// At least once: the claim is released, so the next call runs the body again. For bodies
    /// whose side effects are themselves idempotent or harmless to repeat.
    Rerun,
}

/// Where a call finds its store.
enum StoreRef<'s> {
    /// The process-wide store.
    Default,
    Borrowed(&'s dyn Store),
    Shared(Arc<dyn Store>),
}

/// One idempotent call: where to look (store, key), what must match (fingerprint), and for how
/// long (ttl, lease). Build it, then [`run`](Call::run) the body.
pub struct Call<'s> {
    store: StoreRef<'s>,
    key: Result<StorageKey>,
    fingerprint: Result<Option<Fingerprint>>,
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    max_record_bytes: usize,
    on_unknown: OnUnknown,
    recovery: Option<Duration>,
    operation: Option<Operation>,
    schema: u32,
}

impl<'s> Call<'s> {
    /// A call under `key` (usually from [`StorageKey::derive`]; an error there is returned by
    /// [`run`](Call::run) without running anything). Defaults: no fingerprint, 24h ttl, 30s
    /// lease, reject conflicts, at-most-once for unknown outcomes, the process-wide store.
    pub fn new(key: Result<StorageKey>) -> Self {
        Call {
            store: StoreRef::Default,
            key,
            fingerprint: Ok(None),
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_conflict: OnConflict::Reject,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            on_unknown: OnUnknown::Refuse,
            recovery: None,
            operation: None,
            schema: 0,
        }
    }

    /// The call of `operation` under `key` in `scope` (what `#[idempotent(key = ...)]` expands
    /// to): the storage key is [`StorageKey::derive_for`], and the record carries the
    /// operation's name.
    pub fn for_operation(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        key: &(impl IntoKey + ?Sized),
    ) -> Self {
        let mut call = Call::new(StorageKey::derive_for(&operation, scope, key));
        call.operation = Some(operation);
        call
    }

    /// A call of `operation` keyed by content: the key is the fingerprint itself, so equal
    /// arguments share one record (the macro's default when no `key = ...` is given).
    pub fn by_content_for(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        fingerprint: Result<Fingerprint>,
    ) -> Self {
        let mut call = match fingerprint {
            Ok(fp) => Call::for_operation(operation, scope, &fp.to_hex()).fingerprint(Ok(Some(fp))),
            Err(e) => Call::new(Err(e)),
        };
        call.operation = Some(operation);
        call
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
        self.store = StoreRef::Borrowed(store);
        self
    }

    /// Uses a shared `store` instead of the process-wide one; the call then owns everything it
    /// needs and can run on its own task ([`run_detached`](Call::run_detached)).
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = StoreRef::Shared(store);
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

    /// How long a claim is held before another caller may take it over; renewed every quarter
    /// of it, on a task of its own, while the body runs. At least [`MIN_LEASE`]; a shorter one
    /// is [`Error::Config`] and nothing runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// What to do when the key is in flight elsewhere.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// The largest encoded result that is stored; larger ones fail with [`Error::TooLarge`]
    /// (and, the body having run, count as an unknown outcome: see [`OnUnknown`]).
    pub fn max_record_bytes(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit;
        self
    }

    /// What becomes of the key when the body's outcome is unknown. Default
    /// [`OnUnknown::Refuse`] (at most once).
    pub fn on_unknown(mut self, on_unknown: OnUnknown) -> Self {
        self.on_unknown = on_unknown;
        self
    }

    /// The schema version of the result (`version = N`): stored with it, and compared on
    /// replay. Bump it when the result type changes in a way old records must not be decoded
    /// into; records of another version are then [`Error::TypeMismatch`] (never decoded) until
    /// their ttl runs out. Default 0.
    pub fn version(mut self, version: u32) -> Self {
        self.schema = version;
        self
    }

    /// How long a record of an unknown outcome refuses calls ([`OnUnknown::Refuse`]) before
    /// the key may run again. Default: the ttl.
    pub fn recovery(mut self, window: Duration) -> Self {
        self.recovery = Some(window);
        self
    }

    /// Runs `body` at most once per key: replays a stored result, or claims the key, runs the
    /// body, and stores its result (and `Err`s the `errors` policy keeps).
    ///
    /// The body runs inside this future: if the caller drops it (a timeout, a client that went
    /// away), the body stops at its next `.await`, and its outcome is unknown (see
    /// [`OnUnknown`]). Bodies that own their data can use [`run_detached`](Call::run_detached)
    /// instead, which finishes them.
    pub async fn run<R, Fut>(self, errors: ErrorPolicy<R::Err>, body: Fut) -> R
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        match self.begin::<R>(&errors).await {
            Begun::Answer(answer) => answer,
            Begun::Claimed(claimed) => claimed.finish(errors, body, None).await,
        }
    }

    /// Like [`run`](Call::run), but once the key is claimed, the body and the storing of its
    /// result run on a task of their own: if the caller stops waiting, the body still runs to
    /// its end and its result is stored, so a retry gets it replayed (or [`Error::InFlight`] /
    /// waits while it runs) instead of an unknown outcome. The claim itself, and so a replay,
    /// happens in the caller. A panic in the body is re-raised in the caller.
    ///
    /// Needs a store that can be shared ([`shared_store`](Call::shared_store), the process-wide
    /// one, or a store whose [`Store::detached`] gives a handle, as every built-in store's
    /// does); otherwise it runs like [`run`](Call::run).
    pub async fn run_detached<R, Fut>(self, errors: ErrorPolicy<R::Err>, body: Fut) -> R
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let Some(store) = self.shareable_store() else {
            return self.run(errors, body).await;
        };
        // Claim (or replay) in the caller; only a body that is to run moves to a task of its
        // own. A caller that leaves while the claim is on its way may leave the claim in flight
        // until its lease ends; the body has not started then, so nothing runs twice.
        let holding = match self.with_shared_store(store).begin::<R>(&errors).await {
            Begun::Answer(answer) => return answer,
            Begun::Claimed(holding) => holding,
        };
        // Renewal first: spawning the body's task next moves the renewal task out of this
        // worker's next-task slot into its queue, where another worker can run it even if the
        // body blocks this thread.
        let begun = holding.start_renewal();
        let task = tokio::spawn(holding.finish(errors, body, Some(begun)));
        let abandoned = Abandoned::new();
        let joined = task.await;
        abandoned.disarm();
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => R::from_result(Err(Error::OutcomeUnknown {
                reason: "the runtime shut down while the body ran".into(),
            }
            .into())),
        }
    }

    /// The call's store as a handle that may outlive the call, if it can be had.
    fn shareable_store(&self) -> Option<Arc<dyn Store>> {
        match &self.store {
            StoreRef::Default => Some(default_store()),
            StoreRef::Shared(s) => Some(s.clone()),
            StoreRef::Borrowed(s) => s.detached(),
        }
    }

    /// This call, owning `store`.
    fn with_shared_store(self, store: Arc<dyn Store>) -> Call<'static> {
        Call {
            store: StoreRef::Shared(store),
            key: self.key,
            fingerprint: self.fingerprint,
            ttl: self.ttl,
            lease: self.lease,
            on_conflict: self.on_conflict,
            max_record_bytes: self.max_record_bytes,
            on_unknown: self.on_unknown,
            recovery: self.recovery,
            operation: self.operation,
            schema: self.schema,
        }
    }

    /// Checks the call, then claims its key: the answer (a replay, a refusal, an error), or the
    /// claim under which the body is to run.
    async fn begin<R: IdempotentResult>(self, errors: &ErrorPolicy<R::Err>) -> Begun<'s, R> {
        let fail = |e: Error| Begun::Answer(R::from_result(Err(e.into())));
        // The store as a handle a background task can own, if any.
        let shared = self.shareable_store();
        let (key, fingerprint) = match (self.key, self.fingerprint) {
            (Ok(key), Ok(fingerprint)) => (key, fingerprint),
            (Err(e), _) | (_, Err(e)) => return fail(e),
        };
        if self.lease < MIN_LEASE {
            return fail(Error::config(format!(
                "a lease of {:?} is shorter than the minimum of {MIN_LEASE:?}: it would expire before the claim could be renewed, and concurrent callers would all run the body",
                self.lease
            )));
        }
        let store: &dyn Store = match (&self.store, &shared) {
            (StoreRef::Borrowed(s), _) => *s,
            (_, Some(s)) => &**s,
            (_, None) => unreachable!("shared and default stores are handles"),
        };
        if let Some(op) = &self.operation {
            if !op.is_stable() && store.durable() {
                return fail(Error::config(format!(
                    "`{}` has no stable name, and its store ({}) keeps records across deploys: a name taken from the function's path changes when the function moves or is renamed, and live keys would run the body again. Add `name = \"...\"` to its #[idempotent(...)], e.g. `name = \"billing.charge\"`, and keep it when the function moves",
                    op.name(),
                    store.backend()
                )));
            }
        }
        let expect = Expect {
            operation: self.operation.map(|op| op.name()),
            schema: self.schema,
        };
        let (token, takeover) = match claim(
            store,
            &key,
            fingerprint.as_ref(),
            self.lease,
            self.on_conflict,
        )
        .await
        {
            Ok(Claimed::Token(token, takeover)) => (token, takeover),
            Ok(Claimed::Replay(bytes)) => {
                bump(&COUNTERS.hits);
                tracing::debug!(target: "idem", key = %key, "replay");
                return Begun::Answer(R::from_result(replay::<R::Ok, R::Err>(
                    &bytes, errors, &expect,
                )));
            }
            Err(e) => return fail(e),
        };
        Begun::Claimed(Box::new(Holding {
            store: match self.store {
                StoreRef::Borrowed(s) => HeldStore::Borrowed(s),
                _ => HeldStore::Shared,
            },
            shared,
            key,
            fingerprint,
            token,
            takeover,
            expect,
            ttl: self.ttl,
            lease: self.lease,
            max_record_bytes: self.max_record_bytes,
            on_unknown: self.on_unknown,
            recovery: self.recovery,
        }))
    }
}

/// What [`Call::begin`] found.
enum Begun<'s, R> {
    /// The call's answer: a replay, a refusal or an error. Nothing runs.
    Answer(R),
    /// The key is claimed: run the body under it.
    Claimed(Box<Holding<'s>>),
}

/// Where a claimed call finds its store.
enum HeldStore<'s> {
    Borrowed(&'s dyn Store),
    /// The `shared` handle of [`Holding`].
    Shared,
}

/// A claimed key and everything needed to run the body under it, store its outcome, and do
/// the work that outlives the caller: owned (`'static`) when the store is shared, so that it
/// can move to a task of its own.
struct Holding<'s> {
    store: HeldStore<'s>,
    shared: Option<Arc<dyn Store>>,
    key: StorageKey,
    fingerprint: Option<Fingerprint>,
    token: FencingToken,
    takeover: bool,
    expect: Expect,
    ttl: Duration,
    lease: Duration,
    max_record_bytes: usize,
    on_unknown: OnUnknown,
    recovery: Option<Duration>,
}

impl Holding<'_> {
    /// The body's context, and the lease's renewal on a task of its own (if the store can be
    /// shared with one).
    fn start_renewal(&self) -> (CallContext, Option<Renewal>) {
        let context = CallContext::new(self.key.clone(), self.token, self.takeover);
        let renewal = Renewal::start(
            self.shared.clone(),
            &self.key,
            self.token,
            self.lease,
            context.clone(),
        );
        (context, renewal)
    }

    /// Runs the body under the claim, then stores its outcome (or releases, or records an
    /// unknown outcome). `begun`: the context and renewal if the caller started them already
    /// (a detached call starts them before spawning the body's task, so the renewal task is
    /// queued where another worker can take it, with no yield); else they start here.
    async fn finish<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
        begun: Option<(CallContext, Option<Renewal>)>,
    ) -> R
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        // No value of `R::Ok` or `R::Err` is held across an `.await` (only `R`), so that the
        // future is `Send` whenever `R` and the body are, as `run_detached` needs.
        let fail = |e: Error| R::from_result(Err(e.into()));
        let store: &dyn Store = match (&self.store, &self.shared) {
            (HeldStore::Borrowed(s), _) => *s,
            (HeldStore::Shared, Some(s)) => &**s,
            (HeldStore::Shared, None) => unreachable!("a shared store has a handle"),
        };
        let Holding {
            shared,
            key,
            fingerprint,
            token,
            expect,
            ..
        } = &self;
        let (key, fingerprint, token) = (key, *fingerprint, *token);
        bump(&COUNTERS.misses);
        tracing::debug!(target: "idem", key = %key, token = token.0, "claimed");
        let recovery = self.recovery.unwrap_or(self.ttl);
        let started = Started {
            store,
            shared: shared.clone(),
            renewal: std::sync::Mutex::new(None),
            key,
            token,
            on_unknown: self.on_unknown,
            recovery,
            lease: self.lease,
        };
        let mut guard = StartedGuard {
            started: &started,
            armed: true,
            body_started: false,
        };
        let (context, renewal) = match begun {
            Some(begun) => begun,
            None => {
                let (context, renewal) = self.start_renewal();
                if renewal.is_some() {
                    // Let the renewal task run once (and arm its timer) before the body, which
                    // may block this thread.
                    tokio::task::yield_now().await;
                }
                (context, renewal)
            }
        };
        // From here on the body may have done its side effect.
        guard.body_started = true;
        let body = catch_unwind(context.clone().scope(body));
        let output = match renewal {
            Some(renewal) => {
                let output = body.await;
                // Renewal goes on until the outcome is stored (or the claim released): a store
                // that is down when the body ends must not let the lease lapse unnoticed.
                *started.renewal.lock().unwrap_or_else(|p| p.into_inner()) = Some(renewal);
                output
            }
            None => drive_renewing(store, key, token, self.lease, &context, body).await,
        };
        let output = match output {
            Ok(output) => output,
            Err(panic) => {
                // Record the unknown outcome before the panic goes on, so that a retry that
                // follows it finds the record rather than the claim.
                guard.armed = false;
                started.unknown("the body panicked").await;
                std::panic::resume_unwind(panic)
            }
        };

        // Decide what to keep while the value is at hand, then hold it as `R` again (in a
        // block, so that no `Result<R::Ok, R::Err>` lives across an `.await`).
        let (output, kept, unknown_err) = {
            let result = output.into_result();
            let kept = match &result {
                Ok(v) => Some((Outcome::Ok, serde_json::to_vec(v), type_name::<R::Ok>())),
                Err(e) => match (errors.keep, errors.codec) {
                    (Some(keep), Some((encode, _))) if keep(e) => {
                        Some((Outcome::Err, encode(e), type_name::<R::Err>()))
                    }
                    _ => None,
                },
            };
            let unknown_err =
                matches!((&result, errors.unknown), (Err(e), Some(unknown)) if unknown(e));
            (R::from_result(result), kept, unknown_err)
        };
        let Some((outcome, payload, type_name)) = kept else {
            guard.armed = false;
            if unknown_err {
                started.unknown("the response could not be kept").await
            } else {
                started.release().await
            }
            return output;
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                guard.armed = false;
                started
                    .unknown(&format!("the result could not be encoded as JSON: {e}"))
                    .await;
                return fail(Error::Encode(e));
            }
        };
        let record = Record::encode_checked(
            &Record {
                outcome,
                fingerprint,
                token: token.0,
                completed_at_ms: unix_ms(),
                ttl_ms: self.ttl.as_millis() as u64,
                type_name,
                operation: expect.operation.unwrap_or(""),
                schema: expect.schema,
                payload: &payload,
            },
            self.max_record_bytes,
        );
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                guard.armed = false;
                started
                    .unknown(&format!("the result was not stored: {e}"))
                    .await;
                return fail(e);
            }
        };
        guard.armed = false;
        match started.store(record, self.ttl).await {
            Stored::Landed => {
                tracing::debug!(target: "idem", key = %key, token = token.0, ?outcome, "completed");
                output
            }
            Stored::Lost => {
                bump(&COUNTERS.leases_lost);
                tracing::warn!(target: "idem", key = %key, token = token.0,
                    "lease lost before completion: the newer holder's result stands");
                fail(Error::LeaseLost)
            }
            Stored::Pending(e) => {
                // The store stayed unreachable for a whole lease after the body ran. The body's
                // effect is real, so the caller gets its result; storing goes on in the
                // background and lands as long as nobody took the key over.
                bump(&COUNTERS.results_unstored);
                tracing::error!(target: "idem", key = %key, token = token.0, error = %e,
                    "could not store the result yet; returning it, and storing it in the background");
                output
            }
        }
    }
}

/// Counts a detached call whose caller stopped waiting: its body goes on by itself.
pub(crate) struct Abandoned {
    armed: bool,
}

impl Abandoned {
    /// Armed until [`disarm`](Self::disarm)ed: dropping it armed counts an abandoned call.
    pub(crate) fn new() -> Self {
        Abandoned { armed: true }
    }

    /// The caller got its answer.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            bump(&COUNTERS.finished_detached);
            tracing::debug!(target: "idem",
                "caller stopped waiting; the body runs on and its result will be stored");
        }
    }
}

/// What the call knows once its claim is acquired: enough to finish, release, or record an
/// unknown outcome.
struct Started<'a> {
    store: &'a dyn Store,
    /// The same store as a handle a background task can own, if there is one.
    shared: Option<Arc<dyn Store>>,
    /// The lease's renewal once the body has ended, kept until the outcome is stored.
    renewal: std::sync::Mutex<Option<Renewal>>,
    key: &'a StorageKey,
    token: FencingToken,
    on_unknown: OnUnknown,
    recovery: Duration,
    lease: Duration,
}

enum Stored {
    Landed,
    Lost,
    /// Not stored yet (the store kept failing); a background task goes on trying.
    Pending(Error),
}

impl Started<'_> {
    /// Stores `record`, retrying store errors for up to a lease while the caller waits, then in
    /// the background (see [`complete`]).
    async fn store(&self, record: Vec<u8>, ttl: Duration) -> Stored {
        let until = Instant::now() + self.lease;
        // If this call is dropped while storing (a client went away), storing finishes in the
        // background: the body ran, and its result must not be lost.
        let mut finish = FinishGuard {
            started: self,
            record: &record,
            ttl,
            armed: true,
        };
        let stored = complete(self.store, self.key, self.token, &record, ttl, until, false).await;
        finish.armed = false;
        drop(finish);
        match stored {
            Ok(()) => {
                drop(self.take_renewal());
                Stored::Landed
            }
            Err(Error::LeaseLost) => {
                drop(self.take_renewal());
                Stored::Lost
            }
            Err(e) => {
                self.complete_in_background("a result", record, ttl, true, self.take_renewal());
                Stored::Pending(e)
            }
        }
    }

    /// The lease's renewal, if it is still running.
    fn take_renewal(&self) -> Option<Renewal> {
        self.renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Goes on storing `record` (`what`: a result, an unknown outcome) on a task of its own,
    /// renewing the lease meanwhile if `renewal` is given, until it lands, the key is taken
    /// over, or the ttl (at most a day) passes. `attempted`: an earlier attempt may have been
    /// applied (see [`complete`]). The one place that stores in the background.
    fn complete_in_background(
        &self,
        what: &'static str,
        record: Vec<u8>,
        ttl: Duration,
        attempted: bool,
        renewal: Option<Renewal>,
    ) {
        let (Some(store), Ok(runtime)) = (self.shared.clone(), Handle::try_current()) else {
            tracing::warn!(target: "idem", key = %self.key, token = self.token.0, what,
                "no handle or runtime to store on in the background; the claim stays in flight until its lease expires");
            return;
        };
        let (key, token) = (self.key.clone(), self.token);
        runtime.spawn(async move {
            let _renewal = renewal;
            let until = Instant::now() + ttl.min(MAX_BACKGROUND_STORING);
            match complete(&*store, &key, token, &record, ttl, until, attempted).await {
                Ok(()) => tracing::info!(target: "idem", key = %key, token = token.0, what,
                    "stored in the background"),
                Err(e) => {
                    tracing::warn!(target: "idem", key = %key, token = token.0, what, error = %e,
                    "gave up storing in the background")
                }
            }
        });
    }

    /// Releases the claim: nothing happened that a retry must not repeat.
    async fn release(&self) {
        drop(self.take_renewal());
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

    /// The body started and its outcome is unknown: record it ([`OnUnknown::Refuse`]) or
    /// release the claim ([`OnUnknown::Rerun`]).
    async fn unknown(&self, reason: &str) {
        bump(&COUNTERS.unknown_outcomes);
        match self.on_unknown {
            OnUnknown::Rerun => {
                tracing::warn!(target: "idem", key = %self.key, token = self.token.0, reason,
                    "outcome unknown; released (at least once)");
                self.release().await
            }
            OnUnknown::Refuse => {
                tracing::warn!(target: "idem", key = %self.key, token = self.token.0, reason,
                    "outcome unknown; recorded, calls with this key are refused (at most once)");
                let record = unknown_record(self.token, reason, self.recovery);
                if let Stored::Pending(e) = self.store(record, self.recovery).await {
                    tracing::error!(target: "idem", key = %self.key, token = self.token.0, error = %e,
                        "could not record the unknown outcome yet; still trying in the background");
                }
            }
        }
    }

    /// [`release`](Self::release) from a destructor, through the store's own
    /// [`Store::release_in_background`] (which knows how to release without being awaited).
    fn release_in_background(&self, reason: &'static str) {
        drop(self.take_renewal());
        bump(&COUNTERS.releases);
        tracing::debug!(target: "idem", key = %self.key, token = self.token.0, reason, "releasing");
        self.store
            .release_in_background(self.key.clone(), self.token);
    }

    /// [`unknown`](Self::unknown) from a destructor: on a task of its own.
    fn unknown_in_background(&self, reason: &'static str) {
        bump(&COUNTERS.unknown_outcomes);
        match self.on_unknown {
            OnUnknown::Rerun => {
                tracing::warn!(target: "idem", key = %self.key, token = self.token.0, reason,
                    "outcome unknown (at least once)");
                self.release_in_background(reason);
            }
            OnUnknown::Refuse => {
                tracing::warn!(target: "idem", key = %self.key, token = self.token.0, reason,
                    "outcome unknown; recording it (at most once)");
                let record = unknown_record(self.token, reason, self.recovery);
                self.complete_in_background(
                    "an unknown outcome",
                    record,
                    self.recovery,
                    false,
                    None,
                );
            }
        }
    }
}

/// The longest a background task goes on trying to store a result.
const MAX_BACKGROUND_STORING: Duration = Duration::from_secs(24 * 3600);

fn unknown_record(token: FencingToken, reason: &str, recovery: Duration) -> Vec<u8> {
    Record {
        outcome: Outcome::Unknown,
        fingerprint: None,
        token: token.0,
        completed_at_ms: unix_ms(),
        ttl_ms: recovery.as_millis() as u64,
        type_name: "",
        operation: "",
        schema: 0,
        payload: reason.as_bytes(),
    }
    .encode()
}

/// Records an unknown outcome (or releases, per [`OnUnknown`]) when the body panics or the
/// call's future is dropped while the body runs.
struct StartedGuard<'a> {
    started: &'a Started<'a>,
    armed: bool,
    /// Whether the body may have been polled: before that, a dropped call only releases.
    body_started: bool,
}

impl Drop for StartedGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if !self.body_started {
            self.started
                .release_in_background("the call was dropped before its body started");
        } else if std::thread::panicking() {
            self.started.unknown_in_background("the body panicked");
        } else {
            self.started
                .unknown_in_background("the call was abandoned while its body ran");
        }
    }
}

/// Polls `body`, catching a panic (so that its unknown outcome is recorded before it goes on).
async fn catch_unwind<F: Future>(body: F) -> std::thread::Result<F::Output> {
    let mut body = pin!(body);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// Stores a result. The body has run, so a result left unstored would let a later call run it
/// again once the lease runs out: a store error (a dropped connection, a restarting server) is
/// retried with backoff until `until`. Retrying is safe: a stale token changes nothing
/// (fencing), and a retry that finds the key already completed under this call's own token
/// means an earlier attempt was stored but its reply was lost.
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
            "could not store the result; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Finishes storing a result in the background when the call is dropped while storing it.
struct FinishGuard<'a> {
    started: &'a Started<'a>,
    record: &'a [u8],
    ttl: Duration,
    armed: bool,
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::debug!(target: "idem", key = %self.started.key, token = self.started.token.0,
            "call dropped while storing its result; finishing in the background");
        // The dropped attempt may have been applied: `attempted = true`.
        self.started.complete_in_background(
            "a dropped call's result",
            self.record.to_vec(),
            self.ttl,
            true,
            None,
        );
    }
}

enum Claimed {
    /// The token, and whether the claim took over an expired lease.
    Token(FencingToken, bool),
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
                return Ok(Claimed::Token(token, takeover));
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

/// What a replayed record must match: the call's operation and schema version.
struct Expect {
    operation: Option<&'static str>,
    schema: u32,
}

fn replay<T: DeserializeOwned, E: From<Error>>(
    bytes: &[u8],
    errors: &ErrorPolicy<E>,
    expect: &Expect,
) -> Result<T, E> {
    let record = Record::decode(bytes)?;
    if record.outcome == Outcome::Unknown {
        return Err(Error::OutcomeUnknown {
            reason: String::from_utf8_lossy(record.payload).into_owned(),
        }
        .into());
    }
    let written_as = || {
        let mut found = format!("version {}", record.schema);
        if !record.operation.is_empty() {
            found = format!("{found} of `{}`", record.operation);
        }
        if !record.type_name.is_empty() {
            found = format!("{found}, written as `{}`", record.type_name);
        }
        found
    };
    let expected = |ty: &str| match expect.operation {
        Some(op) => format!("version {} of `{op}`, as `{ty}`", expect.schema),
        None => format!("version {}, as `{ty}`", expect.schema),
    };
    let mismatch = |ty: &str, why: Option<String>| {
        let mut found = written_as();
        if let Some(why) = why {
            found = format!("{found} ({why})");
        }
        Error::TypeMismatch {
            expected: expected(ty),
            found,
        }
    };
    // Records of version 1 (no operation) and of plain calls carry no operation to compare; a
    // different one cannot share a storage key unless SHA-256 collides, but is refused anyway.
    let other_operation = matches!(expect.operation, Some(op) if !record.operation.is_empty() && record.operation != op);
    // A payload that is valid JSON but does not decode is another shape of result (a
    // mismatch); one that is not JSON at all was damaged (corrupt).
    let decode = |ty: &str, result: serde_json::Result<()>| -> Result<()> {
        match result {
            Ok(()) => Ok(()),
            Err(e) => match serde_json::from_slice::<serde::de::IgnoredAny>(record.payload) {
                Ok(_) => Err(mismatch(ty, Some(format!("it does not decode: {e}")))),
                Err(_) => Err(Error::corrupt(format!(
                    "stored value is not valid JSON for `{ty}`: {e}"
                ))),
            },
        }
    };
    match record.outcome {
        Outcome::Ok => {
            let ty = type_name::<T>();
            if other_operation || record.schema != expect.schema {
                return Err(mismatch(ty, None).into());
            }
            let mut value = None;
            decode(
                ty,
                serde_json::from_slice(record.payload).map(|v| value = Some(v)),
            )?;
            Ok(value.expect("decoded"))
        }
        Outcome::Err => {
            let ty = type_name::<E>();
            let Some((_, decode_err)) = errors.codec else {
                // An error was kept by a build that cached errors; this one cannot decode errors.
                return Err(mismatch(
                    ty,
                    Some("a kept error, and this function does not keep errors".into()),
                )
                .into());
            };
            if other_operation || record.schema != expect.schema {
                return Err(mismatch(ty, None).into());
            }
            let mut value = None;
            decode(ty, decode_err(record.payload).map(|v| value = Some(v)))?;
            Err(value.expect("decoded"))
        }
        Outcome::Unknown => unreachable!("handled above"),
    }
}

/// Renews a claim's lease on a task of its own while the body runs, so that a body that is
/// busy or blocks its thread cannot starve the renewal; stops when dropped. Renewals are sent
/// every quarter of the lease without waiting for the previous one to answer (at most three
/// at once), so a slow store delays them without spacing them out. A renewal refused with
/// [`Error::LeaseLost`] marks the call's context lost, which the body can see.
struct Renewal {
    stop: tokio::task::AbortHandle,
}

impl Renewal {
    /// Starts renewing, or `None` if there is no handle to the store that a task can own (a
    /// borrowed store without [`Store::detached`]) or no runtime.
    fn start(
        store: Option<Arc<dyn Store>>,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
        context: CallContext,
    ) -> Option<Renewal> {
        let store = store?;
        let runtime = Handle::try_current().ok()?;
        let key = key.clone();
        let task = runtime.spawn(async move {
            let period = lease / 4;
            let mut renewals = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick(), if renewals.len() < 3 => {
                        let (store, key) = (store.clone(), key.clone());
                        renewals.spawn(async move { store.renew(&key, token, lease).await });
                    }
                    Some(done) = renewals.join_next() => match done {
                        Ok(Ok(())) => {
                            tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed")
                        }
                        Ok(Err(Error::LeaseLost)) => {
                            tracing::warn!(target: "idem", key = %key, token = token.0,
                                "lease lost while the body runs: another caller took the key over");
                            context.mark_lost();
                            return;
                        }
                        Ok(Err(e)) => {
                            bump(&COUNTERS.store_errors);
                            tracing::warn!(target: "idem", key = %key, error = %e, "lease renewal failed; will retry");
                        }
                        Err(_) => {}
                    },
                }
            }
        });
        Some(Renewal {
            stop: task.abort_handle(),
        })
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop.abort();
    }
}

/// Polls `body` to completion while renewing the lease every quarter of it, in the body's own
/// task: the fallback for stores without a [`Store::detached`] handle. The body is polled once
/// before any timer exists, so bodies that finish at once pay nothing for renewal.
async fn drive_renewing<F: Future>(
    store: &dyn Store,
    key: &StorageKey,
    token: FencingToken,
    lease: Duration,
    context: &CallContext,
    body: F,
) -> F::Output {
    let mut body = pin!(body);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll(cx))).await {
        return out;
    }
    let period = lease / 4;
    let mut tick = pin!(tokio::time::sleep(period));
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            out = body.as_mut() => return out,
            _ = tick.as_mut(), if !lost => {
                // Renew while still polling the body: a slow store must not stall it.
                let mut renew = store.renew(key, token, lease);
                let result = tokio::select! {
                    biased;
                    out = body.as_mut() => return out,
                    r = renew.as_mut() => r,
                };
                match result {
                    Ok(()) => tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed"),
                    Err(Error::LeaseLost) => {
                        lost = true;
                        context.mark_lost();
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
