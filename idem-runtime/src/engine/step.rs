//! Durable steps: a body's side effects recorded one by one, so that a call taken over after a
//! crash replays the steps that completed and runs only the rest.
//!
//! A step's `Ok` value (and an `Err` the call's [`ErrorPolicy`] keeps) is stored in the call's
//! record under the step's name with [`Store::save_step`], fenced by the call's token: a holder
//! that lost its lease cannot record a step. A call that took the key over loads the steps of
//! the holder before it ([`Store::load_steps`], once, before its body runs); a call that did not
//! take over starts with none, so a first run costs one store round trip per step and a replay
//! of a completed call none at all (its body does not run).
//!
//! What becomes of the steps when the body does not complete is the engine's rule, written in
//! [`Holding`](super::finish): once the body has begun a step (or the call took over steps of
//! an earlier holder), the claim is never released nor turned into an unknown outcome (either
//! would throw the steps away, and the next call would run them all again); it is
//! *suspended*: its lease ends at once and its steps stay, so the next call takes the key over
//! and resumes. The step that was running then runs again, as after a crash: a body that uses
//! steps has said which of its effects must not repeat, so `on_unknown` (which refuses the key
//! after an interruption) governs only bodies that have not begun a step.

use std::any::type_name;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::context::{self, CallContext};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Labels, StoreOp};
use crate::record::{encode_payload, Expected, Outcome, Record};
use crate::store::Store;

use super::claim::decode_stored;
use super::policy::{ErasedPolicy, ErrorPolicy, Storable};

/// The longest step name, in bytes.
pub const MAX_STEP_NAME_LEN: usize = 256;

/// The longest pause between attempts to save a step.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Runs `body` as the step `name` of the idempotent call whose body is running on this task,
/// at most once per call: its `Ok` value is stored in the call's record before it is returned,
/// and a call that resumes this one (it took the key over after a crash, or after this call was
/// interrupted) gets the stored value back without running `body`.
///
/// ```
/// # use idem_runtime as idempotency;
/// use idempotency::{step, Call, ErrorPolicy, Error, MemoryStore, StorageKey};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let store = MemoryStore::new();
/// let receipt: Result<String, Error> = Call::new(StorageKey::derive("orders", "o-1")?)
///     .store(&store)
///     .run(ErrorPolicy::never(), async {
///         let charge: String = step("charge", async { Ok::<_, Error>("ch_1".to_string()) }).await?;
///         step("email", async { Ok::<_, Error>(()) }).await?;
///         for i in 0..3 {
///             step(format!("ledger-{i}"), async { Ok::<_, Error>(i) }).await?;
///         }
///         Ok(charge)
///     })
///     .await;
/// assert_eq!(receipt?, "ch_1");
/// # Ok(()) }
/// ```
///
/// What is guaranteed, per step:
///
/// - a step that **completed** (its value was stored) runs at most once per call, also when the
///   process dies afterwards: the caller that takes the key over replays it;
/// - the step that was **running** when the process died (or whose value could not be stored)
///   may run again when the call resumes: make it idempotent itself, or give its downstream
///   system an idempotency key of its own, [`step_key`], the same in every run of the call;
/// - a step's `Err` is not stored unless the call keeps it (`cache_errors`: the same policy,
///   for steps whose error type is the function's); the step runs again when the call resumes;
/// - once a step has begun, a call that does not complete (its body returned an `Err` it does
///   not keep, panicked, or was dropped by its caller) is left to be resumed by the next call
///   with its key, at once: `on_unknown` governs only a body that has not begun a step.
///
/// Errors (as `E`, through `From<idempotency::Error>`), none of which runs `body`:
/// [`Error::Misuse`] outside an idempotent call (or in a task the body spawned: pass the
/// [`CallContext`] and use [`CallContext::step`]), for a name used twice in one call, or an
/// empty or too long name (over [`MAX_STEP_NAME_LEN`] bytes); [`Error::TypeMismatch`] when a
/// resumed call finds the step stored as another type; [`Error::LeaseLost`] once the call's
/// claim is lost; [`Error::Config`] on a store that cannot keep steps. After `body` ran:
/// [`Error::LeaseLost`] if the call lost its claim meanwhile (the step's value is not recorded;
/// the caller that took over runs the step itself), a store error once saving kept failing
/// until the lease's end, [`Error::Encode`] or [`Error::TooLarge`] for a value that cannot be
/// stored.
pub async fn step<T, E, F>(name: impl AsRef<str>, body: F) -> Result<T, E>
where
    T: Storable,
    E: From<Error> + 'static,
    F: Future<Output = Result<T, E>>,
{
    match context::current() {
        Some(call) => call.step(name, body).await,
        None => Err(Error::misuse(format!(
            "step `{}` outside an idempotent call: `step` records its value in the record of the call whose body runs it; call it inside an #[idempotent] function's body or an IdempotencyLayer handler (in a task the body spawned, pass the CallContext along and use CallContext::step)",
            name.as_ref()
        ))
        .into()),
    }
}

