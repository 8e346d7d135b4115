//! Per-scope limits: how many responses, and how many bytes of them, one scope (one client) may
//! have kept at a time, so that one client cannot fill the store for all.
//!
//! The tally is kept in this process, of the responses this layer (and its clones) kept: the
//! store cannot count per scope, because it only sees storage keys, hashes of scope and key.
//! An entry leaves the tally when its ttl runs out (measured from when it was kept, on this
//! process's clock). A request with a new key reserves a place before its handler runs, so
//! concurrent requests cannot together exceed the record limit; the byte limit counts the
//! responses already kept, so it may be exceeded by the responses of the requests running when
//! it is reached (each at most the layer's body limit).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How often scopes whose entries all expired are dropped from the tally.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The limits of one layer, and the tally of what each scope holds.
pub(super) struct ScopeLimits {
    records: usize,
    bytes: u64,
    state: Mutex<State>,
}

struct State {
    scopes: HashMap<String, Tally>,
    last_sweep: Instant,
}

/// What one scope holds: kept responses (expiry, size), oldest first, and requests admitted and
/// still running.
#[derive(Default)]
struct Tally {
    kept: VecDeque<(Instant, u64)>,
    bytes: u64,
    running: usize,
}

impl Tally {
    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, size)) = self.kept.front() {
            if expires > now {
                break;
            }
            self.kept.pop_front();
            self.bytes -= size;
        }
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.running == 0
    }
}

impl ScopeLimits {
    /// At most `records` kept responses, and new keys only while under `bytes` of them, per
    /// scope.
    ///
    /// # Panics
    ///
    /// If either limit is 0 (no scope could ever store a response).
    /// The limits, or the mistake that makes them unusable (a limit of 0).
    pub(super) fn new(records: usize, bytes: u64) -> Result<Self, String> {
        if records == 0 || bytes == 0 {
            return Err(format!(
                "IdempotencyLayer::limit_per_scope({records}, {bytes}): a limit of 0 refuses every request; give at least 1 record and 1 byte"
            ));
        }
        Ok(ScopeLimits {
            records,
            bytes,
            state: Mutex::new(State {
                scopes: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        })
    }

    /// The limits: records, bytes.
    pub(super) fn limits(&self) -> (usize, u64) {
        (self.records, self.bytes)
    }

    /// Admits a request with a new key in `scope`, or says how long until the scope may have
    /// room (at least a second).
    pub(super) fn admit(self: &Arc<Self>, scope: &str) -> Result<Admitted, Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(state.last_sweep) >= SWEEP_EVERY {
            state.last_sweep = now;
            state.scopes.retain(|_, tally| {
                tally.expire(now);
                !tally.is_empty()
            });
        }
        let tally = state.scopes.entry(scope.to_owned()).or_default();
        tally.expire(now);
        if tally.kept.len() + tally.running >= self.records || tally.bytes >= self.bytes {
            // A running request may end without keeping its response: try again soon. Else
            // the oldest kept response expires first.
            let wait = match tally.kept.front() {
                Some(&(expires, _)) if tally.running == 0 => expires.duration_since(now),
                _ => Duration::ZERO,
            };
            let is_empty = tally.is_empty();
            if is_empty {
                state.scopes.remove(scope);
            }
            return Err(wait.max(Duration::from_secs(1)));
        }
        tally.running += 1;
        Ok(Admitted {
            limits: self.clone(),
            scope: scope.to_owned(),
            open: true,
        })
    }
}

/// A request admitted in its scope: counts as running until it is [kept](Admitted::kept) or
/// dropped (its response was not kept).
pub(super) struct Admitted {
    limits: Arc<ScopeLimits>,
    scope: String,
    open: bool,
}

impl Admitted {
    /// The request's response of `size` bytes was kept for `ttl`.
    pub(super) fn kept(mut self, size: u64, ttl: Duration) {
        self.open = false;
        let expires = Instant::now() + ttl;
        let mut state = self
            .limits
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let tally = state
            .scopes
            .entry(std::mem::take(&mut self.scope))
            .or_default();
        tally.running = tally.running.saturating_sub(1);
        // Kept in order of expiry: every response of a layer has the same ttl, and a layer's
        // clones configured with another one are rare enough for `expire` to be late for them.
        tally.kept.push_back((expires, size));
        tally.bytes += size;
    }
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let mut state = self
            .limits
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tally) = state.scopes.get_mut(&self.scope) {
            tally.running = tally.running.saturating_sub(1);
            if tally.is_empty() {
                state.scopes.remove(&self.scope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_scope_is_refused_at_its_record_limit_until_one_expires() {
        let limits = Arc::new(ScopeLimits::new(2, u64::MAX).unwrap());
        let ttl = Duration::from_secs(10);
        limits.admit("alice").unwrap().kept(10, ttl);
        tokio::time::advance(Duration::from_secs(4)).await;
        let running = limits.admit("alice").unwrap();
        assert!(limits.admit("alice").is_err(), "a running request counts");
        assert!(limits.admit("bob").is_ok(), "other scopes are not affected");
        running.kept(10, ttl);
        assert_eq!(limits.admit("alice").unwrap_err(), Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(limits.admit("alice").is_ok(), "the oldest expired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_kept_frees_its_place() {
        let limits = Arc::new(ScopeLimits::new(1, u64::MAX).unwrap());
        let running = limits.admit("alice").unwrap();
        assert_eq!(limits.admit("alice").unwrap_err(), Duration::from_secs(1));
        drop(running);
        assert!(limits.admit("alice").is_ok());
        assert!(limits.state.lock().unwrap().scopes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_scope_is_refused_once_it_holds_its_bytes() {
        let limits = Arc::new(ScopeLimits::new(100, 1000).unwrap());
        let ttl = Duration::from_secs(10);
        limits.admit("alice").unwrap().kept(600, ttl);
        limits.admit("alice").unwrap().kept(600, ttl);
        assert!(limits.admit("alice").is_err());
        tokio::time::advance(ttl).await;
        assert!(limits.admit("alice").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_scopes_are_swept() {
        let limits = Arc::new(ScopeLimits::new(1, 1).unwrap());
        limits
            .admit("alice")
            .unwrap()
            .kept(1, Duration::from_secs(1));
        tokio::time::advance(SWEEP_EVERY).await;
        limits
            .admit("bob")
            .unwrap()
            .kept(1, Duration::from_secs(1000));
        let state = limits.state.lock().unwrap();
        assert_eq!(state.scopes.keys().collect::<Vec<_>>(), ["bob"]);
    }

    #[test]
    fn zero_limits_are_refused() {
        let e = ScopeLimits::new(0, 1).err().expect("refused");
        assert!(e.contains("refuses every request"), "{e}");
        assert!(ScopeLimits::new(1, 0).is_err());
    }
}
