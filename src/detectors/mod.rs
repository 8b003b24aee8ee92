//! Detectors: the parts of the server that raise catalog events from what they observe, each
//! owning one concern (design.md, "Where each warning comes from"). They raise through
//! [`crate::engine::Engine::raise`] / [`crate::engine::Engine::raise_and_settle`], so their
//! events are classified, stored and delivered like any other.
//!
//! A detector that checks periodically implements [`Detector`] (what it checks, how often) and
//! runs on one [`DetectorRunner`] (the loop, on the engine's clock, until shutdown); the same
//! check answers on request. [`onset`] and [`follow`] are the "once per onset" rule they share.
//!
//! - [`devices`]: the device registry (heartbeats, identity conflicts, status, inactivity):
//!   KLSRV_EVENT_HOSTS_CONFLICT, KLSRV_HOST_STATUS_WARNING / _CRITICAL,
//!   KLSRV_EVENT_HOSTS_NOT_VISIBLE, KLSRV_HOST_OUT_CONTROL.
//! - [`push`]: outcomes of push batches: KLSRV_GCM_DEVICE_ERROR, _HTTP_ERROR, _GENERAL_ERROR.
//! - [`capacity`]: free space of the data volume and size of the event database:
//!   KLSRV_NO_SPACE_ON_VOLUMES, KLSRV_NO_SPACE_IN_DATABASE.
//! - [`certificates`]: MDM and APNs certificates: KLSRV_CERTIFICATE_REQUESTED, _REMOVED,
//!   KLSRV_APN_CERTIFICATE_EXPIRES_SOON, _EXPIRED.
//! - [`licences`]: units in use per licence: KLSRV_EV_LICENSE_CHECK_90 / _100_110 / _MORE_110.
//! - [`updates`]: module updates awaiting approval: KLSRV_SEAMLESS_UPDATE_REGISTERED.

pub mod capacity;
pub mod certificates;
pub mod devices;
pub mod licences;
pub mod push;
pub mod updates;

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::classify::ClassifiedEvent;
use crate::clock::{SharedClock, Timestamp};
use crate::engine::{Engine, EngineError, Pending};

/// A detector that checks periodically: what it checks ([`Detector::check`]) and how often
/// ([`Detector::period`]). [`DetectorRunner::spawn`] runs it; an RPC or start-up calls
/// [`Detector::check`] directly, with the same clock's time.
#[async_trait::async_trait]
pub trait Detector: Send + Sync + 'static {
    /// What one check found, for a caller that asked for it (the runner drops it).
    type Report: Send + 'static;
    /// Why a check failed (logged by the runner; the check runs again at the next period).
    type Error: Display + Send + 'static;

    /// The detector's name in logs ("`name` check failed").
    fn name(&self) -> &'static str;

    /// Time between two periodic checks; the first is one period after start.
    fn period(&self) -> Duration;

    /// Checks the detector's condition as of `now` (the server's clock) and raises what is due,
    /// each event once per onset.
    async fn check(&self, now: Timestamp) -> Result<Self::Report, Self::Error>;
}

/// Runs periodic work on one clock until one shutdown signal: each [`Detector`]'s check, and
/// the jobs a detector needs besides (the device registry's batched saves). The only loop of
/// its kind, so every detector starts, ticks, logs and stops alike.
///
/// Every task it starts is on its one [`TaskTracker`], so shutdown waits for all of them in one
/// place ([`DetectorRunner::stopped`]); other background tasks join it with
/// [`DetectorRunner::track`].
#[derive(Clone)]
pub struct DetectorRunner {
    clock: SharedClock,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl DetectorRunner {
    /// A runner reading the time from `clock` and stopping when `shutdown` fires.
    pub fn new(clock: SharedClock, shutdown: CancellationToken) -> Self {
        DetectorRunner {
            clock,
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// Runs `task` on the runner's tracker: a background task that ends by itself on the
    /// shutdown signal (or when what it serves closes), waited for by
    /// [`DetectorRunner::stopped`].
    pub fn track<F>(&self, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Waits until every task of the runner has ended (they end on the shutdown signal).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await
    }

    /// Checks `detector` every [`Detector::period`] at the clock's time; a failed check is
    /// logged and retried at the next period.
    pub fn spawn<D: Detector>(&self, detector: Arc<D>) -> tokio::task::JoinHandle<()> {
        let clock = self.clock.clone();
        let what = format!("{} check", detector.name());
        self.every(what, detector.period(), move || {
            let (detector, now) = (detector.clone(), clock.now());
            async move { detector.check(now).await.map(drop) }
        })
    }

    /// Runs `job` every `period` (at least 10 ms; the first run one period after start) until
    /// shutdown; a failure is logged as "`what` failed" and the job runs again at the next
    /// period.
    pub fn every<F, Fut, E>(
        &self,
        what: impl Display + Send + 'static,
        period: Duration,
        mut job: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let every = period.max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // A job that overran its period runs again one period later, never in a burst.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = job().await {
                            tracing::error!(error = %e, "{what} failed");
                        }
                    }
                }
            }
        })
    }
}

