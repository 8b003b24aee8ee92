//! `fleetevents.v1.EventService`: Classify, Stream, Subscribe, QueryEvents.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use futures::FutureExt;
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{principal, speak_for};
use super::convert;
use super::paging;
use super::proto::{
    self, Classification, QueryEventsRequest, QueryEventsResponse, SubscribeRequest,
    event_service_server::EventService,
};
use super::status::{Reason, decode_status, in_stream, refuse};
use super::validate::Checked;
use crate::auth::{AccessControl, Principal};
use crate::classify::IncomingEvent;
use crate::engine::stats::Refusal;
use crate::engine::{
    Engine, PendingBatch, QueriedEvent, QueryRequest, SettledBatch, subscriber_filter,
};
use crate::store::PageCursor;

/// Events of one `Stream` call accepted but not yet answered. Bounds the memory of a stream and
/// lets many events of one stream share a group commit.
pub const STREAM_IN_FLIGHT: usize = 256;

/// The EventService adapter.
pub struct EventApi {
    engine: Arc<Engine>,
    /// Long-lived calls re-check their caller against it as they go.
    access: Arc<AccessControl>,
    /// Bounds on open `Subscribe` calls.
    subscribers: Arc<SubscriberSlots>,
    /// `Stream` calls open now.
    streams: Arc<AtomicUsize>,
}

