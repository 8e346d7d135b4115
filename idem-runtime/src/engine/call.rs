//! The public builder: one idempotent call, and the two ways to run its body.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::{IntoKey, Operation, StorageKey};
use crate::metrics::{count, Event, Labels};
use crate::record::Expected;
use crate::served::{ReplayInfo, Served};
use crate::store::{default_store, IntoStore, Store};

use super::background::Background;
use super::claim::{claim, decode_stored, Claimed};
use super::decoded::{IntoReplayer, Replayer};
use super::finish::Holding;
use super::policy::{
    ErrorPolicy, IdempotentResult, IntoDuration, OnConflict, OnUnknown, DEFAULT_LEASE,
    DEFAULT_MAX_RECORD_BYTES, DEFAULT_RECOVERY, DEFAULT_TTL, MIN_LEASE,
};
use super::running::InPlace;

/// One idempotent call: where to look (store, key), what must match (fingerprint), and for how
/// long (ttl, lease). Build it, then [`run`](Call::run) the body.
///
/// A call owns everything it needs (its store is an `Arc`), so the work that must outlive its
/// caller (renewing the lease, storing a result after the caller left) can go on without it.
pub struct Call {
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) key: StorageKey,
    pub(crate) fingerprint: Option<Fingerprint>,
    /// Set by the macro's forms (`crate::__private`) when the key or fingerprint failed to
    /// derive: `run` returns it without running anything. Boxed: calls carry it rarely.
    pub(crate) failed: Option<Box<Error>>,
    pub(crate) operation: Option<Operation>,
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    max_record_bytes: usize,
    on_unknown: OnUnknown,
    recovery: Option<Duration>,
    version: u32,
    /// Whether a result is decoded back before it is stored, to refuse one that could not be
    /// replayed (see [`encode_payload`](crate::record::encode_payload)). Off only for types
    /// of this crate whose encoding is known to round-trip (the HTTP layer's responses).
    pub(crate) check_decodes: bool,
}

impl Call {
    /// A call under `key` (usually from [`StorageKey::derive`]). Defaults: no fingerprint, 24h
    /// ttl, 30s lease, reject conflicts, at-most-once for unknown outcomes, the process-wide
    /// store.
    pub fn new(key: StorageKey) -> Self {
        Call {
            store: None,
            key,
            fingerprint: None,
            failed: None,
            operation: None,
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_conflict: OnConflict::Reject,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            on_unknown: OnUnknown::Refuse,
            recovery: None,
            version: 0,
            check_decodes: true,
        }
    }

    /// The call of `operation` under `key` in `scope`, the call `#[idempotent(name = "...",
    /// key = ..., scope = ...)]` makes: its storage key is [`StorageKey::derive_for`]
    /// (SHA-256 of the operation's name, the scope and the key), and its record carries the
    /// operation's name, so a call built by hand finds the attribute's records and the other
    /// way round. Fails as [`StorageKey::derive_for`] does.
    pub fn for_operation(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        key: &(impl IntoKey + ?Sized),
    ) -> Result<Self> {
        let mut call = Call::new(StorageKey::derive_for(&operation, scope, key)?);
        call.operation = Some(operation);
        Ok(call)
    }

    /// The call of `operation` keyed by content, the call `#[idempotent]` makes without
    /// `key = ...`: the key is the fingerprint of the arguments (its hex digits, under the
    /// operation and scope as in [`for_operation`](Call::for_operation)), so equal arguments
    /// share one record; the fingerprint is also what must match.
    pub fn by_content(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        fingerprint: Fingerprint,
    ) -> Result<Self> {
        Ok(
            Call::for_operation(operation, scope, &fingerprint.to_hex())?
                .fingerprint(Some(fingerprint)),
        )
    }

    /// A call of `operation` that fails with `error` when run, without running anything (the
    /// macro's forms, whose key or fingerprint failed to derive).
    pub(crate) fn failed(operation: Operation, error: Error) -> Self {
        let mut call = Call::new(StorageKey::from_digest(&[0; 32]));
        call.failed = Some(Box::new(error));
        call.operation = Some(operation);
        call
    }

    /// Uses `store` instead of the process-wide one: a store by value, an `Arc` of one, or a
    /// reference to a store that is cheap to clone (every built-in store is).
    pub fn store(mut self, store: impl IntoStore) -> Self {
        self.store = Some(store.into_store());
        self
    }

