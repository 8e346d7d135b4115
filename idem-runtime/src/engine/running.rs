//! The one place that spawns work: bodies that run on after their caller stopped waiting (the
//! attribute's detached calls, the HTTP layer's handlers: they run in their caller's future and
//! move to a task only when the caller leaves, see [`InPlace`]) and the background writes of
//! their outcomes. All of it is counted, so that a process can [`drain`] before it exits: an
//! exit that drops a started body is a crash, and at most once survives it only through the
//! lease.
//!
//! Work is spawned with the caller's `tracing` span, so fields set by `#[instrument]` or
//! tower-http's `TraceLayer` are on every event logged inside a detached body or handler.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{count, Event, Labels};

/// What [`drain`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Bodies that ran to their end while `drain` waited; their outcomes are stored.
    pub finished: usize,
    /// Bodies still running at the timeout, cut off: their outcome is unknown, and was
    /// recorded in the store (per the call's `on_unknown`: refused until resolved, or released)
    /// unless it is also counted in `unrecorded`.
    pub cut_off: usize,
    /// Outcomes (an unknown outcome of a cut-off body, or a result still being stored after
    /// its caller left) that could not be written before `drain` returned, because the store
    /// kept failing. Their claims stay in flight until their leases lapse, as after a crash.
    pub unrecorded: usize,
}

/// Tells the work spawned before it that the process is cutting it off; counts what that did.
#[derive(Default)]
pub(super) struct Cut {
    token: CancellationToken,
    cut_off: AtomicUsize,
    unrecorded: AtomicUsize,
}

impl Cut {
    /// Completes when [`drain`] cuts this work off.
    pub(super) async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Whether [`drain`] has cut this work off.
    pub(super) fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A body was cut off; `recorded`: its unknown outcome reached the store.
    pub(super) fn cut_off(&self, recorded: bool) {
        self.cut_off.fetch_add(1, Ordering::Relaxed);
        if !recorded {
            self.unrecorded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An outcome written in the background could not be written before the drain ended.
    pub(super) fn unrecorded(&self) {
        self.unrecorded.fetch_add(1, Ordering::Relaxed);
    }
}

/// The work of this process that [`drain`] waits for.
struct Running {
    tracker: TaskTracker,
    /// The cut of the work spawned from now on (replaced by each drain that cuts).
    cut: Mutex<Arc<Cut>>,
    /// Bodies that ran to their end, ever.
    finished: AtomicUsize,
    /// One drain at a time.
    draining: tokio::sync::Mutex<()>,
}

fn registry() -> &'static Running {
    static RUNNING: LazyLock<Running> = LazyLock::new(|| Running {
        tracker: TaskTracker::new(),
        cut: Mutex::new(Arc::default()),
        finished: AtomicUsize::new(0),
        draining: tokio::sync::Mutex::new(()),
    });
    &RUNNING
}

impl Running {
    fn cut(&self) -> Arc<Cut> {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace_cut(&self) -> Arc<Cut> {
        std::mem::take(&mut *self.cut.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A body's future, boxed so that it can move to a task where it stopped.
type Work<R> = Pin<Box<dyn Future<Output = (R, Ended)> + Send>>;

/// A body that runs in its caller's future and moves to a task of its own only if the caller
/// stops waiting: the one path of a body that must outlive its caller (a detached
/// `#[idempotent]` call, an HTTP layer's handler). Counted for [`drain`] from the start (a
/// tracker token, no task), cut off by it like a spawned body.
///
/// A caller that waits (nearly all) pays for no task, no wake-up across tasks and no copy of
/// the body into a task. A caller that leaves (its future dropped: a timeout, a client gone)
/// hands the body, boxed and pinned where it stopped, to a task on the call's runtime, in the
/// caller's span, where it runs to its end and its outcome is stored.
pub(super) struct InPlace<R: Send + 'static> {
    work: Option<Work<R>>,
    /// Keeps the body counted for [`drain`] while it runs, in place or on its task.
    counted: Option<TaskTrackerToken>,
    runtime: Handle,
    span: tracing::Span,
    /// Counted as abandoned if the caller leaves before the body ends.
    labels: Labels,
}

impl<R: Send + 'static> InPlace<R> {
    /// The body `body` makes, given the [`Cut`] that tells it the process is cutting it off;
    /// it says whether it ran to its end.
    pub(super) fn new<F>(runtime: Handle, body: impl FnOnce(Arc<Cut>) -> F, labels: Labels) -> Self
    where
        F: Future<Output = (R, Ended)> + Send + 'static,
    {
        let running = registry();
        InPlace {
            work: Some(Box::pin(body(running.cut()))),
            counted: Some(running.tracker.token()),
            runtime,
            span: tracing::Span::current(),
            labels,
        }
    }
}

impl<R: Send + 'static> Future for InPlace<R> {
    /// The body's output, or the panic it raised (after its unknown outcome was handled).
    type Output = std::thread::Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(work) = this.work.as_mut() else {
            panic!("InPlace polled after it completed");
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)));
        let out = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready((out, ended))) => {
                ended.count();
                Ok(out)
            }
            Err(panic) => Err(panic),
        };
        this.work = None;
        this.counted = None;
        Poll::Ready(out)
    }
}

