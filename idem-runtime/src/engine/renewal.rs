//! Renewing leases while bodies run: one keeper thread per process times every held lease, and
//! sends each renewal, when it falls due, to the runtime of the call that holds the lease.
//!
//! A claim registers its lease here before its body is first polled (a lock and a map entry,
//! no task, no timer) and takes it out when its outcome is stored. Bodies that end within a
//! quarter of their lease (nearly all) never cause a renewal, or any task. The keeper is an
//! OS thread of its own, not a task: a body that blocks its worker thread (a synchronous SDK
//! call) cannot keep the keeper from running, and the renewal it sends is queued on the
//! runtime from outside, where any free worker takes it.
//!
//! The keeper times renewals by the real clock (a Tokio clock paused in a test does not move
//! them); the holder's own deadline ([`Deadline`]) is on Tokio's clock as before.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::context::{CallContext, Deadline};
use crate::error::Error;
use crate::metrics::{count, timed, Event, StoreOp};

use super::background::Background;

/// The most renewals of one lease in flight at once: a slow store delays renewals without
/// spacing them out, up to this many.
const MAX_IN_FLIGHT: usize = 3;

/// A lease renewed while it is held: registered with the keeper until dropped.
///
/// Renewals are sent every quarter of the lease, timed from when the claim was sent, without
/// waiting for the previous one to answer (at most [`MAX_IN_FLIGHT`] at once). Each
/// acknowledged renewal moves the holder's own deadline forward; one refused with
/// [`Error::LeaseLost`] while the body runs marks the call's context lost, which the body can
/// see, and ends the renewals.
pub(super) struct Renewal {
    lease: Arc<Lease>,
}

/// What a renewal needs, shared by the keeper and the renewals in flight.
struct Lease {
    id: u64,
    /// When the next renewal is due, in nanoseconds since [`Keeper::epoch`]; changed only under
    /// the keeper's lock.
    due: AtomicU64,
    period: Duration,
    /// The claimed key, its store and runtime.
    claim: Background,
    lease: Duration,
    context: CallContext,
    deadline: Arc<Deadline>,
    span: tracing::Span,
    /// Set once the body has ended: a refused renewal then means nothing (storing the outcome
    /// finds out whether there was a takeover).
    body_ended: AtomicBool,
    in_flight: AtomicUsize,
}

impl Renewal {
    /// Registers the lease of the claim `claim` (of `lease`, sent at `claimed_at`) with the
    /// keeper: its first renewal falls due a quarter of the lease after the claim was sent.
    /// Each acknowledged renewal moves `deadline` forward; a refused one marks `context` lost.
    pub(super) fn start(
        claim: &Background,
        lease: Duration,
        claimed_at: tokio::time::Instant,
        context: CallContext,
        deadline: Arc<Deadline>,
    ) -> Renewal {
        let keeper = keeper();
        let period = lease / 4;
        let due = keeper.nanos(claimed_at.into_std() + period);
        let lease = Arc::new(Lease {
            id: keeper.next_id.fetch_add(1, Ordering::Relaxed),
            due: AtomicU64::new(due),
            period,
            claim: claim.clone(),
            lease,
            context,
            deadline,
            span: tracing::Span::current(),
            body_ended: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        });
        keeper.insert(lease.clone());
        Renewal { lease }
    }

    /// The body has ended; renewal goes on until its outcome is stored.
    pub(super) fn body_ended(&self) {
        self.lease.body_ended.store(true, Ordering::Release);
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        keeper().remove(&self.lease);
    }
}

/// The keeper: the leases held in this process, by when their next renewal is due.
struct Keeper {
    epoch: Instant,
    next_id: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// (due, id) → lease.
    due: BTreeMap<(u64, u64), Arc<Lease>>,
    /// Until when the keeper sleeps (`None`: until woken); a lease due earlier wakes it.
    sleeping_until: Option<u64>,
}