    /// What must match when the key is reused; `None` turns the check off.
    pub fn fingerprint(mut self, fingerprint: Option<Fingerprint>) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// How long a completed result is kept and replayed.
    pub fn ttl(mut self, ttl: impl IntoDuration) -> Self {
        self.ttl = ttl.into_duration();
        self
    }

    /// How long a claim is held before another caller may take it over; renewed every quarter
    /// of it, by the lease keeper thread, while the body runs. At least [`MIN_LEASE`]; a shorter one
    /// is [`Error::Config`] and nothing runs.
    pub fn lease(mut self, lease: impl IntoDuration) -> Self {
        self.lease = lease.into_duration();
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
        self.version = version;
        self
    }

    /// How long a record of an unknown outcome refuses calls ([`OnUnknown::Refuse`]) before
    /// the key may run again. Default: [`DEFAULT_RECOVERY`] (1 hour), or the ttl if shorter.
    pub fn recovery(mut self, window: impl IntoDuration) -> Self {
        self.recovery = Some(window.into_duration());
        self
    }

    /// Runs `body` at most once per key: replays a stored result, or claims the key, runs the
    /// body, and stores its result (and `Err`s the `errors` policy keeps).
    ///
    /// The body runs inside this future: if the caller drops it (a timeout, a client that went
    /// away), the body stops at its next `.await`, and its outcome is unknown (see
    /// [`OnUnknown`]). Bodies that own their data can use [`run_detached`](Call::run_detached)
    /// instead, which finishes them.
    pub fn run<R, Fut>(self, errors: ErrorPolicy<R::Err>, body: Fut) -> impl Future<Output = R>
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        // Not an `async fn` (nor the wrappers below): each level of `async fn` would keep its
        // own copy of the call and the body in the future, and copy them into the next.
        self.run_with(errors, body, unchanged::<R::Ok>, None)
    }

    /// Like [`run`](Call::run), but once the key is claimed, the body and the storing of its
    /// result outlive the caller: they run in the caller's future while it waits and move to a
    /// task of their own if it stops waiting, where the body still runs to its end and its
    /// result is stored, so a retry gets it replayed (or [`Error::InFlight`] /
    /// waits while it runs) instead of an unknown outcome. The claim itself, and so a replay,
    /// happens in the caller. A panic in the body is re-raised in the caller.
    pub fn run_detached<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        self.run_detached_with(errors, body, unchanged::<R::Ok>, None)
    }

    /// [`run`](Call::run), replaying decoded values of types that are `Clone` (the
    /// `#[idempotent]` expansion's form: `replayer` comes from a [`Probe`](super::Probe) of the
    /// function's return type). Not public API.
    #[doc(hidden)]
    pub fn run_replaying<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        replayer: impl IntoReplayer<R::Ok>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        self.run_with(errors, body, unchanged::<R::Ok>, replayer.into_replayer())
    }

    /// [`run_detached`](Call::run_detached) with a replayer: see
    /// [`run_replaying`](Call::run_replaying). Not public API.
    #[doc(hidden)]
    pub fn run_detached_replaying<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        replayer: impl IntoReplayer<R::Ok>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        self.run_detached_with(errors, body, unchanged::<R::Ok>, replayer.into_replayer())
    }

    /// Adjusts replayed values: `hook` gets each value this call replays (never a fresh one,
    /// never a kept `Err`) with what is known of the replay, and returns what the caller gets,
    /// e.g. the value with a `replayed: true` field set. The stored record is not changed: every
    /// replay passes the stored value through the hook once. Like Powertools' `response_hook`;
    /// `#[idempotent(on_replay = path::to::hook)]` expands to it.
    ///
    /// Give it last: the [`OnReplay`] it returns only runs the call. See also
    /// [`observe`](crate::observe), which tells the caller whether its call was replayed.
    pub fn on_replay<T, F>(self, hook: F) -> OnReplay<F>
    where
        F: FnOnce(T, &ReplayInfo) -> T,
    {
        OnReplay { call: self, hook }
    }

    /// [`run`](Call::run), with `hook` applied to a replayed value.
    async fn run_with<R, Fut, H>(
        mut self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
        hook: H,
        replayer: Option<Replayer<R::Ok>>,
    ) -> R
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
        H: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        match self.begin::<R, H>(&errors, hook, replayer).await {
            Begun::Answer(answer, served) => {
                crate::served::record(|| served);
                answer
            }
            Begun::Claimed(holding) => {
                let ran = holding.served();
                let (out, _) = holding.finish(errors, body, None).await;
                if let Some(ran) = ran {
                    crate::served::record(|| ran);
                }
                out
            }
        }
    }

    /// [`run_detached`](Call::run_detached), with `hook` applied to a replayed value.
    fn run_detached_with<R, Fut, H>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
        hook: H,
        replayer: Option<Replayer<R::Ok>>,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
        H: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        Unwound {
            run: self.run_spawned(errors, body, hook, replayer),
        }
    }

    /// Claims (or replays) in the caller, then runs the body, and the storing of its outcome,
    /// so that they outlive the caller: in the caller's future while it waits, on a task of
    /// their own once it leaves ([`InPlace`], counted for a drain). The one path of a body that
    /// outlives its caller, for [`run_detached`](Call::run_detached) and the HTTP layer. A
    /// panic in the body is returned to the caller as [`Interrupted`] (after its unknown
    /// outcome was handled).
    pub(crate) async fn run_spawned<R, Fut, H>(
        mut self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
        hook: H,
        replayer: Option<Replayer<R::Ok>>,
    ) -> Result<R, Interrupted>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
        H: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        // Claim (or replay) in the caller; only a body that is to run moves to a task of its
        // own. A caller that leaves while the claim is on its way may leave the claim in flight
        // until its lease ends; the body has not started then, so nothing runs twice.
        let holding = match self.begin::<R, H>(&errors, hook, replayer).await {
            Begun::Answer(answer, served) => {
                crate::served::record(|| served);
                return Ok(answer);
            }
            Begun::Claimed(holding) => holding,
        };
        let labels = holding.background.labels;
        let runtime = holding.background.runtime.clone();
        let ran = holding.served();
        // The body runs here while the caller waits, and moves to a task of its own only if
        // the caller leaves (see `InPlace`).
        let body = InPlace::new(
            runtime,
            |cut| holding.finish(errors, body, Some(cut)),
            labels,
        );
        let out = body.await;
        if let Some(ran) = ran {
            crate::served::record(|| ran);
        }
        out.map_err(Interrupted::Panicked)
    }

    /// Checks the call, then claims its key: the answer (a replay, a refusal, an error), or the
    /// claim under which the body is to run.
    ///
    /// It borrows the call (its future holds a reference, not a second copy of the call).
    async fn begin<R, H>(
        &mut self,
        errors: &ErrorPolicy<R::Err>,
        hook: H,
        replayer: Option<Replayer<R::Ok>>,
    ) -> Begun<R>
    where
        R: IdempotentResult,
        H: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        let fail = |e: Error| Begun::Answer(R::from_result(Err(e.into())), Served::Refused);
        if let Some(e) = self.failed.take() {
            return fail(*e);
        }
        let (key, fingerprint) = (self.key.clone(), self.fingerprint);
        if self.lease < MIN_LEASE {
            return fail(Error::config(format!(
                "a lease of {:?} is shorter than the minimum of {MIN_LEASE:?}: it would expire before the claim could be renewed, and concurrent callers would all run the body",
                self.lease
            )));
        }
        let store = self.store.take().unwrap_or_else(default_store);
        if let Some(op) = &self.operation {
            if !op.is_stable() && store.durable() {
                return fail(Error::config(format!(
                    "`{}` has no stable name, and its store ({}) keeps records across deploys: a name taken from the function's path changes when the function moves or is renamed, and live keys would run the body again. Add `name = \"...\"` to its #[idempotent(...)], e.g. `name = \"billing.charge\"`, and keep it when the function moves",
                    op.name(),
                    store.backend()
                )));
            }
        }
        let operation = self.operation.map(|op| op.name());
        let labels = Labels::new(operation, store.backend());
        let expect = Expected {
            operation,
            result_version: self.version,
        };
        let claimed = claim(
            &*store,
            &key,
            fingerprint.as_ref(),
            self.lease,
            self.on_conflict,
            labels,
        )
        .await;
        let (token, takeover, claimed_at) = match claimed {
            Ok(Claimed::Token(token, takeover, sent)) => (token, takeover, sent),
            Ok(Claimed::Replay(bytes)) => {
                count(Event::Hit, labels);
                tracing::debug!(target: "idem", key = %key, "replay");
                if let Some(kept) = replayer.and_then(|r| (r.get)(&key, &bytes, &expect)) {
                    let info = ReplayInfo::new(key, kept.token, kept.completed_at_ms, false);
                    let value = hook(kept.value, &info);
                    return Begun::Answer(R::from_result(Ok(value)), Served::Replayed(info));
                }
                return match decode_stored::<R::Ok, R::Err>(&key, &bytes, errors, &expect) {
                    Ok((Ok(value), info)) => {
                        if let Some(r) = replayer {
                            (r.put)(
                                &key,
                                &bytes,
                                &expect,
                                info.token().0,
                                info.completed_at_ms(),
                                &value,
                            );
                        }
                        let value = hook(value, &info);
                        Begun::Answer(R::from_result(Ok(value)), Served::Replayed(info))
                    }
                    Ok((Err(kept), info)) => {
                        Begun::Answer(R::from_result(Err(kept)), Served::Replayed(info))
                    }
                    Err(e) => Begun::Answer(R::from_result(Err(e)), Served::Refused),
                };
            }
            Err(e) => return fail(e),
        };
        Begun::Claimed(Box::new(Holding {
            background: Background::new(store, key, token, labels),
            fingerprint,
            takeover,
            claimed_at,
            expect,
            ttl: self.ttl,
            lease: self.lease,
            max_record_bytes: self.max_record_bytes,
            on_unknown: self.on_unknown,
            recovery: self.recovery.unwrap_or(DEFAULT_RECOVERY.min(self.ttl)),
            check_decodes: self.check_decodes,
            renewal: Default::default(),
            steps: Default::default(),
        }))
    }
}