impl<R: Send + 'static> Drop for InPlace<R> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        count(Event::FinishedDetached, self.labels);
        tracing::debug!(target: "idem",
            "caller stopped waiting; the body runs on and its result will be stored");
        let counted = self.counted.take();
        // A runtime that shut down drops the body here (its outcome is handled as after a
        // crash: recorded in the background if that still can run, else left to the lease).
        self.runtime.spawn(
            async move {
                work.await.1.count();
                drop(counted);
            }
            .instrument(std::mem::replace(&mut self.span, tracing::Span::none())),
        );
    }
}

/// Spawns background work (storing an outcome after its caller left, releasing a claim from a
/// destructor) on `runtime`, counted for [`drain`] and in the caller's span.
pub(super) fn spawn_work<F>(runtime: &Handle, work: impl FnOnce(Arc<Cut>) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let work = work(registry().cut());
    registry()
        .tracker
        .spawn_on(work.instrument(tracing::Span::current()), runtime);
}

impl Ended {
    /// Counts a body that ran to its end, for [`drain`]'s report.
    fn count(self) {
        if let Ended::Finished = self {
            registry().finished.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a body that may outlive its caller ended.
pub(super) enum Ended {
    /// It ran to its end (its outcome stored, released or recorded as unknown).
    Finished,
    /// [`drain`] cut it off.
    CutOff,
}

/// How many bodies and background writes of this process are running now, including those
/// whose callers stopped waiting.
pub fn running() -> usize {
    registry().tracker.len()
}

/// Drains the bodies this process runs for callers that gave up, before it exits: waits up to
/// `timeout` for every body running on a task of its own (a detached `#[idempotent]` call whose
/// caller stopped waiting, an HTTP layer's handler) to finish and store its result; then cuts
/// off the bodies still running and **writes their unknown outcome to the store before it
/// returns** (each retried for up to its lease while the store fails), so that at most once
/// holds across a deploy: a retry of a cut-off body is refused ([`Error::OutcomeUnknown`]) or,
/// under `on_unknown = "rerun"`, runs again, never by accident.
///
/// Call it once the process stopped taking new work (after a server's graceful shutdown, or a
/// consumer stopped polling) and before returning from `main`. Without it, an exit is a crash:
/// the runtime drops the running bodies mid-way, their claims stay in flight until their leases
/// lapse, and the next caller takes the key over and runs the body again.
///
/// A body cut off stops at its next `.await`; one that blocks its thread cannot be cut off and
/// is waited for. Calls that run their body in the caller's future
/// ([`Call::run`](crate::Call::run), borrowing functions) are their caller's: drain does not
/// see them. One drain runs at a time; a later one waits for it.
///
/// [`Error::OutcomeUnknown`]: crate::Error::OutcomeUnknown
pub async fn drain(timeout: Duration) -> DrainReport {
    let running = registry();
    let _one = running.draining.lock().await;
    let finished_before = running.finished.load(Ordering::Relaxed);
    running.tracker.close();
    let in_time = tokio::time::timeout(timeout, running.tracker.wait())
        .await
        .is_ok();
    let mut report = DrainReport::default();
    if !in_time {
        let cut = running.replace_cut();
        tracing::warn!(target: "idem", running = running.tracker.len(), ?timeout,
            "drain: cutting off the bodies still running; recording their unknown outcomes");
        cut.token.cancel();
        running.tracker.wait().await;
        report.cut_off = cut.cut_off.load(Ordering::Relaxed);
        report.unrecorded = cut.unrecorded.load(Ordering::Relaxed);
    }
    running.tracker.reopen();
    report.finished = running
        .finished
        .load(Ordering::Relaxed)
        .saturating_sub(finished_before);
    tracing::info!(target: "idem", finished = report.finished, cut_off = report.cut_off,
        unrecorded = report.unrecorded, "drained");
    report
}
