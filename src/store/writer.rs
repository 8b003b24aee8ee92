//! The group-commit writer every backend shares: one writer per server owns every write. It is
//! fed by a bounded queue (waiting for room there is ingest's backpressure), takes every
//! command waiting, up to `batch_max`, and writes each run of appends in one transaction of
//! its [`WriteBackend`]; tickets resolve only after that transaction committed. Around the
//! backend it keeps what is the same for all of them: the batching, the fan-out of results,
//! the bounded memory of relayed events that were not stored (so a resend is still a
//! duplicate), the outbox level and its notices, and the reports of the cap's trims.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::stats::CommitStats;
use super::{
    AppendOutcome, AppendTicket, BatchTicket, RetentionRules, StoreError, StoreNotice, WriteTo,
};
use crate::catalog::EventType;
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::flood::Block;
use crate::recent::RecentKeys;

/// How many identities of relayed, not-stored events the writer remembers to drop resends.
const RECENT_UNSTORED: usize = 1 << 17;

/// Where a command's result goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Whose a record is: this server's own, or shared by every server on the store.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This server's (its registries).
    Server,
    /// Every server's on this store (credentials, revocations).
    Shared,
}

/// One event of a group commit and where it goes.
pub(crate) struct Append<'a> {
    /// The event.
    pub event: &'a ClassifiedEvent,
    /// Events table, outbox, or both.
    pub to: WriteTo,
}

/// Room in a durable queue (outbox, notifications), for the transaction that adds to it.
#[derive(Copy, Clone, Debug)]
pub(crate) struct QueueRoom {
    /// Entries in it before this transaction.
    pub len: u64,
    /// Its limit.
    pub max: u64,
}

impl QueueRoom {
    /// How many of its oldest entries to drop after `added` more.
    pub fn excess(self, added: u64) -> u64 {
        (self.len + added).saturating_sub(self.max)
    }
}

/// What bounds a group commit: the event cap and the room in the queues.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Limits {
    /// The event cap.
    pub cap: u64,
    /// Room in the outbox.
    pub room: QueueRoom,
    /// Room in the notification queue.
    pub notify_room: QueueRoom,
}

/// Records of one kind and owner to upsert in one transaction.
pub(crate) struct Records {
    /// Whose they are.
    pub owner: Owner,
    /// The registry they belong to.
    pub kind: String,
    /// (id, JSON) pairs.
    pub records: Vec<(String, String)>,
}

/// A compare-and-swap of one shared record.
pub(crate) struct RecordSwap {
    /// The registry.
    pub kind: String,
    /// The record.
    pub id: String,
    /// The JSON it must still hold.
    pub expected: String,
    /// The JSON it gets.
    pub json: String,
}

/// A trim of the oldest events down to the cap.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Trim {
    /// Events stored when it began.
    pub count: u64,
    /// Events it deleted.
    pub deleted: u64,
    /// Events stored after it.
    pub remaining: u64,
}

/// What a group commit wrote.
pub(crate) struct Written {
    /// One outcome per append, in order.
    pub outcomes: Vec<AppendOutcome>,
    /// Entries it added to the outbox.
    pub outbox_added: u64,
    /// Oldest outbox entries it dropped to stay within the limit.
    pub outbox_dropped: u64,
    /// Notifications it queued.
    pub notify_added: u64,
    /// Oldest queued notifications it dropped to stay within the limit.
    pub notify_dropped: u64,
    /// The cap's trim, when the batch took the count over it.
    pub trim: Option<Trim>,
}

