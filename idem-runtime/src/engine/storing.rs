//! Storing an outcome: the one rule for retrying a write whose body has run, used by the
//! caller and by the background alike.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::key::StorageKey;
use crate::metrics::{count, timed, Event, Labels, StoreOp};
use crate::store::{FencingToken, RecordState, Store, StoredRecord};

use super::running::Cut;

/// Who is storing a result, and until when to keep trying.
#[derive(Clone, Copy)]
pub(super) enum Patience<'a> {
    /// The caller waits for it (up to a lease).
    Caller(Instant),
    /// A task of its own, after the caller left, until then or until a drain cuts it off
    /// (then it gives up at its next pause).
    Background(Instant, &'a Cut),
}

/// The longest pause between attempts to store a result.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Stores a result. The body has run, so a result left unstored would let a later call run it
/// again once the lease runs out: a store error (a dropped connection, a restarting server) is
/// retried with backoff until `until`. Retrying is safe: a stale token changes nothing
/// (fencing), and a retry that finds the key already completed under this call's own token
/// means an earlier attempt was stored but its reply was lost. A full store
/// ([`Error::StoreFull`]) ends the attempts of a caller at once (`background`: keep trying).
/// `labels`: the call's, for its metrics.
#[allow(clippy::too_many_arguments)]
pub(super) async fn store_with_retries(
    store: &dyn Store,
    key: &StorageKey,
    token: FencingToken,
    record: &[u8],
    ttl: Duration,
    mut attempted: bool,
    patience: Patience<'_>,
    labels: Labels,
) -> Result<()> {
    let (Patience::Caller(until) | Patience::Background(until, _)) = patience;
    let mut pause = Duration::from_millis(10);
    loop {
        let stored = timed(
            StoreOp::Complete,
            labels,
            store.complete(key, token, record, ttl),
        );
        let error = match stored.await {
            Ok(()) => return Ok(()),
            Err(Error::LeaseLost { .. }) if attempted => {
                match timed(StoreOp::Get, labels, store.get(key)).await {
                    Ok(Some(StoredRecord {
                        state: RecordState::Completed { token: t, .. },
                        ..
                    })) if t == token => return Ok(()),
                    Ok(_) => return Err(Error::lease_lost(key)),
                    Err(e) => e,
                }
            }
            Err(e @ Error::LeaseLost { .. }) => return Err(e),
            // A full store stays full for longer than a caller should wait: a caller gets its
            // result back at once; the background keeps trying, at the longest pause.
            Err(e @ Error::StoreFull { .. }) => {
                if let Patience::Caller(_) = patience {
                    return Err(e);
                }
                pause = MAX_PAUSE;
                e
            }
            Err(e) => e,
        };
        attempted = true;
        if Instant::now() + pause >= until {
            return Err(error);
        }
        count(Event::StoreError, labels);
        tracing::warn!(target: "idem", key = %key, token = token.0, error = %error,
            "could not store the result; retrying");
        match patience {
            Patience::Caller(_) => tokio::time::sleep(pause).await,
            Patience::Background(_, cut) => tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cut.cancelled() => return Err(error),
            },
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