/// Once per onset, for a mark that is cleared elsewhere (a device's silence ends with its next
/// sign of life): sets `reported` and returns true when `holds` and it was not set yet.
pub fn onset(reported: &mut bool, holds: bool) -> bool {
    let begins = holds && !*reported;
    *reported |= begins;
    begins
}

/// Once per onset, for a condition measured at every check: `reported` follows `holds`; true
/// when the condition begins (again only after it cleared). The end is logged with `what`.
pub fn follow(reported: &mut bool, holds: bool, what: &str) -> bool {
    let before = std::mem::replace(reported, holds);
    if before && !holds {
        tracing::info!("{what} is back above its threshold");
    }
    holds && !before
}

/// Waits for every raised event in `pending` to be settled (stored where its type is), in order.
pub(crate) async fn settle_all(
    engine: &Engine,
    pending: Vec<Pending>,
) -> Result<Vec<Arc<ClassifiedEvent>>, EngineError> {
    let mut raised = Vec::with_capacity(pending.len());
    for p in pending {
        raised.push(engine.settle(p).await?);
    }
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Reports the time of every check; the first check fails.
    struct Probe {
        calls: AtomicUsize,
        seen: tokio::sync::mpsc::UnboundedSender<Timestamp>,
    }

    #[async_trait::async_trait]
    impl Detector for Probe {
        type Report = ();
        type Error = String;
        fn name(&self) -> &'static str {
            "probe"
        }
        fn period(&self) -> Duration {
            Duration::ZERO // the runner's floor, 10 ms
        }
        async fn check(&self, now: Timestamp) -> Result<(), String> {
            let _ = self.seen.send(now);
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err("first check fails".into());
            }
            Ok(())
        }
    }

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Timestamp>) -> Timestamp {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the runner checks periodically")
            .expect("the runner holds the detector")
    }

    #[tokio::test]
    async fn runner_checks_on_the_injected_clock_past_failures_until_shutdown() {
        let t0 = Timestamp::from_secs(1_000_000);
        let clock = ManualClock::new(t0);
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runner = DetectorRunner::new(clock.clone(), shutdown.clone());
        let probe = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            seen: tx,
        });
        let task = runner.spawn(probe.clone());
        assert_eq!(
            next(&mut rx).await,
            t0,
            "the manual clock's time, not the wall's"
        );
        assert_eq!(
            next(&mut rx).await,
            t0,
            "a failed check does not stop the runner"
        );
        // Moving the clock moves what the next checks see; no check sees another time.
        clock.advance(Duration::from_secs(86_400));
        let later = t0.plus(Duration::from_secs(86_400));
        loop {
            let t = next(&mut rx).await;
            assert!(t == t0 || t == later, "{t:?}");
            if t == later {
                break;
            }
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the runner stops at shutdown")
            .unwrap();
        let calls = probe.calls.load(Ordering::SeqCst);
        tokio::task::yield_now().await;
        assert_eq!(
            probe.calls.load(Ordering::SeqCst),
            calls,
            "no check after shutdown"
        );
    }

    #[test]
    fn onset_raises_once_until_cleared_elsewhere() {
        let mut reported = false;
        assert!(!onset(&mut reported, false));
        assert!(onset(&mut reported, true), "the condition begins");
        assert!(!onset(&mut reported, true), "once per onset");
        assert!(
            !onset(&mut reported, false),
            "only its owner clears the mark"
        );
        assert!(reported);
        reported = false;
        assert!(onset(&mut reported, true), "again after it was cleared");
    }

    #[test]
    fn follow_raises_once_per_onset_of_a_measured_condition() {
        let mut reported = false;
        assert!(!follow(&mut reported, false, "x"));
        assert!(follow(&mut reported, true, "x"), "the condition begins");
        assert!(!follow(&mut reported, true, "x"), "once per onset");
        assert!(!follow(&mut reported, false, "x"), "it clears");
        assert!(!reported);
        assert!(follow(&mut reported, true, "x"), "and begins again");
    }
}
