//! Running the body under a claim, and what follows it: storing the result, releasing the
//! claim, or recording an unknown outcome, in the caller or (when the caller is gone) in the
//! background.

use std::any::type_name;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::context::{CallContext, Deadline};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Stopwatch, StoreOp};
use crate::record::{encode_payload, Expected, Outcome, Record};
use crate::served::{self, Served};
use crate::store::FencingToken;

use super::background::Background;
use super::policy::{ErrorPolicy, IdempotentResult, OnUnknown};
use super::renewal::Renewal;
use super::running::{Cut, Ended};
use super::step::StepBook;
use super::storing::{store_with_retries, Patience};

/// A claimed key and everything needed to run the body under it, store its outcome, and do the
/// work that outlives the caller. Owned (`'static`), so that it can move to a task of its own.
pub(super) struct Holding {
    pub(super) background: Background,
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) takeover: bool,
    /// When the claim was sent: the holder's lease runs from then, by its own clock.
    pub(super) claimed_at: Instant,
    pub(super) expect: Expected<'static>,
    pub(super) ttl: Duration,
    pub(super) lease: Duration,
    pub(super) max_record_bytes: usize,
    pub(super) on_unknown: OnUnknown,
    /// How long a record of an unknown outcome refuses calls.
    pub(super) recovery: Duration,
    /// Whether a result is decoded back before it is stored (see `Call::check_decodes`).
    pub(super) check_decodes: bool,
    /// The lease's renewal once the body has ended, kept until the outcome is stored.
    pub(super) renewal: Mutex<Option<Renewal>>,
    /// The call's steps, once the body is about to run.
    pub(super) steps: OnceLock<Arc<StepBook>>,
}

/// How storing an outcome ended.
enum Stored {
    Landed,
    Lost,
    /// Not stored yet (the store kept failing); a background task goes on trying.
    Pending(Error),
}

impl Holding {
    fn key(&self) -> &StorageKey {
        &self.background.key
    }

    fn token(&self) -> FencingToken {
        self.background.token
    }

    /// How the call is served, for an [`observe`](crate::observe) that listens (`None` if none
    /// does, so that nothing is cloned for nobody).
    pub(super) fn served(&self) -> Option<Served> {
        served::observing().then(|| Served::Ran {
            key: self.key().clone(),
            token: self.token(),
            takeover: self.takeover,
        })
    }