impl EventApi {
    /// Serves `engine`; `access` ends streams whose credential is revoked; at most
    /// `max_subscribers` Subscribe calls are open at once, `max_per_connection` per connection.
    pub fn new(
        engine: Arc<Engine>,
        access: Arc<AccessControl>,
        max_subscribers: usize,
        max_per_connection: usize,
    ) -> Self {
        EventApi {
            engine,
            access,
            subscribers: Arc::new(SubscriberSlots {
                total: AtomicUsize::new(0),
                max_total: max_subscribers,
                per_connection: DashMap::new(),
                max_per_connection,
            }),
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The counts of its open long-lived calls, for the metrics.
    pub fn open_calls(&self) -> OpenCalls {
        OpenCalls {
            subscribers: self.subscribers.clone(),
            streams: self.streams.clone(),
        }
    }
}

/// How many `Stream` and `Subscribe` calls are open (see [`EventApi::open_calls`]).
#[derive(Clone)]
pub struct OpenCalls {
    subscribers: Arc<SubscriberSlots>,
    streams: Arc<AtomicUsize>,
}

impl OpenCalls {
    /// `Stream` calls open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// `Subscribe` calls open now (a refused one is never counted).
    pub fn subscribers(&self) -> usize {
        // A refused call holds a slot for an instant before giving it back.
        self.subscribers
            .total
            .load(Ordering::Relaxed)
            .min(self.subscribers.max_total)
    }
}

/// Counts one open `Stream` call while it lives.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        OpenStream(count.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts of open `Subscribe` calls, in total and per connection.
struct SubscriberSlots {
    total: AtomicUsize,
    max_total: usize,
    per_connection: DashMap<u64, usize>,
    max_per_connection: usize,
}

/// One open `Subscribe` call's place in [`SubscriberSlots`], given back on drop.
struct SubscriberSlot {
    slots: Arc<SubscriberSlots>,
    connection: Option<u64>,
}

impl SubscriberSlots {
    fn take(self: &Arc<Self>, connection: Option<u64>) -> Result<SubscriberSlot, Status> {
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        let mut slot = SubscriberSlot {
            slots: self.clone(),
            connection: None,
        };
        if total >= self.max_total {
            return Err(refuse(
                Reason::TooManySubscribers,
                format!(
                    "{} subscriptions are open on this server, its limit \
                 (subscribe.max_subscribers); try again later",
                    self.max_total
                ),
            ));
        }
        let Some(id) = connection else {
            return Ok(slot);
        };
        let mut n = self.per_connection.entry(id).or_insert(0);
        if *n >= self.max_per_connection {
            return Err(refuse(
                Reason::TooManySubscribers,
                format!(
                    "{} subscriptions are open on this connection, its limit \
                 (subscribe.max_per_connection); open another connection or close one",
                    self.max_per_connection
                ),
            ));
        }
        *n += 1;
        drop(n);
        slot.connection = Some(id);
        Ok(slot)
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(id) = self.connection {
            self.slots.per_connection.remove_if_mut(&id, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// How often a `Subscribe` call re-checks its caller's credential for expiry (a device
/// certificate's end, on the server's clock). Revocations need no polling: they wake the call
/// at once through [`crate::auth::AccessControl::changes`]. A per-call timer of one second
/// cost ingest 25 % with 1 000 subscribers open (benches/RESULTS.md).
const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

type ClassificationStream = Pin<Box<dyn Stream<Item = Result<Classification, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for EventApi {
    async fn classify(
        &self,
        request: Request<proto::Event>,
    ) -> Result<Response<Classification>, Status> {
        let who = principal(&request);
        let mut event = request.into_inner();
        let event = speak_for(&who, "device_id", &mut event.device_id)
            .and_then(|()| convert::incoming(event))
            .inspect_err(|s| count_refusal(&self.engine, s))?;
        let (classified, outcome) = self.engine.ingest_with_outcome(event).await?;
        Ok(Response::new(convert::answer(&classified, outcome)))
    }

    type StreamStream = ClassificationStream;

    async fn stream(
        &self,
        request: Request<Streaming<proto::Event>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(ANSWER_BATCHES);
        let who = principal(&request);
        let open = OpenStream::new(&self.streams);
        let run = run_stream(
            self.engine.clone(),
            self.access.clone(),
            who,
            request.into_inner(),
            tx,
        );
        let task = tokio::spawn(async move {
            let _open = open;
            run.await
        });
        let answers = ReceiverStream::new(rx).flat_map(futures::stream::iter);
        Ok(Response::new(guarded(answers, task, "Stream")))
    }

    type SubscribeStream = ClassificationStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let connection = request
            .extensions()
            .get::<super::auth::PeerInfo>()
            .map(|p| p.connection);
        let slot = self.subscribers.take(connection)?;
        let access = self.access.clone();
        let r = request.into_inner();
        let filter = subscriber_filter(
            convert::severity(r.min_severity, "min_severity")?,
            r.event_types,
            r.device_ids,
        );
        // Registered before the response is returned: once the caller has the response
        // headers, every later event that matches reaches it.
        let mut subscription = self.engine.subscribe(filter);
        let shutdown = self.engine.shutdown_signal().clone();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            let _slot = slot;
            let mut recheck = tokio::time::interval(RECHECK_EVERY);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut changes = access.changes();
            loop {
                tokio::select! {
                    _ = recheck.tick() => {
                        if let Err(e) = access.still_valid(&who) {
                            let _ = tx.send(Err(Status::from(e))).await;
                            break;
                        }
                    }
                    Ok(()) = changes.changed() => {
                        if let Err(e) = access.still_valid(&who) {
                            let _ = tx.send(Err(Status::from(e))).await;
                            break;
                        }
                    }
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(refuse(Reason::ShuttingDown, "the server is shutting down"))).await;
                        break;
                    }
                    _ = tx.closed() => break,
                    next = subscription.next() => match next {
                        Some((event, missed)) => {
                            if let Err(e) = access.still_valid(&who) {
                                let _ = tx.send(Err(Status::from(e))).await;
                                break;
                            }
                            let mut c = convert::full(&event);
                            c.missed_before = missed;
                            if tx.send(Ok(c)).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        Ok(Response::new(guarded(
            ReceiverStream::new(rx),
            task,
            "Subscribe",
        )))
    }

    async fn query_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> Result<Response<QueryEventsResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let q = QueryRequest {
            min_severity: convert::severity(r.min_severity, "min_severity")?,
            since: convert::timestamp(r.since, "since")?,
            until: convert::timestamp(r.until, "until")?,
            device_id: r.device_id,
            event_type: r.event_type,
            page_size: r.page_size,
            page_token: r.page_token,
        };
        let (events, next) = self.engine.query(q).await?;
        Ok(Response::new(bounded_page(events, next)))
    }
}

/// A `QueryEvents` answer within [`paging::PAGE_BYTES`] (3 MiB, well under the 4 MiB a client
/// takes by default): a page of large events is cut after the last one that fits (at least one
/// per page, each being bounded by the event limits), and its token continues right after it.
fn bounded_page(events: Vec<QueriedEvent>, next: Option<String>) -> QueryEventsResponse {
    use prost::Message;
    let total = events.len();
    let mut out = Vec::with_capacity(total);
    let mut bytes = 0;
    let mut cut_after = None;
    for q in events {
        let cursor = PageCursor {
            occurred_at: q.stored.occurred_at,
            seq: q.stored.seq,
        };
        let c = convert::queried(q);
        // The length prefix and tag of a repeated field are at most 6 bytes.
        let len = c.encoded_len() + 6;
        if !out.is_empty() && bytes + len > paging::PAGE_BYTES {
            break;
        }
        bytes += len;
        out.push(c);
        cut_after = Some(cursor);
    }
    let next_page_token = match (out.len() < total, cut_after) {
        (true, Some(cursor)) => cursor.encode(),
        _ => next.unwrap_or_default(),
    };
    QueryEventsResponse {
        events: out,
        next_page_token,
    }
}

/// Counts an event refused before the engine saw it (the engine counts its own refusals).
fn count_refusal(engine: &Engine, status: &Status) {
    engine.stats().refused(match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Refusal::PermissionDenied,
        _ => Refusal::InvalidArgument,
    });
}

/// The response stream of a call served by `task`: what the task sends, and then, if the task
/// ended by panicking, an INTERNAL status. Without it a panic would drop the sender and end
/// the call with OK, answers missing; with it the client knows to resend from its first
/// unanswered event.
fn guarded(
    answers: impl Stream<Item = Result<Classification, Status>> + Send + 'static,
    task: tokio::task::JoinHandle<()>,
    call: &'static str,
) -> ClassificationStream {
    let ending = futures::stream::once(async move {
        match task.await {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(call, error = %e, "a call's task failed");
                Some(Err(refuse(
                    Reason::ServerFailed,
                    format!(
                        "{call}: the server failed while serving this call; the events answered \
                     before this status are settled, resend the others"
                    ),
                )))
            }
        }
    })
    .filter_map(futures::future::ready);
    Box::pin(answers.chain(ending))
}

/// Batches of answers a `Stream` call's task may have handed to the response stream and not yet
/// sent (each at most [`STREAM_IN_FLIGHT`] answers).
const ANSWER_BATCHES: usize = 4;

/// What one `Stream` call's task hands to its response stream at once: the answers of a batch,
/// in order, or the status that ends the call.
type AnswerBatch = Vec<Result<Classification, Status>>;

/// The settling of one batch of a stream, with its size.
type Settling = Pin<Box<dyn Future<Output = (SettledBatch, usize)> + Send>>;

fn settle(engine: Arc<Engine>, batch: PendingBatch) -> Settling {
    let n = batch.len();
    Box::pin(async move { (engine.settle_batch(batch).await, n) })
}

/// What one read of a `Stream` took: the events it had already received, converted, and the
/// status that ends the reading, if any (a bad event, the end of the input).
struct Received {
    events: Vec<IncomingEvent>,
    /// The status ending the call, naming its event; the events before it are accepted.
    refused: Option<Status>,
    /// The client closed its side (or the reading stopped).
    done: bool,
}

/// Takes `first` and then every event the stream has already received (without waiting), up
/// to `room`: the batch the hot path works on. Each is checked as it is taken (a device names
/// only itself; the fields convert); `index` counts the events read.
fn take_received(
    engine: &Engine,
    first: Result<Option<proto::Event>, Status>,
    inbound: &mut Streaming<proto::Event>,
    who: &Principal,
    room: usize,
    index: &mut u64,
) -> Received {
    let mut got = Received {
        events: Vec::with_capacity(room.min(64)),
        refused: None,
        done: false,
    };
    let mut next = first;
    loop {
        match next {
            Ok(Some(mut event)) => {
                *index += 1;
                let converted = match speak_for(who, "device_id", &mut event.device_id) {
                    Ok(()) => convert::incoming_or_back(event),
                    Err(s) => Err((s, event.event_id)),
                };
                match converted {
                    Ok(ev) => got.events.push(ev),
                    Err((s, id)) => {
                        count_refusal(engine, &s);
                        got.refused = Some(in_stream(s, *index, Some(&id)));
                        got.done = true;
                        return got;
                    }
                }
            }
            Ok(None) => {
                got.done = true;
                return got;
            }
            Err(s) => {
                got.refused = Some(in_stream(decode_status(s), *index + 1, None));
                got.done = true;
                return got;
            }
        }
        if got.events.len() >= room {
            return got;
        }
        match inbound.message().now_or_never() {
            Some(m) => next = m,
            None => return got,
        }
    }
}

/// Drives one `Stream` call: takes what the stream has received as a batch (in arrival order,
/// at most [`STREAM_IN_FLIGHT`] events accepted and not yet answered), hands each batch to the
/// engine as one unit (one group-commit entry, one wake-up), and answers strictly in order,
/// a batch's answers at once. A bad event stops the reading: the events before it are still
/// answered, then the call ends with its status. So does shutdown (UNAVAILABLE) once the
/// accepted events are answered.
async fn run_stream(
    engine: Arc<Engine>,
    access: Arc<AccessControl>,
    who: Principal,
    mut inbound: Streaming<proto::Event>,
    out: mpsc::Sender<AnswerBatch>,
) {
    let mut in_flight: FuturesOrdered<Settling> = FuturesOrdered::new();
    let mut in_flight_events = 0;
    let mut reading = true;
    let mut ending: Option<Status> = None;
    let mut index: u64 = 0;
    let mut answered: u64 = 0;
    let shutdown = engine.shutdown_signal().clone();
    loop {
        tokio::select! {
            biased;
            Some((settled, n)) = in_flight.next(), if !in_flight.is_empty() => {
                in_flight_events -= n;
                answered += settled.answers.len() as u64;
                let answers: AnswerBatch = settled
                    .answers
                    .iter()
                    .map(|(event, outcome)| Ok(convert::answer(event, *outcome)))
                    .collect();
                if !answers.is_empty() && out.send(answers).await.is_err() {
                    return; // the client went away
                }
                if let Some((e, event)) = settled.failure {
                    // A failed commit: answer nothing after it; the client resends from here
                    // (the event ids make that safe).
                    ending = Some(in_stream(Status::from(e), answered + 1, Some(&event.event_id)));
                    break;
                }
            },
            _ = shutdown.cancelled(), if reading => {
                reading = false;
                ending = Some(refuse(Reason::ShuttingDown, "the server is shutting down"));
            }
            message = inbound.message(), if reading && in_flight_events < STREAM_IN_FLIGHT => {
                let first_index = index + 1;
                // A revoked credential ends the call: checked once per batch, as it is read.
                if let Err(e) = access.still_valid(&who) {
                    let s = Status::from(e);
                    count_refusal(&engine, &s);
                    reading = false;
                    let id = message.as_ref().ok().and_then(Option::as_ref).map(|e| e.event_id.clone());
                    ending = Some(in_stream(s, first_index, id.as_deref()));
                    continue;
                }
                let room = STREAM_IN_FLIGHT - in_flight_events;
                let got = take_received(&engine, message, &mut inbound, &who, room, &mut index);
                if got.done {
                    reading = false;
                }
                if !got.events.is_empty() {
                    let sent = got.events.len();
                    let (batch, refusal) = engine.accept_batch(got.events).await;
                    if let Some(r) = refusal {
                        let at = first_index + batch.len() as u64;
                        reading = false;
                        ending = Some(in_stream(Status::from(r.error), at, Some(&r.event_id)));
                    } else {
                        debug_assert_eq!(batch.len(), sent);
                    }
                    if !batch.is_empty() {
                        in_flight_events += batch.len();
                        in_flight.push_back(settle(engine.clone(), batch));
                    }
                }
                if ending.is_none() {
                    ending = got.refused;
                }
            }
            else => break,
        }
    }
    if let Some(status) = ending {
        let closing = status.code() == tonic::Code::Unavailable;
        if answered > 0 {
            // grpc-js hands a call's error status to the application as soon as it reads the
            // trailers, dropping answers it read in the same go but has not yet delivered
            // (grpc/grpc-node#2764). Letting the answers go out first keeps them all.
            tokio::time::sleep(ERROR_STATUS_DELAY).await;
        }
        let _ = out.send(vec![Err(status)]).await;
        if closing {
            // Shutdown closes the connection once this call is over. A client that is still
            // sending would then hit a broken pipe before reading our status, so keep reading
            // (and dropping) its events until it has seen the status and stopped, or a deadline.
            drop(out);
            let _ = tokio::time::timeout(SHUTDOWN_LINGER, async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
    }
}

/// How long a `Stream` call that answered events waits before its error status, so the
/// answers reach the client's application first (see `run_stream`).
pub const ERROR_STATUS_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a `Stream` call ended by shutdown waits for its client to stop sending.
const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
