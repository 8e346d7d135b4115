//! Work that outlives the caller: renewing the lease while the body runs, storing a result or
//! an unknown outcome the caller did not wait for, releasing a claim from a destructor. All of
//! it is spawned here, on the runtime captured once, when the key was claimed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::context::CallContext;
use crate::error::Error;
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Labels, StoreOp};
use crate::store::{FencingToken, Store};

use super::storing::{complete, Patience};

/// The longest a background task goes on trying to store a result.
const MAX_BACKGROUND_STORING: Duration = Duration::from_secs(24 * 3600);

/// A claimed key, its store, and the runtime its background work runs on.
pub(super) struct Background {
    runtime: Handle,
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

    /// The one place background work is spawned. On a runtime that is shutting down the work
    /// is dropped, and the claim stays in flight until its lease ends.
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }

    /// Starts renewing the lease; see [`Renewal`].
    pub(super) fn renew(&self, lease: Duration, context: CallContext) -> Renewal {
        let (store, key, token, labels) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.labels,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.spawn(async move {
            let period = lease / 4;
            let mut renewals = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stopped = std::pin::pin!(stopped);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return,
                    _ = tick.tick(), if renewals.len() < 3 => {
                        let (store, key) = (store.clone(), key.clone());
                        renewals.spawn(async move {
                            timed(StoreOp::Renew, labels, store.renew(&key, token, lease)).await
                        });
                    }
                    Some(done) = renewals.join_next() => match done {
                        Ok(Ok(())) => {
                            tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed")
                        }
                        Ok(Err(Error::LeaseLost { .. })) => {
                            tracing::warn!(target: "idem", key = %key, token = token.0,
                                "lease lost while the body runs: another caller took the key over");
                            context.mark_lost();
                            return;
                        }
                        Ok(Err(e)) => {
                            count(Event::StoreError, labels);
                            tracing::warn!(target: "idem", key = %key, error = %e, "lease renewal failed; will retry");
                        }
                        Err(_) => {}
                    },
                }
            }
        });
        Renewal { _stop: stop }
    }

    /// Goes on storing `record` (`what`: a result, an unknown outcome), renewing the lease
    /// meanwhile if `renewal` is given, until it lands, the key is taken over, or the ttl (at
    /// most a day) passes. `attempted`: an earlier attempt may have been applied (see
    /// [`complete`]).
    pub(super) fn complete(
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
        self.spawn(async move {
            let _renewal = renewal;
            let until = Instant::now() + ttl.min(MAX_BACKGROUND_STORING);
            match complete(
                &*store,
                &key,
                token,
                &record,
                ttl,
                attempted,
                Patience::Background(until),
                labels,
            )
            .await
            {
                Ok(()) => tracing::info!(target: "idem", key = %key, token = token.0, what,
                    "stored in the background"),
                Err(e) => tracing::warn!(target: "idem", key = %key, token = token.0, what,
                    error = %e, "gave up storing in the background"),
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
        self.spawn(async move {
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
}

/// Counts a detached call whose caller stopped waiting: its body goes on by itself.
pub(crate) struct Abandoned {
    armed: bool,
    labels: Labels,
}

impl Abandoned {
    /// Armed until [`disarm`](Self::disarm)ed: dropping it armed counts an abandoned call
    /// (without labels: where neither its operation nor its store is at hand).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn new() -> Self {
        Abandoned::for_call(Labels::UNKNOWN)
    }

    /// [`new`](Self::new), for a call with these labels.
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