/// A backend's writing side: its transactions and SQL. Every method runs on the writer, one at
/// a time, so a backend keeps its caches (known partitions, identity sets) without locks.
#[async_trait::async_trait]
pub(crate) trait WriteBackend: Send + 'static {
    /// Writes one group commit in one transaction: each event not stored yet (by identity)
    /// into `events` when `to.events`; into the outbox when `to.outbox` (and, with `events`,
    /// only if it was new), dropping the outbox's oldest beyond its room; the same for the
    /// notification queue and `to.notify`; and, when the count
    /// goes over the cap, deletes the oldest events down to [`super::codec::cap_target`].
    async fn write(&mut self, batch: &[Append<'_>], limits: Limits) -> Result<Written, StoreError>;

    /// Deletes the oldest events when more than `cap` are stored (a cap lowered since the last
    /// start).
    async fn trim_to_cap(&mut self, cap: u64) -> Result<Option<Trim>, StoreError>;

    /// Deletes the outbox entries at or below `upto`; returns how many.
    async fn ack_outbox(&mut self, upto: u64) -> Result<u64, StoreError>;

    /// Deletes the queued notifications at `positions`; returns how many.
    async fn remove_notifications(&mut self, positions: &[u64]) -> Result<u64, StoreError>;

    /// Deletes events older than their type's retention at `now`; returns how many.
    async fn sweep(&mut self, now: Timestamp, rules: &RetentionRules) -> Result<u64, StoreError>;

    /// Upserts a catalog entry by name.
    async fn save_event_type(&mut self, event_type: &EventType) -> Result<(), StoreError>;

    /// Replaces this server's saved blocks with `blocks`.
    async fn save_blocks(&mut self, blocks: &[Block]) -> Result<(), StoreError>;

    /// Upserts records of one kind, in one transaction.
    async fn save_records(&mut self, batch: &Records) -> Result<(), StoreError>;

    /// Replaces a shared record only if it still holds the expected JSON; returns whether it
    /// did.
    async fn swap_shared_record(&mut self, swap: &RecordSwap) -> Result<bool, StoreError>;

    /// Called once after the last command (SQLite checkpoints its WAL).
    async fn close(&mut self);
}

/// A request to the writer.
pub(crate) enum Command {
    /// Events to append in one group commit, answered together.
    Append {
        events: Vec<(Arc<ClassifiedEvent>, WriteTo)>,
        done: Reply<Vec<AppendOutcome>>,
    },
    AckOutbox {
        upto: u64,
        done: Reply<u64>,
    },
    RemoveNotifications {
        positions: Vec<u64>,
        done: Reply<u64>,
    },
    Sweep {
        now: Timestamp,
        rules: RetentionRules,
        done: Reply<u64>,
    },
    SaveType {
        event_type: EventType,
        done: Reply<()>,
    },
    SaveBlocks {
        blocks: Vec<Block>,
        done: Reply<()>,
    },
    SaveRecords {
        batch: Records,
        done: Reply<()>,
    },
    SwapSharedRecord {
        swap: RecordSwap,
        done: Reply<bool>,
    },
    Shutdown,
}

/// What the writer needs besides its backend.
pub(crate) struct WriterOptions {
    /// Most commands per transaction.
    pub batch_max: usize,
    /// Capacity of the write queue.
    pub queue_capacity: usize,
    /// The event cap.
    pub max_events: u64,
    /// The outbox limit.
    pub outbox_max: u64,
    /// Entries in the outbox at start-up.
    pub outbox_len: u64,
    /// The notification queue's limit.
    pub notify_max: u64,
    /// Notifications queued at start-up.
    pub notify_len: u64,
}

/// Where the writer loop runs.
pub(crate) enum RunOn {
    /// A thread of its own with this name (a backend whose calls block: SQLite).
    Thread(&'static str),
    /// A task on the runtime (a backend whose calls await: PostgreSQL).
    Task,
}

/// The other end of the writer: what the store's methods send commands through.
pub(crate) struct WriterHandle {
    commands: mpsc::Sender<Command>,
    outbox_len: Arc<AtomicU64>,
    notify: Arc<NotifyGauge>,
    stopped: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    stats: Arc<CommitStats>,
}

/// Enforces the cap once, then starts the writer loop over `backend`. The receiver gets the
/// store's [`StoreNotice`]s.
pub(crate) async fn start<B: WriteBackend>(
    backend: B,
    options: WriterOptions,
    run_on: RunOn,
) -> Result<(WriterHandle, mpsc::UnboundedReceiver<StoreNotice>), StoreError> {
    let (notices, notice_rx) = mpsc::unbounded_channel();
    let outbox_len = Arc::new(AtomicU64::new(options.outbox_len));
    let stats = Arc::new(CommitStats::default());
    let notify = Arc::new(NotifyGauge {
        len: AtomicU64::new(options.notify_len),
        dropped: AtomicU64::new(0),
        max: options.notify_max.max(1),
    });
    let mut writer = Writer {
        notify: notify.clone(),
        stats: stats.clone(),
        backend,
        batch_max: options.batch_max.max(1),
        max_events: options.max_events,
        outbox: OutboxGauge {
            len: outbox_len.clone(),
            max: options.outbox_max.max(1),
            near_full: false,
        },
        notices,
        recent_unstored: RecentKeys::new(RECENT_UNSTORED),
    };
    writer.outbox.note_level(&writer.notices);
    // A cap lowered since the last start is enforced before serving.
    let trim = writer.backend.trim_to_cap(writer.max_events).await?;
    writer.report_trim(trim, "event cap lowered: oldest events deleted");
    let (commands, rx) = mpsc::channel(options.queue_capacity.max(1));
    let (stopped_tx, stopped) = oneshot::channel();
    let run = async move {
        writer.run(rx).await;
        let _ = stopped_tx.send(());
    };
    match run_on {
        RunOn::Thread(name) => {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || futures::executor::block_on(run))
                .map_err(|e| StoreError::backend(format!("cannot start writer thread: {e}")))?;
        }
        RunOn::Task => {
            tokio::spawn(run);
        }
    }
    Ok((
        WriterHandle {
            commands,
            outbox_len,
            notify,
            stopped: tokio::sync::Mutex::new(Some(stopped)),
            stats,
        },
        notice_rx,
    ))
}

impl WriterHandle {
    async fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| StoreError::unavailable("the event store is shutting down"))
    }

    /// Queues one event for the next group commit.
    pub async fn append(
        &self,
        event: Arc<ClassifiedEvent>,
        to: WriteTo,
    ) -> Result<AppendTicket, StoreError> {
        Ok(AppendTicket(self.append_batch(vec![(event, to)]).await?))
    }

    /// Queues events for the next group commit as one command: they share its transaction and
    /// one reply.
    pub async fn append_batch(
        &self,
        events: Vec<(Arc<ClassifiedEvent>, WriteTo)>,
    ) -> Result<BatchTicket, StoreError> {
        let (done, rx) = oneshot::channel();
        if events.is_empty() {
            let _ = done.send(Ok(Vec::new()));
        } else {
            self.send(Command::Append { events, done }).await?;
        }
        Ok(BatchTicket(rx))
    }

    /// Sends the command `make` builds around a reply channel and waits for the reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(make(done)).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::unavailable("the store writer stopped")))
    }

    /// Entries in the outbox now.
    pub fn outbox_len(&self) -> u64 {
        self.outbox_len.load(Ordering::Relaxed)
    }

    /// Notifications queued now, and how many the queue's limit dropped since start.
    pub fn notify_queue(&self) -> (u64, u64) {
        (
            self.notify.len.load(Ordering::Relaxed),
            self.notify.dropped.load(Ordering::Relaxed),
        )
    }

    /// Commands waiting in the write queue, and its capacity.
    pub fn queue(&self) -> (usize, usize) {
        let max = self.commands.max_capacity();
        (max - self.commands.capacity(), max)
    }

    /// The sizes and durations of the group commits so far.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Commits everything queued, then stops the writer and waits for it.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
        if let Some(stopped) = self.stopped.lock().await.take() {
            let _ = stopped.await;
        }
    }
}