/// An idempotency key for the downstream system of the step `name` of the call whose body is
/// running on this task: 64 hex digits derived from the call's storage key and the name, the
/// same in every run of the call (also after a takeover), different for every other call or
/// step. Give it to a payment processor's `Idempotency-Key` so that a step that runs again
/// after a crash is deduplicated there. [`Error::Misuse`] outside an idempotent call.
pub fn step_key(name: &str) -> Result<String> {
    context::current()
        .map(|call| call.step_key(name))
        .ok_or_else(|| {
            Error::misuse(format!(
                "step_key(`{name}`) outside an idempotent call: the key is derived from the storage key of the call whose body asks"
            ))
        })
}

/// What a call's steps need to know of it, and which of its steps are known.
pub(crate) struct StepBook {
    store: Arc<dyn Store>,
    labels: Labels,
    fingerprint: Option<Fingerprint>,
    expect: Expected<'static>,
    ttl: Duration,
    max_record_bytes: usize,
    /// The call's error policy, for steps whose error type is the call's.
    errors: Option<ErasedPolicy>,
    book: Mutex<Book>,
}

// A context stays unwind safe (as it was before steps): the book's state is behind a mutex
// whose poisoning is ignored on purpose (each update leaves it consistent), and the store and
// the erased policy are only read.
impl std::panic::RefUnwindSafe for StepBook {}
impl std::panic::UnwindSafe for StepBook {}

#[derive(Default)]
struct Book {
    /// The names of the steps begun in this run of the body.
    /// (Maps made on first use: a call without steps pays nothing for them.)
    begun: Option<HashSet<Box<str>>>,
    /// The steps an earlier holder completed (loaded after a takeover), until replayed.
    done: Option<HashMap<Box<str>, Bytes>>,
    /// Whether the call is to be resumed rather than released or refused: a step was begun in
    /// this run, or the store may hold steps of an earlier holder.
    kept: bool,
}