    /// Runs the body under the claim, then stores its outcome (or releases, or records an
    /// unknown outcome). The lease is renewed meanwhile (see [`Renewal`]). `cut`: for a body
    /// that may outlive its caller, what tells it that [`drain`](super::running::drain) cuts it
    /// off: it is dropped then, and its unknown outcome recorded before this returns.
    pub(super) async fn finish<R, Fut>(
        self,
        errors: ErrorPolicy<R::Err>,
        body: Fut,
        cut: Option<Arc<Cut>>,
    ) -> (R, Ended)
    where
        R: IdempotentResult,
        Fut: Future<Output = R>,
    {
        // No value of `R::Ok` or `R::Err` is held across an `.await` (only `R`), so that the
        // future is `Send` whenever `R` and the body are, as `run_detached` needs.
        let fail = |e: Error| R::from_result(Err(e.into()));
        let (key, token) = (self.key(), self.token());
        let labels = self.background.labels;
        count(Event::Miss, labels);
        tracing::debug!(target: "idem", key = %key, token = token.0, "claimed");
        let mut guard = StartedGuard {
            holding: &self,
            armed: true,
        };
        let deadline = Arc::new(Deadline::new(self.claimed_at, self.lease));
        let steps = Arc::new(StepBook::new(
            self.background.store.clone(),
            labels,
            self.fingerprint,
            self.expect,
            self.ttl,
            self.max_record_bytes,
            &errors,
        ));
        if self.takeover {
            // Until they are loaded, the holder before may have left steps: an interruption
            // now must keep them.
            steps.may_hold_steps();
        }
        let _ = self.steps.set(steps.clone());
        let context = CallContext::new(
            key.clone(),
            token,
            self.takeover,
            deadline.clone(),
            steps.clone(),
        );
        // Registered with the keeper thread before the body is first polled: a body that
        // blocks its thread from the start keeps its lease all the same.
        let renewal = Renewal::start(
            &self.background,
            self.lease,
            self.claimed_at,
            context.clone(),
            deadline,
        );
        if self.takeover {
            // The steps the holder before completed, replayed rather than run again.
            let loaded = timed(
                StoreOp::LoadSteps,
                labels,
                self.background.store.load_steps(key, token),
            )
            .await;
            match loaded.and_then(|loaded| steps.loaded(key, loaded)) {
                Ok(()) => {}
                Err(e) => {
                    guard.armed = false;
                    if matches!(e, Error::Store { .. } | Error::StoreFull { .. }) {
                        count(Event::StoreError, labels);
                    }
                    tracing::warn!(target: "idem", key = %key, token = token.0, error = %e,
                        "could not load the steps of the call taken over; suspending it");
                    self.suspend().await;
                    return (fail(e), Ended::Finished);
                }
            }
        }
        // From here on the body may have done its side effect.
        let ran = Stopwatch::start();
        let body = catch_unwind(context.scope(body));
        let output = match &cut {
            None => Some(body.await),
            Some(cut) => tokio::select! {
                biased;
                output = body => Some(output),
                _ = cut.cancelled() => None,
            },
        };
        ran.body_ended(labels);
        renewal.body_ended();
        // Renewal goes on until the outcome is stored (or the claim released): a store that is
        // down when the body ends must not let the lease lapse unnoticed.
        *self.renewal.lock().unwrap_or_else(|p| p.into_inner()) = Some(renewal);
        let output = match output {
            Some(Ok(output)) => output,
            None => {
                // Cut off by a drain: the body was dropped mid-way.
                guard.armed = false;
                let reason = "the process shut down while the body ran (cut off by drain)";
                let recorded = self.unknown(reason).await;
                if let Some(cut) = &cut {
                    cut.cut_off(recorded);
                }
                let e = Error::OutcomeUnknown {
                    reason: reason.into(),
                    key: Some(key.clone()),
                };
                return (fail(e), Ended::CutOff);
            }
            Some(Err(panic)) => {
                // Record the unknown outcome before the panic goes on, so that a retry that
                // follows it finds the record rather than the claim.
                guard.armed = false;
                self.unknown("the body panicked").await;
                std::panic::resume_unwind(panic)
            }
        };

        // Decide what to keep while the value is at hand, then hold it as `R` again (in a
        // block, so that no `Result<R::Ok, R::Err>` lives across an `.await`).
        let (output, kept, unknown_err) = {
            let result = output.into_result();
            let kept = match &result {
                Ok(v) if !self.check_decodes => {
                    Some((Outcome::Ok, serde_json::to_vec(v), type_name::<R::Ok>()))
                }
                Ok(v) => Some((
                    Outcome::Ok,
                    encode_payload(serde_json::to_vec(v), |b| {
                        serde_json::from_slice::<R::Ok>(b)
                    }),
                    type_name::<R::Ok>(),
                )),
                Err(e) => match (errors.keep, errors.codec) {
                    (Some(keep), Some((encode, decode))) if keep(e) => Some((
                        Outcome::Err,
                        encode_payload(encode(e), decode),
                        type_name::<R::Err>(),
                    )),
                    _ => None,
                },
            };
            let unknown_err =
                matches!((&result, errors.unknown), (Err(e), Some(unknown)) if unknown(e));
            (R::from_result(result), kept, unknown_err)
        };
        guard.armed = false;
        let Some((outcome, payload, type_name)) = kept else {
            if unknown_err {
                self.unknown("the response could not be kept").await;
            } else {
                self.release().await;
            }
            return (output, Ended::Finished);
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                self.unknown(&format!("the result could not be encoded as JSON: {e}"))
                    .await;
                return (fail(Error::Encode(e)), Ended::Finished);
            }
        };
        let record = Record {
            fingerprint: self.fingerprint,
            type_name,
            operation: self.expect.operation.unwrap_or(""),
            result_version: self.expect.result_version,
            ..Record::now(outcome, token.0, self.ttl, &payload)
        }
        .encode_checked(self.max_record_bytes);
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                self.unknown(&format!("the result was not stored: {e}"))
                    .await;
                return (fail(e), Ended::Finished);
            }
        };
        let output = match self.store(record, self.ttl).await {
            Stored::Landed => {
                tracing::debug!(target: "idem", key = %key, token = token.0, ?outcome, "completed");
                output
            }
            Stored::Lost => {
                count(Event::LeaseLost, labels);
                tracing::warn!(target: "idem", key = %key, token = token.0,
                    "lease lost before completion: the newer holder's result stands");
                fail(Error::lease_lost(key))
            }
            Stored::Pending(e) => {
                // The store stayed unreachable for a whole lease after the body ran. The body's
                // effect is real, so the caller gets its result; storing goes on in the
                // background and lands as long as nobody took the key over.
                count(Event::ResultUnstored, labels);
                tracing::error!(target: "idem", key = %key, token = token.0, error = %e,
                    "could not store the result yet; returning it, and storing it in the background");
                output
            }
        };
        (output, Ended::Finished)
    }

    /// Stores `record`, retrying store errors for up to a lease while the caller waits, then in
    /// the background (see [`store_with_retries`]).
    async fn store(&self, record: Vec<u8>, ttl: Duration) -> Stored {
        let until = Instant::now() + self.lease;
        // If this call is dropped while storing (a client went away), storing finishes in the
        // background: the body ran, and its result must not be lost.
        let mut finish = FinishGuard {
            holding: self,
            record: &record,
            ttl,
            armed: true,
        };
        let bg = &self.background;
        let stored = store_with_retries(
            &*bg.store,
            &bg.key,
            bg.token,
            &record,
            ttl,
            false,
            Patience::Caller(until),
            bg.labels,
        )
        .await;
        finish.armed = false;
        drop(finish);
        match stored {
            Ok(()) => {
                drop(self.take_renewal());
                Stored::Landed
            }
            Err(Error::LeaseLost { .. }) => {
                drop(self.take_renewal());
                Stored::Lost
            }
            Err(e) => {
                bg.store_later("a result", record, ttl, true, self.take_renewal());
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

    /// The claim is being released: the renewal stops, and the release is counted. The first
    /// half of [`release`](Self::release) and [`release_in_background`](Self::release_in_background).
    fn releasing(&self) {
        drop(self.take_renewal());
        count(Event::Release, self.background.labels);
    }

    /// Whether the call is to be resumed (a step was begun, or the store may hold steps of it):
    /// then its claim is suspended, never released nor recorded as an unknown outcome (see
    /// [`step`](super::step)).
    fn has_steps(&self) -> bool {
        self.steps.get().is_some_and(|s| s.kept())
    }

    /// Suspends the claim of a call whose steps the store may hold: its lease ends now, its
    /// steps stay, and the next call with the key takes it over and resumes (a release, or a
    /// record of an unknown outcome, would throw the steps away). Whether the store took it.
    async fn suspend(&self) -> bool {
        drop(self.take_renewal());
        let labels = self.background.labels;
        let (key, token) = (self.key(), self.token());
        let suspended = self.background.store.renew(key, token, Duration::ZERO);
        match timed(StoreOp::Renew, labels, suspended).await {
            Ok(()) => {
                tracing::info!(target: "idem", key = %key, token = token.0,
                    "suspended with its steps; the next call with this key resumes it");
                true
            }
            Err(e) => {
                let lost = matches!(e, Error::LeaseLost { .. });
                if !lost {
                    count(Event::StoreError, labels);
                }
                tracing::warn!(target: "idem", key = %key, error = %e,
                    "suspend failed; the lease will expire, and the next call resumes then");
                lost
            }
        }
    }

    /// Releases the claim: nothing happened that a retry must not repeat (a call with steps is
    /// [suspended](Self::suspend) instead). Whether the store took it (a claim already lost
    /// counts: there is nothing left to release).
    async fn release(&self) -> bool {
        if self.has_steps() {
            return self.suspend().await;
        }
        self.releasing();
        let labels = self.background.labels;
        let (key, token) = (self.key(), self.token());
        match timed(
            StoreOp::Release,
            labels,
            self.background.store.release(key, token),
        )
        .await
        {
            Ok(()) => {
                tracing::debug!(target: "idem", key = %key, token = token.0, "released");
                true
            }
            Err(e) => {
                let lost = matches!(e, Error::LeaseLost { .. });
                if !lost {
                    count(Event::StoreError, labels);
                }
                tracing::warn!(target: "idem", key = %key, error = %e, "release failed; the lease will expire");
                lost
            }
        }
    }

    /// [`release`](Self::release) from a destructor.
    fn release_in_background(&self, reason: &'static str) {
        if self.has_steps() {
            drop(self.take_renewal());
            tracing::debug!(target: "idem", key = %self.key(), token = self.token().0, reason, "suspending");
            self.background.give_back(true);
            return;
        }
        self.releasing();
        tracing::debug!(target: "idem", key = %self.key(), token = self.token().0, reason, "releasing");
        self.background.give_back(false);
    }

    /// The one rule for a body whose outcome is unknown, in the caller and in a destructor
    /// alike: record it ([`OnUnknown::Refuse`]: the record to store) or release the claim
    /// ([`OnUnknown::Rerun`]).
    fn unknown_outcome(&self, reason: &str) -> Unknown {
        let (key, token) = (self.key(), self.token());
        if self.has_steps() {
            // The steps that completed are known; the one running, if any, may run again.
            tracing::warn!(target: "idem", key = %key, token = token.0, reason,
                "interrupted in a body with steps; keeping them for the next call to resume");
            return Unknown::Suspend;
        }
        count(Event::UnknownOutcome, self.background.labels);
        match self.on_unknown {
            OnUnknown::Rerun => {
                tracing::warn!(target: "idem", key = %key, token = token.0, reason,
                    "outcome unknown; releasing (at least once)");
                Unknown::Release
            }
            OnUnknown::Refuse => {
                tracing::warn!(target: "idem", key = %key, token = token.0, reason,
                    "outcome unknown; recording it, calls with this key are refused (at most once)");
                Unknown::Record(
                    Record {
                        // The operation, so that a row of an unknown outcome says whose it is.
                        operation: self.expect.operation.unwrap_or(""),
                        ..Record::unknown(token.0, reason, self.recovery)
                    }
                    .encode(),
                )
            }
        }
    }

    /// Handles an unknown outcome per [`unknown_outcome`](Self::unknown_outcome), awaited.
    /// Whether that reached the store (a record left to the background, or a failed release,
    /// did not).
    async fn unknown(&self, reason: &str) -> bool {
        match self.unknown_outcome(reason) {
            Unknown::Release => self.release().await,
            Unknown::Suspend => self.suspend().await,
            Unknown::Record(record) => match self.store(record, self.recovery).await {
                Stored::Pending(e) => {
                    tracing::error!(target: "idem", key = %self.key(), token = self.token().0, error = %e,
                        "could not record the unknown outcome yet; still trying in the background");
                    false
                }
                Stored::Landed | Stored::Lost => true,
            },
        }
    }

    /// Handles an unknown outcome per [`unknown_outcome`](Self::unknown_outcome), from a
    /// destructor: in the background.
    fn unknown_in_background(&self, reason: &'static str) {
        match self.unknown_outcome(reason) {
            Unknown::Release | Unknown::Suspend => self.release_in_background(reason),
            Unknown::Record(record) => {
                let renewal = self.take_renewal();
                self.background.store_later(
                    "an unknown outcome",
                    record,
                    self.recovery,
                    false,
                    renewal,
                );
            }
        }
    }
}

/// What [`Holding::unknown_outcome`] decided.
enum Unknown {
    /// Release the claim (at least once).
    Release,
    /// Suspend the claim: the store may hold its steps.
    Suspend,
    /// Store this record of the unknown outcome (at most once).
    Record(Vec<u8>),
}

/// Records an unknown outcome (or releases, per [`OnUnknown`]) when the body panics or the
/// call's future is dropped while the body runs.
struct StartedGuard<'a> {
    holding: &'a Holding,
    armed: bool,
}

impl Drop for StartedGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if std::thread::panicking() {
            self.holding.unknown_in_background("the body panicked");
        } else {
            self.holding
                .unknown_in_background("the call was abandoned while its body ran");
        }
    }
}

/// Finishes storing a result in the background when the call is dropped while storing it.
struct FinishGuard<'a> {
    holding: &'a Holding,
    record: &'a [u8],
    ttl: Duration,
    armed: bool,
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::debug!(target: "idem", key = %self.holding.key(), token = self.holding.token().0,
            "call dropped while storing its result; finishing in the background");
        // The dropped attempt may have been applied: `attempted = true`.
        self.holding.background.store_later(
            "a dropped call's result",
            self.record.to_vec(),
            self.ttl,
            true,
            None,
        );
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