/// Events waiting for the next group commit and the sender that resolves their ticket.
struct QueuedAppend {
    events: Vec<(Arc<ClassifiedEvent>, WriteTo)>,
    done: Reply<Vec<AppendOutcome>>,
}

impl Command {
    /// How much of a group commit's `batch_max` the command takes: its events (at least 1).
    fn weight(&self) -> usize {
        match self {
            Command::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }
}

/// The writer's state.
struct Writer<B> {
    backend: B,
    batch_max: usize,
    max_events: u64,
    outbox: OutboxGauge,
    notify: Arc<NotifyGauge>,
    notices: mpsc::UnboundedSender<StoreNotice>,
    /// Identities of the latest relayed events of types not stored here.
    recent_unstored: RecentKeys,
    /// Sizes and durations of the group commits.
    stats: Arc<CommitStats>,
}

impl<B: WriteBackend> Writer<B> {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.recv().await {
            let mut weight = first.weight();
            batch.push(first);
            while weight < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => {
                        weight += c.weight();
                        batch.push(c);
                    }
                    Err(_) => break,
                }
            }
            if self.process(&mut batch).await {
                // Commit what is still queued behind the shutdown request, then stop.
                rx.close();
                let mut weight = 0;
                while let Ok(c) = rx.try_recv() {
                    weight += c.weight();
                    batch.push(c);
                    if weight >= self.batch_max {
                        self.process(&mut batch).await;
                        weight = 0;
                    }
                }
                self.process(&mut batch).await;
                break;
            }
        }
        self.backend.close().await;
        tracing::info!("event store writer stopped");
    }

    /// Processes a batch in order, group-committing runs of appends. Returns true on shutdown.
    async fn process(&mut self, batch: &mut Vec<Command>) -> bool {
        let mut stop = false;
        let mut appends = Vec::new();
        for cmd in batch.drain(..) {
            let other = match cmd {
                Command::Append { events, done } => {
                    appends.push(QueuedAppend { events, done });
                    continue;
                }
                other => other,
            };
            self.commit(&mut appends).await;
            let b = &mut self.backend;
            match other {
                Command::AckOutbox { upto, done } => {
                    let r = b.ack_outbox(upto).await;
                    if let Ok(deleted) = r
                        && deleted > 0
                    {
                        self.outbox.change(0, deleted, &self.notices);
                    }
                    let _ = done.send(r);
                }
                Command::RemoveNotifications { positions, done } => {
                    let r = b.remove_notifications(&positions).await;
                    if let Ok(deleted) = r {
                        self.notify.change(0, deleted);
                    }
                    let _ = done.send(r);
                }
                Command::Sweep { now, rules, done } => {
                    let r = b.sweep(now, &rules).await;
                    if let Ok(deleted @ 1..) = r {
                        tracing::info!(deleted, "retention sweep deleted expired events");
                    }
                    let _ = done.send(r);
                }
                Command::SaveType { event_type, done } => {
                    let _ = done.send(b.save_event_type(&event_type).await);
                }
                Command::SaveBlocks { blocks, done } => {
                    let _ = done.send(b.save_blocks(&blocks).await);
                }
                Command::SaveRecords { batch, done } => {
                    let _ = done.send(b.save_records(&batch).await);
                }
                Command::SwapSharedRecord { swap, done } => {
                    let _ = done.send(b.swap_shared_record(&swap).await);
                }
                Command::Shutdown => stop = true,
                Command::Append { .. } => unreachable!("appends are taken above"),
            }
        }
        self.commit(&mut appends).await;
        stop
    }

    /// One group commit of `appends`; resolves every ticket.
    async fn commit(&mut self, appends: &mut Vec<QueuedAppend>) {
        if appends.is_empty() {
            return;
        }
        // A relayed event of a type not stored here: a secondary's resend must not be
        // published or forwarded twice either. Remembered only once the batch commits.
        let total: usize = appends.iter().map(|a| a.events.len()).sum();
        let mut outcomes: Vec<Option<AppendOutcome>> = vec![None; total];
        let mut remembered = Vec::new();
        let mut batch = Vec::with_capacity(total);
        let queued = appends.iter().flat_map(|a| a.events.iter());
        for ((event, to), outcome) in queued.zip(outcomes.iter_mut()) {
            if let Some(relay) = event.relay.as_ref().filter(|_| !to.events) {
                let key = self.recent_unstored.key(&[
                    &relay.origin_server,
                    &event.device_id,
                    &event.event_id,
                ]);
                if !self.recent_unstored.insert(key) {
                    *outcome = Some(AppendOutcome::Duplicate);
                    continue;
                }
                remembered.push(key);
            }
            batch.push(Append { event, to: *to });
        }
        let room = QueueRoom {
            len: self.outbox.len(),
            max: self.outbox.max,
        };
        let notify_room = QueueRoom {
            len: self.notify.len.load(Ordering::Relaxed),
            max: self.notify.max,
        };
        let written = if batch.is_empty() {
            Ok(Written {
                outcomes: Vec::new(),
                outbox_added: 0,
                outbox_dropped: 0,
                notify_added: 0,
                notify_dropped: 0,
                trim: None,
            })
        } else {
            let started = std::time::Instant::now();
            let limits = Limits {
                cap: self.max_events,
                room,
                notify_room,
            };
            let written = self.backend.write(&batch, limits).await;
            self.stats.record(batch.len(), started.elapsed());
            written
        };
        drop(batch);
        match written {
            Ok(w) => {
                if w.outbox_added > 0 || w.outbox_dropped > 0 {
                    if w.outbox_dropped > 0 {
                        tracing::debug!(
                            dropped = w.outbox_dropped,
                            max = self.outbox.max,
                            "hierarchy outbox full: oldest events dropped (reported as FLEET_OUTBOX_OVERFLOW)"
                        );
                        let _ = self.notices.send(StoreNotice::OutboxOverflow {
                            dropped: w.outbox_dropped,
                            max: self.outbox.max,
                        });
                    }
                    self.outbox
                        .change(w.outbox_added, w.outbox_dropped, &self.notices);
                }
                if w.notify_dropped > 0 {
                    tracing::error!(
                        dropped = w.notify_dropped,
                        max = self.notify.max,
                        "notification queue full: its oldest notifications were dropped (counted in fleet_notifications_dropped_total)"
                    );
                    self.notify
                        .dropped
                        .fetch_add(w.notify_dropped, Ordering::Relaxed);
                }
                self.notify.change(w.notify_added, w.notify_dropped);
                self.report_trim(w.trim, "event cap reached: oldest events deleted");
                let mut written = w.outcomes.into_iter();
                let mut outcomes = outcomes.into_iter();
                for a in appends.drain(..) {
                    let answer = outcomes
                        .by_ref()
                        .take(a.events.len())
                        .map(|outcome| outcome.or_else(|| written.next()))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            StoreError::backend(
                                "the backend answered fewer events than it was given",
                            )
                        });
                    let _ = a.done.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = total, "group commit failed");
                for k in remembered {
                    self.recent_unstored.forget(k);
                }
                // A batch is answered whole: when its transaction failed, so did the batch,
                // unless every event of it was known as a duplicate without it.
                let mut outcomes = outcomes.into_iter();
                for a in appends.drain(..) {
                    let known: Option<Vec<_>> = outcomes.by_ref().take(a.events.len()).collect();
                    let _ = a.done.send(known.ok_or_else(|| e.clone()));
                }
            }
        }
    }

    /// Reports a trim of the cap: the notices that raise the truncation events, and the log.
    fn report_trim(&self, trim: Option<Trim>, what: &'static str) {
        let Some(t) = trim else { return };
        let cap = self.max_events;
        tracing::warn!(deleted = t.deleted, remaining = t.remaining, cap, "{what}");
        let _ = self.notices.send(StoreNotice::TruncationStarted {
            count: t.count,
            cap,
            to_delete: super::codec::over_cap(t.count, cap).unwrap_or(t.deleted),
        });
        let _ = self.notices.send(StoreNotice::TruncationFinished {
            deleted: t.deleted,
            remaining: t.remaining,
            cap,
        });
    }
}

