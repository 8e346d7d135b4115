//! Work that outlives the caller: storing a result or an unknown outcome the caller did not
//! wait for, releasing a claim from a destructor. All of it runs on the runtime captured once,
//! when the key was claimed, and is spawned through [`running`](super::running), which counts
//! it for [`drain`](super::running::drain). (Renewing the lease while the body runs is
//! [`renewal`](super::renewal)'s.)

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::key::StorageKey;
use crate::metrics::{timed, Labels, StoreOp};
use crate::store::{FencingToken, Store};

use super::renewal::Renewal;
use super::running::spawn_work;
use super::storing::{store_with_retries, Patience};

/// The longest a background task goes on trying to store a result.
const MAX_BACKGROUND_STORING: Duration = Duration::from_secs(24 * 3600);

/// A claimed key, its store, and the runtime its background work runs on.
#[derive(Clone)]
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

    /// Gives the claim back without being awaited (from a destructor): releases it, or, for a
    /// call with steps (`keep_steps`), suspends it (its lease ends now and its steps stay; see
    /// `Holding::suspend`). A failure leaves the lease to expire.
    pub(super) fn give_back(&self, keep_steps: bool) {
        let (store, key, token, labels) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.labels,
        );
        spawn_work(&self.runtime, move |_| async move {
            let (what, given) = if keep_steps {
                let suspended = store.renew(&key, token, Duration::ZERO);
                ("suspend", timed(StoreOp::Renew, labels, suspended).await)
            } else {
                let released = store.release(&key, token);
                ("release", timed(StoreOp::Release, labels, released).await)
            };
            if let Err(e) = given {
                tracing::debug!(target: "idem", key = %key, token = token.0, error = %e, what,
                    "background give-back failed; the lease will expire");
            }
        });
    }
}
