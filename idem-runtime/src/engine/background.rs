//! Work that outlives the caller: renewing the lease while the body runs, storing a result or
//! an unknown outcome the caller did not wait for, releasing a claim from a destructor. All of
//! it runs on the runtime captured once, when the key was claimed, and is spawned through
//! [`running`](super::running), which counts it for [`drain`](super::running::drain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::context::{CallContext, Deadline};
use crate::error::Error;
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Labels, StoreOp};
use crate::store::{FencingToken, Store};

use super::running::{spawn_helper, spawn_work};
use super::storing::{store_with_retries, Patience};

/// The longest a background task goes on trying to store a result.
const MAX_BACKGROUND_STORING: Duration = Duration::from_secs(24 * 3600);

/// A claimed key, its store, and the runtime its background work runs on.
pub(super) struct Background {
    pub(super) runtime: Handle,
    pub(super) store: Arc<dyn Store>,
    pub(super) key: StorageKey,
    pub(super) token: FencingToken,
    /// The call's labels, for its metrics.
    pub(super) labels: Labels,
}

impl Background {
    /// Captures the current runtime (calls run on Tokio).
    pub(super) fn new(
        store: Arc<dyn Store>,
        key: StorageKey,
        token: FencingToken,
        labels: Labels,
    ) -> Self {
        Background {
            runtime: Handle::current(),
            store,
            key,
            token,
            labels,
        }
    }

    /// Starts renewing the lease; see [`Renewal`]. Each acknowledged renewal moves the
    /// holder's own `deadline` forward. Renewals are timed from `claimed_at`, when the claim
    /// was sent (the lease runs from about then), not from when its answer came: a claim
    /// answered late is renewed at once, before the holder's own deadline passes.
    pub(super) fn renew(
        &self,
        lease: Duration,
        claimed_at: Instant,
        context: CallContext,
        deadline: Arc<Deadline>,
    ) -> Renewal {
        let (store, key, token, labels) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.labels,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(AtomicBool::new(false));
        let body_ended = ended.clone();
        spawn_helper(&self.runtime, async move {
            let period = lease / 4;
            let mut renewals = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval_at(claimed_at + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stopped = std::pin::pin!(stopped);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return,
                    _ = tick.tick(), if renewals.len() < 3 => {
                        let (store, key) = (store.clone(), key.clone());
                        renewals.spawn(async move {
                            let sent = Instant::now();
                            (sent, timed(StoreOp::Renew, labels, store.renew(&key, token, lease)).await)
                        });
                    }
                    Some(done) = renewals.join_next() => match done {
                        Ok((sent, Ok(()))) => {
                            deadline.acknowledged(sent);
                            tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed")
                        }
                        Ok((_, Err(Error::LeaseLost { .. }))) if body_ended.load(Ordering::Acquire) => {
                            // The body has ended and its outcome is being stored: a renewal
                            // that lands after the outcome did is refused, and says nothing
                            // about a takeover (storing finds out whether there was one).
                            return;
                        }
                        Ok((_, Err(Error::LeaseLost { .. }))) => {
                            tracing::warn!(target: "idem", key = %key, token = token.0,
                                "lease lost while the body runs: another caller took the key over");
                            context.mark_lost();
                            return;
                        }
                        Ok((_, Err(e))) => {
                            count(Event::StoreError, labels);
                            tracing::warn!(target: "idem", key = %key, error = %e, "lease renewal failed; will retry");
                        }
                        Err(_) => {}
                    },
                }
            }
        });
        Renewal { _stop: stop, ended }
    }

    /// Goes on storing `record` (`what`: a result, an unknown outcome), renewing the lease
    /// meanwhile if `renewal` is given, until it lands, the key is taken over, or the ttl (at
    /// most a day) passes. `attempted`: an earlier attempt may have been applied (see
    /// [`store_with_retries`]).
    pub(super) fn store_later(
        &self,
        what: &'static str,
        record: Vec<u8>,
        ttl: Duration,
        attempted: bool,
        renewal: Option<Renewal>,
    ) {
        let (store, key, token, labels) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.labels,
        );
        spawn_work(&self.runtime, |cut| async move {
            let _renewal = renewal;
            let until = Instant::now() + ttl.min(MAX_BACKGROUND_STORING);
            match store_with_retries(
                &*store,
                &key,
                token,
                &record,
                ttl,
                attempted,
                Patience::Background(until, &cut),
                labels,
            )
            .await
            {
                Ok(()) => tracing::info!(target: "idem", key = %key, token = token.0, what,
                    "stored in the background"),
                Err(e) => {
                    if cut.is_cancelled() {
                        cut.unrecorded();
                    }
                    tracing::warn!(target: "idem", key = %key, token = token.0, what,
                        error = %e, "gave up storing in the background")
                }
            }
        });
    }

    /// Releases the claim without being awaited (from a destructor).
    pub(super) fn release(&self) {
        let (store, key, token, labels) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.labels,
        );
        spawn_work(&self.runtime, |_| async move {
            if let Err(e) = timed(StoreOp::Release, labels, store.release(&key, token)).await {
                tracing::debug!(target: "idem", key = %key, token = token.0, error = %e,
                    "background release failed; the lease will expire");
            }
        });
    }
}

/// Renews a claim's lease on a task of its own while the body runs, so that a body that is
/// busy or blocks its thread cannot starve the renewal; stops when dropped. Renewals are sent
/// every quarter of the lease without waiting for the previous one to answer (at most three
/// at once), so a slow store delays them without spacing them out. A renewal refused with
/// [`Error::LeaseLost`] marks the call's context lost, which the body can see.
pub(super) struct Renewal {
    /// Dropping it stops the renewal task (its receiver completes).
    _stop: tokio::sync::oneshot::Sender<()>,
    /// Set once the body has ended: a refused renewal then means nothing (see `renew`).
    ended: Arc<AtomicBool>,
}

impl Renewal {
    /// The body has ended; renewal goes on until its outcome is stored.
    pub(super) fn body_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }
}

/// Counts a detached call whose caller stopped waiting: its body goes on by itself.
pub(crate) struct Abandoned {
    armed: bool,
    labels: Labels,
}

impl Abandoned {
    /// Armed until [`disarm`](Self::disarm)ed: dropping it armed counts an abandoned call
    /// with these labels.
    pub(crate) fn for_call(labels: Labels) -> Self {
        Abandoned {
            armed: true,
            labels,
        }
    }

    /// The caller got its answer.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            count(Event::FinishedDetached, self.labels);
            tracing::debug!(target: "idem",
                "caller stopped waiting; the body runs on and its result will be stored");
        }
    }
}