/// The notification queue's length and what its limit dropped (shared with the metrics).
struct NotifyGauge {
    len: AtomicU64,
    dropped: AtomicU64,
    max: u64,
}

impl NotifyGauge {
    fn change(&self, added: u64, removed: u64) {
        let len = self.len.load(Ordering::Relaxed);
        self.len
            .store((len + added).saturating_sub(removed), Ordering::Relaxed);
    }
}

/// The outbox's length (shared with the store's readers) and whether it is above its
/// warning level, reported once per crossing.
struct OutboxGauge {
    len: Arc<AtomicU64>,
    max: u64,
    near_full: bool,
}

impl OutboxGauge {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Adds `added`, removes `removed`, and reports a crossing of the warning level.
    fn change(&mut self, added: u64, removed: u64, notices: &mpsc::UnboundedSender<StoreNotice>) {
        let len = (self.len() + added).saturating_sub(removed);
        self.len.store(len, Ordering::Relaxed);
        self.note_level(notices);
    }

    /// Reports the outbox crossing its warning level (90 % of its limit), once per crossing.
    fn note_level(&mut self, notices: &mpsc::UnboundedSender<StoreNotice>) {
        let len = self.len();
        let near_full = len.saturating_mul(10) >= self.max.saturating_mul(9);
        if near_full == self.near_full {
            return;
        }
        self.near_full = near_full;
        if near_full {
            tracing::warn!(
                len,
                max = self.max,
                "hierarchy outbox is over 90 % full: the primary has not acknowledged events for a while; when it is full the oldest events are dropped"
            );
        } else {
            tracing::info!(len, max = self.max, "hierarchy outbox back below 90 %");
        }
        let _ = notices.send(StoreNotice::OutboxLevel {
            len,
            max: self.max,
            near_full,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_level_is_reported_once_per_crossing() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut g = OutboxGauge {
            len: Arc::new(AtomicU64::new(0)),
            max: 10,
            near_full: false,
        };
        g.change(9, 0, &tx);
        g.change(1, 0, &tx);
        g.change(0, 5, &tx);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![
                StoreNotice::OutboxLevel {
                    len: 9,
                    max: 10,
                    near_full: true
                },
                StoreNotice::OutboxLevel {
                    len: 5,
                    max: 10,
                    near_full: false
                },
            ]
        );
    }
}