impl StepBook {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new<E>(
        store: Arc<dyn Store>,
        labels: Labels,
        fingerprint: Option<Fingerprint>,
        expect: Expected<'static>,
        ttl: Duration,
        max_record_bytes: usize,
        errors: &ErrorPolicy<E>,
    ) -> Self {
        StepBook {
            store,
            labels,
            fingerprint,
            expect,
            ttl,
            max_record_bytes,
            errors: errors.erase.map(|erase| erase(errors)),
            book: Mutex::default(),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store may hold steps of this call (it took the key over, and they are not loaded
    /// yet).
    pub(super) fn may_hold_steps(&self) {
        self.book().kept = true;
    }

    /// The steps a holder before this one completed, loaded after a takeover. They must be
    /// of this call's request: a step stored with another fingerprint is [`Error::KeyReuse`]
    /// (the key was reused for another request while the first was unfinished; its steps are
    /// kept for its own retry), a damaged one [`Error::Corrupt`].
    pub(super) fn loaded(&self, key: &StorageKey, steps: Vec<(String, Bytes)>) -> Result<()> {
        for (_, record) in &steps {
            let record = Record::decode(record).map_err(|e| e.with_key(key))?;
            if matches!((record.fingerprint, self.fingerprint), (Some(a), Some(b)) if a != b) {
                return Err(Error::KeyReuse {
                    key: Some(key.clone()),
                });
            }
        }
        let mut book = self.book();
        book.kept = !steps.is_empty();
        book.done = Some(
            steps
                .into_iter()
                .map(|(name, record)| (name.into_boxed_str(), record))
                .collect(),
        );
        Ok(())
    }

    /// Whether the call is to be resumed: a step was begun, or the store may hold steps of
    /// it, so that its claim must be suspended rather than released or turned into an unknown
    /// outcome.
    pub(super) fn kept(&self) -> bool {
        self.book().kept
    }

    /// Marks `name` begun in this run: its stored record if an earlier holder completed it.
    fn begin(&self, name: &str) -> Result<Option<Bytes>> {
        if name.is_empty() || name.len() > MAX_STEP_NAME_LEN {
            return Err(Error::misuse(format!(
                "a step name must be 1 to {MAX_STEP_NAME_LEN} bytes long; got {} bytes",
                name.len()
            )));
        }
        let mut book = self.book();
        book.kept = true;
        if !book.begun.get_or_insert_default().insert(name.into()) {
            return Err(Error::misuse(format!(
                "step `{name}` ran twice in one call: a step's name identifies its stored value, so two steps may not share one (name the steps of a loop `format!(\"item-{{i}}\")`)"
            )));
        }
        Ok(book.done.as_mut().and_then(|done| done.remove(name)))
    }

    /// The encoded record of a step's `Ok` value, or of an `Err` the call keeps; `None` for an
    /// `Err` it does not keep.
    fn encode<T: Storable, E: 'static>(
        &self,
        out: &Result<T, E>,
        token: u64,
    ) -> Option<Result<Vec<u8>>> {
        let (outcome, payload, ty) = match out {
            Ok(v) => (
                Outcome::Ok,
                encode_payload(serde_json::to_vec(v), |b| serde_json::from_slice::<T>(b)),
                type_name::<T>(),
            ),
            Err(e) => {
                let policy = self.errors.as_ref()?.downcast_ref::<ErrorPolicy<E>>()?;
                match (policy.keep, policy.codec) {
                    (Some(keep), Some((encode, decode))) if keep(e) => (
                        Outcome::Err,
                        encode_payload(encode(e), decode),
                        type_name::<E>(),
                    ),
                    _ => return None,
                }
            }
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => return Some(Err(Error::Encode(e))),
        };
        Some(
            Record {
                fingerprint: self.fingerprint,
                type_name: ty,
                operation: self.expect.operation.unwrap_or(""),
                result_version: self.expect.result_version,
                ..Record::now(outcome, token, self.ttl, &payload)
            }
            .encode_checked(self.max_record_bytes),
        )
    }

    /// Saves the step `name`, retrying store errors with backoff until the call's lease ends by
    /// its own clock (a lost reply is harmless: saving again replaces the step).
    async fn save(&self, call: &CallContext, name: &str, record: &[u8]) -> Result<()> {
        let (key, token) = (call.key(), call.token());
        let mut pause = Duration::from_millis(10);
        loop {
            let saved = timed(
                StoreOp::SaveStep,
                self.labels,
                self.store.save_step(key, token, name, record),
            )
            .await;
            let error = match saved {
                Ok(()) => return Ok(()),
                Err(e @ Error::LeaseLost { .. }) => {
                    call.mark_lost();
                    return Err(e);
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + pause >= call.deadline() {
                return Err(error);
            }
            count(Event::StoreError, self.labels);
            tracing::warn!(target: "idem", key = %key, token = token.0, step = name, error = %error,
                "could not save a step; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// A stored step, as the step's `Ok` or kept `Err`.
    fn replay<T: Storable, E: From<Error> + 'static>(
        &self,
        call: &CallContext,
        record: &[u8],
    ) -> Result<T, E> {
        let never = ErrorPolicy::never();
        let errors = self
            .errors
            .as_ref()
            .and_then(|p| p.downcast_ref::<ErrorPolicy<E>>())
            .unwrap_or(&never);
        let (out, _) = decode_stored::<T, E>(call.key(), record, errors, &self.expect)?;
        out
    }
}

/// [`CallContext::step`]: runs `body` as the step `name` of `call`.
pub(crate) async fn run<T, E, F>(call: &CallContext, name: &str, body: F) -> Result<T, E>
where
    T: Storable,
    E: From<Error> + 'static,
    F: Future<Output = Result<T, E>>,
{
    let book = call.steps();
    if !book.store.keeps_steps() {
        return Err(Error::config(format!(
            "step `{name}`: the {} store cannot keep the steps of a call (it does not implement Store::save_step); nothing ran",
            book.store.backend()
        ))
        .into());
    }
    if let Some(record) = book.begin(name)? {
        tracing::debug!(target: "idem", key = %call.key(), token = call.token().0, step = name,
            "step replayed");
        return book.replay(call, &record);
    }
    // A claim already lost: the caller that took over runs the step.
    call.check()?;
    let out = body.await;
    if let Some(record) = book.encode(&out, call.token().0) {
        book.save(call, name, &record?).await?;
        tracing::debug!(target: "idem", key = %call.key(), token = call.token().0, step = name,
            "step saved");
    }
    out
}

/// [`step_key`] of the call under `key`.
pub(crate) fn derive_key(key: &StorageKey, name: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"idem step key\0");
    hash.update(key.as_str().as_bytes());
    hash.update([0]);
    hash.update(name.as_bytes());
    hex::encode(hash.finalize())
}