/// Renewals due within this of each other are sent together, so the keeper wakes once for them.
const SLACK: Duration = Duration::from_millis(1);

fn keeper() -> &'static Keeper {
    static KEEPER: LazyLock<&'static Keeper> = LazyLock::new(|| {
        let keeper: &'static Keeper = Box::leak(Box::new(Keeper {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            state: Mutex::new(State {
                due: BTreeMap::new(),
                sleeping_until: Some(u64::MAX),
            }),
            wake: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("idem-lease-keeper".into())
            .spawn(move || keeper.run())
            .expect("idem: could not start the lease keeper thread");
        keeper
    });
    &KEEPER
}

impl Keeper {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, lease: Arc<Lease>) {
        let due = lease.due.load(Ordering::Relaxed);
        let mut state = self.lock();
        state.due.insert((due, lease.id), lease);
        if state.sleeping_until.is_none_or(|until| due < until) {
            state.sleeping_until = Some(due);
            drop(state);
            self.wake.notify_one();
        }
    }

    fn remove(&self, lease: &Lease) {
        let mut state = self.lock();
        let due = lease.due.load(Ordering::Relaxed);
        state.due.remove(&(due, lease.id));
    }

    /// The keeper thread: sends the renewals that fall due, then sleeps until the next one.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            let now = self.nanos(Instant::now());
            let horizon = now + SLACK.as_nanos() as u64;
            while let Some(entry) = state.due.first_entry() {
                if entry.key().0 > horizon {
                    break;
                }
                let lease = entry.remove();
                let period = lease.period.as_nanos() as u64;
                // Missed ticks are not made up: the next one is a period from now.
                let next = (lease.due.load(Ordering::Relaxed) + period).max(now + period);
                lease.due.store(next, Ordering::Relaxed);
                state.due.insert((next, lease.id), lease.clone());
                send(lease);
            }
            let next = state.due.first_key_value().map(|(k, _)| k.0);
            state.sleeping_until = next;
            state = match next {
                None => self.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(at) => {
                    let wait = Duration::from_nanos(at.saturating_sub(now));
                    self.wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// Sends one renewal of `lease` on its runtime (queued from outside the runtime, so any free
/// worker takes it), unless [`MAX_IN_FLIGHT`] are still on their way.
fn send(lease: Arc<Lease>) {
    if lease.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        lease.in_flight.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let span = lease.span.clone();
    let runtime = lease.claim.runtime.clone();
    // A runtime that shut down drops the renewal unsent: its calls are gone too.
    runtime.spawn(
        async move {
            let sent = tokio::time::Instant::now();
            let claim = &lease.claim;
            let renewed = timed(
                StoreOp::Renew,
                claim.labels,
                claim.store.renew(&claim.key, claim.token, lease.lease),
            )
            .await;
            lease.in_flight.fetch_sub(1, Ordering::AcqRel);
            let (key, token) = (&claim.key, claim.token);
            match renewed {
                Ok(()) => {
                    lease.deadline.acknowledged(sent);
                    tracing::trace!(target: "idem", key = %key, token = token.0, "lease renewed");
                }
                Err(Error::LeaseLost { .. }) if lease.body_ended.load(Ordering::Acquire) => {
                    // The body has ended and its outcome is being stored: a renewal that lands
                    // after the outcome did is refused, and says nothing about a takeover
                    // (storing finds out whether there was one).
                    keeper().remove(&lease);
                }
                Err(Error::LeaseLost { .. }) => {
                    tracing::warn!(target: "idem", key = %key, token = token.0,
                        "lease lost while the body runs: another caller took the key over");
                    lease.context.mark_lost();
                    keeper().remove(&lease);
                }
                Err(e) => {
                    count(Event::StoreError, claim.labels);
                    tracing::warn!(target: "idem", key = %key, error = %e, "lease renewal failed; will retry");
                }
            }
        }
        .instrument(span),
    );
}