/// The hook of a call without one: the replayed value as it was stored.
pub(crate) fn unchanged<T>(value: T, _: &ReplayInfo) -> T {
    value
}

/// A [`Call`] with a hook that adjusts replayed values: see [`Call::on_replay`].
pub struct OnReplay<F> {
    call: Call,
    hook: F,
}

impl<F> OnReplay<F> {
    /// [`Call::run`], with the hook applied to a replayed value.
    pub fn run<R, Fut>(self, errors: ErrorPolicy<R::Err>, body: Fut) -> impl Future<Output = R>
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
        F: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        self.call.run_with(errors, body, self.hook, None)
    }

    /// [`Call::run_detached`], with the hook applied to a replayed value (in the caller, where
    /// replays happen).
    pub fn run_detached<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
        F: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        self.call.run_detached_with(errors, body, self.hook, None)
    }

    /// [`run`](OnReplay::run) with a replayer: see [`Call::run_replaying`]. Not public API.
    #[doc(hidden)]
    pub fn run_replaying<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        replayer: impl IntoReplayer<R::Ok>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
        F: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        self.call
            .run_with(errors, body, self.hook, replayer.into_replayer())
    }

    /// [`run_detached`](OnReplay::run_detached) with a replayer: see
    /// [`Call::run_replaying`]. Not public API.
    #[doc(hidden)]
    pub fn run_detached_replaying<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        replayer: impl IntoReplayer<R::Ok>,
        body: Fut,
    ) -> impl Future<Output = R>
    where
        R: IdempotentResult + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
        F: FnOnce(R::Ok, &ReplayInfo) -> R::Ok,
    {
        self.call
            .run_detached_with(errors, body, self.hook, replayer.into_replayer())
    }
}

/// Why a body run by [`Call::run_spawned`] gave its caller no answer.
pub(crate) enum Interrupted {
    /// The body panicked (its unknown outcome was handled); the panic's payload.
    Panicked(Box<dyn std::any::Any + Send>),
}

pin_project_lite::pin_project! {
    /// [`Call::run_spawned`]'s future, with a panic of the body raised again in the caller.
    struct Unwound<F> {
        #[pin]
        run: F,
    }
}

impl<F, R> Future for Unwound<F>
where
    F: Future<Output = Result<R, Interrupted>>,
{
    type Output = R;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<R> {
        match std::task::ready!(self.project().run.poll(cx)) {
            Ok(out) => std::task::Poll::Ready(out),
            Err(Interrupted::Panicked(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

/// What [`Call::begin`] found.
enum Begun<R> {
    /// The call's answer: a replay, a refusal or an error, and how it was served. Nothing
    /// runs.
    Answer(R, Served),
    /// The key is claimed: run the body under it.
    Claimed(Box<Holding>),
}
