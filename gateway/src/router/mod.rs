//! The router: one thread that owns the spool and the Kafka producer and decides, for
//! every record, whether it goes straight to Kafka (direct mode) or into the spool.
//!
//! ```text
//!  inputs ──Item──> router ──send──> librdkafka ──Report──> router
//!                     │  └──append──> spool (group commit) ──drain──┘
//! ```
//!
//! Rules (the architecture invariants in ARCHITECTURE.md):
//! - Every record gets a `seq` on arrival: the gateway-wide receive order. Spool rows are
//!   keyed by it and drained in it, so per-device order holds.
//! - **Direct mode** only while the spool is empty, nothing is being drained, and Kafka is
//!   healthy. Otherwise new records go behind the spool.
//! - Kafka is unhealthy after a failed delivery, a full producer queue, or when the oldest
//!   direct record waited longer than `spool_after`; then every direct record still in
//!   flight is also copied into the spool (so its upstream ack can go out), and its row is
//!   deleted if Kafka confirms it after all.
//! - A spool row is deleted only after its delivery report came back without error.
//! - Drain starts only when no direct record is in flight (a failed one re-enters the
//!   spool at its original `seq`, ahead of later records). While Kafka is unhealthy the
//!   drain sends one probe batch at a time; the first confirmed record switches to full
//!   speed.
//! - An upstream [`Ack`] is released when its record is committed to the spool or
//!   confirmed by Kafka (`on_spool`), or only when confirmed (`on_delivery`).

mod in_flight;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_config::{KafkaOutput, OverflowPolicy, SpoolConfig};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::ack::Ack;
use crate::event::Record;
use crate::metrics::{InputMetrics, Metrics};
use crate::sinks::kafka::{topic_error, KafkaSink, Report, Tag};
use crate::spool::{Quarantined, Reserve, Row, Spool, SpoolError};
use in_flight::InFlight;

/// A record on its way from an input to the router.
#[derive(Debug)]
pub struct Item {
    /// The record.
    pub record: Record,
    /// The upstream acknowledgement share of the record.
    pub ack: Ack,
    /// Hold the ack until Kafka confirmed the record (`on_delivery`), not just until it is
    /// in the spool.
    pub until_delivered: bool,
}

/// Items an input hands over at once: what one read from the upstream yielded, about
/// [`MAX_BATCH`] at most. One channel operation per batch instead of per record: each was
/// a lock and a cache line moving between the input's core and the router's.
///
/// A batch dropped with items still in it (the router is gone, a send was cancelled)
/// disarms their acks: a record the router never took is not safe, so its upstream
/// message must not be acknowledged; the broker or device sends it again.
#[derive(Debug, Default)]
pub struct Batch(Vec<Item>);

impl Batch {
    /// Appends an item; the first one makes room for [`MAX_BATCH`].
    pub fn push(&mut self, item: Item) {
        if self.0.capacity() == 0 {
            self.0.reserve_exact(MAX_BATCH);
        }
        self.0.push(item);
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The items, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Item> {
        self.0.iter()
    }

    /// Counts the batch's events (not its dead letters, whose payloads were counted when
    /// they were refused) as dropped for `reason`, each on its own input; returns how
    /// many. For a batch the router will not take: its drop disarms the acks.
    pub fn count_dropped(&self, metrics: &Metrics, reason: &str) -> u64 {
        let mut events = 0;
        for item in &self.0 {
            if matches!(item.record, Record::Event(_)) {
                metrics.dropped(item.record.source(), reason, 1);
                events += 1;
            }
        }
        events
    }

    /// Gives back the room a small batch does not use, before it waits in the channel.
    pub fn fit(&mut self) {
        if self.0.len() < MAX_BATCH / 4 {
            self.0.shrink_to_fit();
        }
    }

    /// Takes the items out; the batch is left empty.
    fn take(&mut self) -> Vec<Item> {
        std::mem::take(&mut self.0)
    }

    /// Moves the items from `at` on into a batch of their own.
    fn split_off(&mut self, at: usize) -> Batch {
        Batch(self.0.split_off(at))
    }

    /// The items, out of the batch (its drop then has nothing to disarm).
    fn into_items(mut self) -> Vec<Item> {
        self.take()
    }
}

impl FromIterator<Item> for Batch {
    fn from_iter<I: IntoIterator<Item = Item>>(items: I) -> Self {
        Batch(items.into_iter().collect())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for item in &self.0 {
            item.ack.disarm();
        }
    }
}

/// The size at which an input sends its [`Batch`] (the events stages made from the last
/// event taken may add a few more).
pub const MAX_BATCH: usize = 64;

/// Records on their way from the inputs to the router (in the channel, or held by the
/// router while the spool is full), whatever the batches' sizes.
const MAX_WAITING: usize = 8192;

/// Where inputs hand their batches to the router. At most [`MAX_WAITING`] records wait:
/// a sender takes a permit per record before it sends, and the router returns them as it
/// takes records in; a sender waits while there are none (backpressure).
#[derive(Clone)]
pub struct RouterSender {
    tx: flume::Sender<Batch>,
    slots: Arc<tokio::sync::Semaphore>,
    /// The permits there are in all: a larger batch goes in parts (see `send`).
    room: usize,
}

impl RouterSender {
    /// A sender with room for `records`, and the receiving end (for tests of the inputs).
    #[cfg(test)]
    pub(crate) fn for_test(records: usize) -> (RouterSender, flume::Receiver<Batch>) {
        let (tx, rx) = flume::unbounded();
        let slots = Arc::new(tokio::sync::Semaphore::new(records));
        let room = records;
        (RouterSender { tx, slots, room }, rx)
    }

    /// Sends a batch, waiting for room. `Err` gives back what was not sent when the
    /// router is gone (dropping it disarms its acks). A batch larger than all the room
    /// there is (one event whose stages made thousands) goes in parts of a quarter of
    /// it, in order, rather than waiting for permits that can never all be free at once
    /// (or for all of them, ahead of every other input).
    pub async fn send(&self, mut batch: Batch) -> Result<(), Batch> {
        debug_assert!(self.room > 0, "a sender without room would never send");
        let part = (self.room / 4).max(1);
        while batch.len() > self.room {
            let rest = batch.split_off(part);
            if let Err(mut unsent) = self.send_part(batch).await {
                unsent.0.extend(rest.into_items());
                return Err(unsent);
            }
            batch = rest;
        }
        self.send_part(batch).await
    }

    /// [`RouterSender::send`] that gives up once `stop` resolves while it waits for
    /// room; `Err` gives back what was not sent (parts already in stay in).
    pub async fn send_unless(
        &self,
        mut batch: Batch,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), Batch> {
        tokio::pin!(stop);
        let part = (self.room / 4).max(1);
        loop {
            let rest = (batch.len() > self.room).then(|| batch.split_off(part));
            let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            let acquired = tokio::select! {
                biased;
                p = self.slots.acquire_many(n) => p.ok(),
                () = &mut stop => None,
            };
            let sent = match acquired {
                Some(permits) => {
                    permits.forget();
                    self.tx.send(batch).map_err(|flume::SendError(b)| b)
                }
                None => Err(batch),
            };
            match (sent, rest) {
                (Ok(()), None) => return Ok(()),
                (Ok(()), Some(rest)) => batch = rest,
                (Err(mut unsent), rest) => {
                    if let Some(rest) = rest {
                        unsent.0.extend(rest.into_items());
                    }
                    return Err(unsent);
                }
            }
        }
    }

    /// Sends a batch of at most `room` records.
    async fn send_part(&self, batch: Batch) -> Result<(), Batch> {
        let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        match self.slots.acquire_many(n).await {
            Ok(permits) => permits.forget(),
            Err(_) => return Err(batch),
        }
        self.tx.send(batch).map_err(|flume::SendError(b)| b)
    }
}

/// Closes the senders' permits when the router thread ends, however it ends: a sender
/// waiting for room then fails instead of waiting forever.
struct CloseOnExit(Arc<tokio::sync::Semaphore>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Commands to the router.
pub enum Control {
    /// Replace the Kafka output (a new producer); the reply says whether it worked.
    Reconfigure(
        Box<KafkaOutput>,
        std::sync::mpsc::Sender<Result<(), String>>,
    ),
    /// Finish: spool what is not confirmed, commit, and exit.
    Shutdown,
}

/// A handle on the running router thread.
pub struct RouterHandle {
    items: RouterSender,
    control: flume::Sender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RouterHandle {
    /// Where inputs send their records. Bounded: no room is backpressure.
    pub fn items(&self) -> RouterSender {
        self.items.clone()
    }

    /// Replaces the Kafka output; returns once the new producer is in place.
    pub fn reconfigure(&self, output: KafkaOutput) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.control
            .send(Control::Reconfigure(Box::new(output), tx))
            .map_err(|_| "the router has stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the router has stopped".to_string())?
    }

    /// Stops the router: every record not confirmed by Kafka ends up in the spool.
    pub fn shutdown(mut self) {
        let _ = self.control.send(Control::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes the spool's reserve if there is room for it, and says so. `at_start`: also
/// when there is not (later attempts are quiet until one succeeds).
fn take_reserve(reserve: &mut Reserve, metrics: &Metrics, at_start: bool) {
    let was = reserve.held();
    match reserve.take() {
        Ok(true) if !was && !at_start => {
            tracing::info!(bytes = reserve.size(), "took the spool's reserve again")
        }
        Ok(true) => {}
        Ok(false) if at_start && reserve.given_up() => tracing::warn!(
            bytes = reserve.size(),
            reserve = %reserve.path().display(),
            "the spool's reserve was given up to a full disk and there is no room to take it \
             again: the spool keeps that much of its disk free until there is"
        ),
        Ok(false) if at_start && reserve.size() > 0 => tracing::warn!(
            bytes = reserve.size(),
            reserve = %reserve.path().display(),
            "no room for the spool's reserve file (it needs twice its size free): should the \
             spool fill this disk, it cannot drain by itself until room is made"
        ),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, reserve = %reserve.path().display(), "cannot take the spool's reserve")
        }
    }
    metrics.spool_reserve(reserve.held_bytes());
}

/// Starts the router thread over an open spool.
pub fn start(
    spool: Spool,
    spool_cfg: SpoolConfig,
    output: &KafkaOutput,
    gateway_id: &str,
    metrics: Metrics,
) -> Result<RouterHandle, String> {
    // Bounded in records by `RouterSender`'s permits.
    let (items_tx, items_rx) = flume::unbounded();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_WAITING));
    let (control_tx, control_rx) = flume::unbounded();
    // librdkafka kicks the router when delivery reports wait; one token is enough.
    let (kick_tx, kick_rx) = flume::bounded(1);
    let sink = KafkaSink::new(output, gateway_id, kick_tx.clone())?;
    let next_seq = spool.max_seq() + 1;
    let mut reserve = Reserve::new(spool.path(), spool_cfg.reserve_bytes);
    take_reserve(&mut reserve, &metrics, true);
    let router = Router {
        gate_linger: gate_linger(output),
        max_inflight: (output.queue_max_messages as usize).clamp(1, 1_000_000),
        spool_after: output.spool_after,
        spool,
        reserve,
        reserve_looked_at: Instant::now(),
        compact_tried: false,
        cfg: spool_cfg,
        sink,
        gateway_id: gateway_id.to_string(),
        kick_tx,
        kick_rx,
        reports: Vec::new(),
        metrics,
        inputs: Vec::new(),
        input_idx: HashMap::new(),
        last_input: 0,
        next_seq,
        pending: Vec::new(),
        pending_bytes: 0,
        pending_acks: Vec::new(),
        pending_quarantine: Vec::new(),
        pending_quarantine_bytes: 0,
        quarantine_full_logged: None,
        pending_since: None,
        pending_deletes: Vec::new(),
        pending_moves: Vec::new(),
        deletes_since: None,
        respooled_low: false,
        delivery_acks: HashMap::new(),
        direct: InFlight::default(),
        uncopied_direct: false,
        drain_inflight: InFlight::default(),
        drain_cursor: 0,
        drain_failed_min: None,
        isolate_until: None,
        isolation_found: false,
        healthy: true,
        next_probe: Instant::now(),
        write_retry_at: None,
        deletes_fail: false,
        recreate_at: None,
        shutting_down: false,
        last_progress_log: Instant::now(),
        read_error_logged: None,
        topic_trouble: HashMap::new(),
        trouble_looked_at: Instant::now(),
        parked_looked_at: Instant::now(),
        now: Instant::now(),
    };
    router.publish_state();
    let thread = std::thread::Builder::new()
        .name("router".into())
        .spawn({
            let slots = slots.clone();
            move || router.run(items_rx, control_rx, slots)
        })
        .map_err(|e| format!("cannot start the router thread: {e}"))?;
    Ok(RouterHandle {
        items: RouterSender {
            tx: items_tx,
            slots,
            room: MAX_WAITING,
        },
        control: control_tx,
        thread: Some(thread),
    })
}

/// A record handed to the producer straight from an input.
struct Direct {
    /// The record's spool bytes, kept to copy it into the spool if Kafka is slow or
    /// fails it. Encoded once it is sent, rather than the record kept: what stays in
    /// flight is about 110 bytes instead of a 300-byte event plus its readings, and the
    /// event is freed while it is still in the cache.
    data: Vec<u8>,
    input: u32,
    /// An event (counted as delivered), not a dead letter.
    event: bool,
    ack: Option<Ack>,
    until_delivered: bool,
    sent: Instant,
    /// A copy is in the spool (pending or committed).
    spooled: bool,
    /// Its spool copy was dropped by `drop_oldest`: if Kafka fails it too, it is
    /// counted as dropped then (and not before, so a late success is not counted twice).
    copy_dropped: bool,
}

/// A topic Kafka refuses ([`Router::topic_refused`]). Until its records are set aside
/// they are parked: held in the spool, skipped by the drain, while every other topic's
/// records flow; one of them is sent again every [`PROBE_INTERVAL`] ([`Router::probe_parked`]).
struct Trouble {
    /// The first refusal of this episode.
    since: Instant,
    /// The latest refusal.
    last: Instant,
    /// Its records are set aside now.
    set_aside: bool,
    /// The episode was logged.
    logged: bool,
    /// When to send one of its parked records again.
    retry_at: Instant,
    /// The lowest seq of its records parked in the spool (skipped by the drain).
    first_parked: Option<u64>,
}

impl Trouble {
    /// An episode whose first refusal is `now`.
    fn new(now: Instant) -> Trouble {
        Trouble {
            since: now,
            last: now,
            set_aside: false,
            logged: false,
            retry_at: now + PROBE_INTERVAL,
            first_parked: None,
        }
    }

    /// How long after its latest refusal a topic is forgotten: a minute while its records
    /// are retried (they are retried about once a second, so a minute without one means
    /// nothing is held for it), an hour once they are set aside (so that a topic with a
    /// record now and then does not hold everything back for the grace each time).
    fn forgotten_after(&self) -> Duration {
        if self.set_aside {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(60)
        }
    }
}

/// What became of a spool row handed to [`Router::send_drained`].
enum Step {
    /// In flight.
    Sent,
    /// Done with for now: parked, set aside or rejected.
    Passed,
    /// The producer takes nothing more for now: stop draining.
    Stop,
}

/// A spool row in flight in the producer.
struct Drained {
    input: u32,
    /// An event (counted as delivered), not a dead letter.
    event: bool,
    sent: Instant,
    /// Sent with nothing else in flight: an error the broker gives a whole batch is this
    /// record's own.
    alone: bool,
    /// A parked topic's probe ([`Router::probe_parked`]).
    probe: bool,
}

enum Wake {
    Items(Batch),
    ItemsClosed,
    Kick,
    Control(Control),
    Idle,
}

struct Router {
    spool: Spool,
    /// The spool's reserve file, given up when its disk fills ([`Router::commit`]).
    reserve: Reserve,
    /// When [`Router::look_after_reserve`] last looked.
    reserve_looked_at: Instant,
    /// The empty spool's free pages were given back (or that failed) since it was last
    /// not empty.
    compact_tried: bool,
    cfg: SpoolConfig,
    sink: KafkaSink,
    gateway_id: String,
    /// Given to every producer made: librdkafka's wake-up for the router.
    kick_tx: flume::Sender<()>,
    kick_rx: flume::Receiver<()>,
    /// Scratch space for the delivery reports of one poll.
    reports: Vec<Report>,
    metrics: Metrics,
    inputs: Vec<InputMetrics>,
    input_idx: HashMap<String, u32>,
    last_input: u32,
    max_inflight: usize,
    /// The producer's linger, for the send gate; `None`: no gate (see [`gate_linger`]).
    gate_linger: Option<Duration>,
    spool_after: Duration,
    next_seq: u64,
    /// Rows waiting for the next group commit.
    pending: Vec<Row>,
    pending_bytes: u64,
    /// Acks released by the next commit.
    pending_acks: Vec<Ack>,
    /// Records Kafka refused for good, for the quarantine table at the next commit.
    pending_quarantine: Vec<Quarantined>,
    pending_quarantine_bytes: u64,
    /// When "the quarantine table is full" was last logged.
    quarantine_full_logged: Option<Instant>,
    pending_since: Option<Instant>,
    /// Confirmed seqs whose rows the next commit deletes.
    pending_deletes: Vec<u64>,
    /// Spool rows Kafka refused for good, to move to the quarantine table (seq, reason)
    /// once the batch of reports is handled: one transaction for all of them.
    pending_moves: Vec<(u64, String)>,
    deletes_since: Option<Instant>,
    /// A failed direct record re-entered `pending` below the drain cursor.
    respooled_low: bool,
    /// `on_delivery` acks of spooled records, by seq.
    delivery_acks: HashMap<u64, Ack>,
    direct: InFlight<Direct>,
    /// Some direct record has no spool copy yet (set on send, cleared by
    /// `spool_direct_copies`): saves scanning `direct` on every tick of an outage.
    uncopied_direct: bool,
    drain_inflight: InFlight<Drained>,
    drain_cursor: u64,
    drain_failed_min: Option<u64>,
    /// Records up to this seq failed with an error a broker may give a whole batch for
    /// one record in it ([`batch_wide`]): the drain sends them one at a time, so the
    /// record it is about is found and set aside and the others go through.
    isolate_until: Option<u64>,
    /// This isolation round set a record aside (it failed alone).
    isolation_found: bool,
    healthy: bool,
    next_probe: Instant,
    /// Set after a failed spool write (or appends refused for want of room): inputs are
    /// held back until the retry succeeds.
    write_retry_at: Option<Instant>,
    /// While writes fail: the last write of deletes alone failed too. The drain waits
    /// then (what Kafka confirms could not be deleted).
    deletes_fail: bool,
    /// After a failed attempt to recreate a fatally failed producer: when to try again.
    recreate_at: Option<Instant>,
    shutting_down: bool,
    last_progress_log: Instant,
    /// When a failed spool read was last logged (the drain retries on every tick).
    read_error_logged: Option<Instant>,
    /// Topics Kafka refuses ([`topic_error`]).
    topic_trouble: HashMap<String, Trouble>,
    /// When [`Router::probe_parked`] last looked for topics due.
    parked_looked_at: Instant,
    /// When `topic_trouble` was last looked through for topics to forget.
    trouble_looked_at: Instant,
    /// The clock, read once per batch of work rather than once per record (send times
    /// and delivery latencies are accurate to that batch, well under a millisecond).
    now: Instant,
}

const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Most spool rows one drain call reads (see [`Router::drain`]).
const DRAIN_SCAN_LIMIT: usize = 16_384;

/// The exit status after the spool turned corrupt while running (`EX_SOFTWARE`): a
/// failure, so systemd's `Restart=on-failure` starts the gateway again.
pub const EXIT_SPOOL_CORRUPT: i32 = 70;

/// librdkafka's idempotent producer sends a partition's next request only once fewer
/// than this many of its records are unconfirmed (`RD_KAFKA_IDEMP_MAX_INFLIGHT`, which
/// it compares with a count of records, not of requests).
const IDEMP_MAX_INFLIGHT: usize = 5;

/// How long before its linger runs out a direct record is taken to be on its way: a
/// record that comes later waits for the next batch (had it been handed over, it would
/// have missed this batch and made the broker thread spin behind it).
const GATE_LEAD: Duration = Duration::from_millis(2);

/// Records waiting in the channel past which the gate opens anyway: the inputs are
/// not held back (a QoS 0 broker would drop) to save the producer's CPU. A round trip
/// plus a linger of records must fit below it: 20,000 events/s over a 50 ms uplink
/// keep about 2,000 waiting.
const GATE_MAX_WAITING: usize = MAX_WAITING * 3 / 4;

/// How often a closed gate is looked at again without a delivery report.
const GATE_RECHECK: Duration = Duration::from_millis(5);

/// The producer's linger as the send gate sees it: `linger`, or librdkafka's own
/// property where `options` sets it. `None` (no gate) when `options` turns idempotence
/// off (librdkafka then pipelines requests itself), and for a linger under
/// 2 x [`GATE_LEAD`] + 1 ms: every record would count as on its way the moment it is
/// sent, and only one input batch would go per round trip.
fn gate_linger(out: &KafkaOutput) -> Option<Duration> {
    let option = |k: &str| out.options.get(k).map(|v| v.trim().to_ascii_lowercase());
    if !out.idempotent() {
        return None;
    }
    let linger = match option("linger.ms").or_else(|| option("queue.buffering.max.ms")) {
        Some(ms) => Duration::try_from_secs_f64(ms.parse::<f64>().ok()? / 1000.0).ok()?,
        None => out.linger,
    };
    (linger >= GATE_LEAD * 2 + Duration::from_millis(1)).then_some(linger)
}

/// The send gate, like Nagle's algorithm for the producer: hold new direct records
/// back while a request of records past their linger waits for Kafka's answer.
///
/// Why: librdkafka's idempotent producer sends one request per partition at a time
/// once a few records are in flight, and while that request waits, records whose linger
/// has run out make its broker thread spin (a zero poll timeout, over and over) until
/// the answer comes. Over a long uplink that is most of every round trip: a full core
/// at a few hundred events per second. Held in the router instead, the records wait in
/// the channel, and go to the producer together when the answer comes: one batch per
/// round trip, which is what librdkafka would have sent anyway.
///
/// Open (`false`) when fewer records than librdkafka's limit are in flight (it then
/// sends the next request at once), when the oldest has [`GATE_LEAD`] or more of its
/// linger left (the batch is still gathering), when the inputs have
/// [`GATE_MAX_WAITING`] records waiting, and when the oldest is older than `patience`
/// (`spool_after`: Kafka is slow, or one partition is, and the others must not wait
/// for it any longer). On a fast link the answer comes a moment after the batch leaves,
/// and the gate is closed for about that moment.
fn gate(
    in_flight: usize,
    oldest: Option<Duration>,
    linger: Duration,
    patience: Duration,
    waiting: usize,
) -> bool {
    in_flight >= IDEMP_MAX_INFLIGHT
        && waiting < GATE_MAX_WAITING
        && oldest.is_some_and(|age| age + GATE_LEAD >= linger && age <= patience)
}

const WRITE_RETRY: Duration = Duration::from_secs(1);

/// How often a reserve not held is looked after ([`Router::look_after_reserve`]).
const RESERVE_LOOK: Duration = Duration::from_secs(5);

fn error_kind(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => "queue_full",
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => "purged",
        Some(RDKafkaErrorCode::Fatal) => "fatal",
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => "too_large",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            "unknown_topic"
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => "not_authorized",
        _ => "other",
    }
}

/// How long the router waits before it tries again to recreate a producer it could not.
const RECREATE_RETRY: Duration = Duration::from_secs(5);

/// Errors the producer gives when a record is handed to it that no retry can fix for
/// this record (it is too large, invalid, or its topic name is one Kafka refuses): the
/// record is quarantined and counted instead of blocking the spool forever. A topic
/// that is missing or forbidden is one only after a while ([`Router::topic_refused`]).
fn permanent(e: &KafkaError) -> bool {
    batch_wide(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::InvalidArgument
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidTopic
            )
        )
}

/// The same in a delivery report, where [`batch_wide`] errors count only for a record
/// that was sent alone.
fn permanent_report(e: &KafkaError, alone: bool) -> bool {
    if batch_wide(e) {
        alone
    } else {
        permanent(e)
    }
}

/// Errors a broker may give a whole batch for one record in it: a batch over the
/// topic's `max.message.bytes` (librdkafka's own size check fails the record at once,
/// so in a report this is the broker's), and on brokers without per-record errors a bad
/// timestamp or record. With per-record errors the others of the batch come back as
/// `InvalidDifferentRecord`. None of them may drop a record that was not sent alone.
fn batch_wide(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidDifferentRecord
        )
    )
}

impl Router {
    fn run(
        mut self,
        items: flume::Receiver<Batch>,
        control: flume::Receiver<Control>,
        slots: Arc<tokio::sync::Semaphore>,
    ) {
        let _close = CloseOnExit(slots.clone());
        self.metrics.router_alive(true);
        let mut items_open = true;
        // The rest of a batch that arrived while the spool was full (`block`): taken, in
        // order, before anything new once there is room again.
        let mut held: VecDeque<Item> = VecDeque::new();
        let mut was_gated = false;
        loop {
            // Records taken in this round: their permits go back to the senders.
            let mut taken = 0usize;
            while !held.is_empty() && !self.blocked() {
                if let Some(item) = held.pop_front() {
                    taken += 1;
                    self.accept(item);
                }
            }
            let spool_full = !held.is_empty() || self.blocked();
            let waiting = MAX_WAITING.saturating_sub(slots.available_permits() + taken);
            let gated = self.gate_closed(waiting);
            if gated && !was_gated {
                self.metrics.kafka_gated();
            }
            was_gated = gated;
            let accepting = items_open && !self.shutting_down && !spool_full && !gated;
            self.metrics
                .spool_blocked(items_open && spool_full && !self.shutting_down);
            let mut timeout = self.next_deadline();
            if gated {
                // Reports open the gate (and wake this thread); so does a queue of
                // records growing past the gate's bound, which only a timer notices.
                timeout = timeout.min(GATE_RECHECK);
            }
            let wake = {
                let mut sel = flume::Selector::new()
                    .recv(&self.kick_rx, |_| Wake::Kick)
                    // A dropped handle means shut down.
                    .recv(&control, |c| Wake::Control(c.unwrap_or(Control::Shutdown)));
                if accepting {
                    sel = sel.recv(&items, |b| b.map_or(Wake::ItemsClosed, Wake::Items));
                }
                sel.wait_timeout(timeout).unwrap_or(Wake::Idle)
            };
            self.now = Instant::now();
            match wake {
                Wake::Items(batch) => {
                    taken += self.accept_batch(batch, &mut held);
                    // Take what else is there, bounded, to amortise the loop. An open gate
                    // lets all of it through: it is the next batch.
                    while taken < 1024 && held.is_empty() && !self.blocked() {
                        match items.try_recv() {
                            Ok(batch) => taken += self.accept_batch(batch, &mut held),
                            Err(flume::TryRecvError::Empty) => break,
                            Err(flume::TryRecvError::Disconnected) => {
                                items_open = false;
                                break;
                            }
                        }
                    }
                }
                Wake::Kick => {}
                Wake::Control(Control::Reconfigure(out, reply)) => {
                    let _ = reply.send(self.replace_sink(&out));
                }
                Wake::Control(Control::Shutdown) => {
                    // Take what the inputs already handed over, then finish.
                    self.shutting_down = true;
                    for item in held.drain(..) {
                        self.accept(item);
                    }
                    while let Ok(mut batch) = items.try_recv() {
                        for item in batch.take() {
                            self.accept(item);
                        }
                    }
                    break;
                }
                Wake::ItemsClosed => items_open = false,
                Wake::Idle => {}
            }
            if taken > 0 {
                slots.add_permits(taken);
            }
            let handled = taken + self.serve_reports(KafkaSink::poll);
            self.tick();
            // A trickle of work would wake this thread once per record (a futex round
            // trip each, for the senders too). Let a little gather instead: at most
            // 0.5 ms of added latency, far below the producer's linger.
            if handled > 0 && handled < 64 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        self.finish();
        // No sender gets room from now on; what got in after the last look at the
        // channel is not taken: dropping it disarms its acks (the messages come again),
        // and its events are counted, as an input that gave up would count them.
        slots.close();
        while let Ok(batch) = items.try_recv() {
            batch.count_dropped(&self.metrics, "input_stopped");
        }
        self.metrics.router_alive(false);
    }

    fn blocked(&self) -> bool {
        if self.write_retry_at.is_some() {
            return true;
        }
        self.cfg.overflow == OverflowPolicy::Block
            && self.spool.bytes() + self.pending_bytes >= self.cfg.max_bytes
    }

    fn next_deadline(&self) -> Duration {
        let mut d = Duration::from_millis(100);
        match self.write_retry_at {
            // A failed write is tried again at its time, not when the commit interval
            // says (which has long passed: the thread would wake every millisecond).
            Some(at) => {
                d = d.min(at.saturating_duration_since(Instant::now()));
                if let Some(since) = self.deletes_since.filter(|_| !self.deletes_fail) {
                    d = d.min(self.cfg.commit_interval.saturating_sub(since.elapsed()));
                }
            }
            None => {
                if let Some(since) = self.pending_since.or(self.deletes_since) {
                    d = d.min(self.cfg.commit_interval.saturating_sub(since.elapsed()));
                }
            }
        }
        d.max(Duration::from_millis(1))
    }

    fn input(&mut self, name: &str) -> u32 {
        // Fast path: consecutive records mostly come from the same input.
        if let Some(m) = self.inputs.get(self.last_input as usize) {
            if m.name == name {
                return self.last_input;
            }
        }
        if let Some(i) = self.input_idx.get(name) {
            self.last_input = *i;
            return *i;
        }
        let i = self.inputs.len() as u32;
        self.inputs.push(self.metrics.input(name));
        self.input_idx.insert(name.to_string(), i);
        i
    }

    /// Whether new records wait in the channel for now, because the producer holds a
    /// request's worth of direct records that are past their linger and unconfirmed.
    /// See [`gate`].
    fn gate_closed(&self, waiting: usize) -> bool {
        let Some(linger) = self.gate_linger else {
            return false;
        };
        let oldest = self.direct.first_key_value().map(|(_, d)| d.sent);
        self.direct_allowed()
            && gate(
                self.direct.len(),
                oldest.map(|t| Instant::now().saturating_duration_since(t)),
                linger,
                self.spool_after,
                waiting,
            )
    }

    fn direct_allowed(&self) -> bool {
        self.healthy
            && !self.shutting_down
            && self.spool.rows() == 0
            && self.pending.is_empty()
            && self.drain_inflight.is_empty()
            && self.direct.len() < self.max_inflight
            && !self.sink.is_fatal()
    }

    /// Accepts a batch in order until the spool is full (`block`); the rest is held.
    /// Returns how many were accepted.
    fn accept_batch(&mut self, mut batch: Batch, held: &mut VecDeque<Item>) -> usize {
        let mut accepted = 0;
        let mut batch = batch.take().into_iter();
        for item in batch.by_ref() {
            self.accept(item);
            accepted += 1;
            if self.blocked() {
                break;
            }
        }
        held.extend(batch);
        accepted
    }

    fn accept(&mut self, item: Item) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let input = self.input(item.record.source());
        let event = matches!(item.record, Record::Event(_));
        if self.direct_allowed() {
            let now = self.now;
            match self.sink.send(&item.record, Tag::new(seq, false)) {
                Ok(()) => {
                    self.uncopied_direct = true;
                    self.direct.insert(
                        seq,
                        Direct {
                            data: item.record.encode(),
                            input,
                            event,
                            ack: Some(item.ack),
                            until_delivered: item.until_delivered,
                            sent: now,
                            spooled: false,
                            copy_dropped: false,
                        },
                    );
                    return;
                }
                Err(e) if self.sent_for_good(&e) => {
                    self.metrics.kafka_error(error_kind(&e));
                    self.reject(input, event, seq, &e, None);
                    // Accounted as dropped; the ack goes with the quarantine's commit (or
                    // now, dropped, when nothing waits for one).
                    if self.quarantine_record(seq, input, item.record.encode(), &e.to_string()) {
                        self.pending_acks.push(item.ack);
                    }
                    return;
                }
                Err(e) => {
                    self.metrics.kafka_error(error_kind(&e));
                    // A topic refused for now: this record is parked in the spool, the
                    // others flow.
                    if !topic_error(&e) {
                        if self.healthy {
                            tracing::warn!(error = %e, "Kafka producer refused a record; spooling");
                        }
                        self.healthy = false;
                    }
                }
            }
        }
        let data = item.record.encode();
        self.spool_row(seq, input, data, item.ack, item.until_delivered);
    }

    fn spool_row(&mut self, seq: u64, input: u32, data: Vec<u8>, ack: Ack, until_delivered: bool) {
        self.pending_bytes += data.len() as u64;
        self.pending.push(Row {
            seq,
            source: self.inputs[input as usize].name.clone(),
            data,
        });
        if until_delivered {
            self.delivery_acks.insert(seq, ack);
        } else {
            self.pending_acks.push(ack);
        }
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// Collects delivery reports with `serve` (a poll, a wait, a flush), reads the clock,
    /// and handles them; returns how many.
    fn serve_reports(&mut self, serve: impl FnOnce(&KafkaSink, &mut Vec<Report>)) -> usize {
        let mut batch = std::mem::take(&mut self.reports);
        serve(&self.sink, &mut batch);
        self.now = Instant::now();
        let n = batch.len();
        let mut reports = batch.drain(..);
        while !reports.as_slice().is_empty() {
            let ahead = reports.as_slice().len().min(Self::TOUCH_AHEAD);
            self.touch(&reports.as_slice()[..ahead]);
            for r in reports.by_ref().take(ahead) {
                self.on_report(r);
            }
        }
        drop(reports);
        self.reports = batch;
        self.move_set_aside();
        n
    }

    /// Moves the rows `set_aside` gathered while reports were handled to the quarantine
    /// table, in one transaction; if that fails, they are deleted (each was counted
    /// already), as one that failed alone would be.
    fn move_set_aside(&mut self) {
        if self.pending_moves.is_empty() {
            return;
        }
        let moves = std::mem::take(&mut self.pending_moves);
        // The quarantine's bound (see `quarantine_has_room`), row by row.
        let room = (self.cfg.max_bytes / 4).saturating_sub(self.pending_quarantine_bytes);
        match self.spool.quarantine_rows(&moves, room) {
            Ok(no_room) => {
                if !no_room.is_empty() {
                    self.quarantine_full();
                }
                for seq in no_room {
                    self.delete_row(seq);
                }
            }
            Err(e) => {
                self.exit_if_corrupt(&e);
                tracing::error!(rows = moves.len(), error = %e, "cannot quarantine spool rows; deleting them (they are counted as dropped)");
                for (seq, _) in moves {
                    self.delete_row(seq);
                }
            }
        }
    }

    /// Reports handled after their records' in-flight entries were loaded together.
    const TOUCH_AHEAD: usize = 32;

    /// Loads the in-flight entries of `reports` before they are handled, all at once: a
    /// report's entry was sent some thousands of records ago and is no longer in the
    /// cache, and a miss per report, one after the other, was three quarters of the time
    /// `on_report` spent in the table (perf, `--direct 3`). Independent loads overlap.
    fn touch(&self, reports: &[Report]) {
        let direct = self.direct.first_key_value().map(|(s, _)| *s);
        let drained = self.drain_inflight.first_key_value().map(|(s, _)| *s);
        let mut sum = 0u64;
        for r in reports {
            sum = sum.wrapping_add(match (r.tag.from_spool(), direct, drained) {
                // The spool bytes too: they are freed on success.
                (false, Some(lowest), _) => self.direct.touch(r.tag.seq(lowest), |d| {
                    d.data.first().copied().map_or(0, u64::from)
                }),
                (true, _, Some(lowest)) => self.drain_inflight.touch(r.tag.seq(lowest), |_| 0),
                _ => 0,
            });
        }
        std::hint::black_box(sum);
    }

    fn on_report(&mut self, r: Report) {
        match (&r.error, &r.topic) {
            (Some(e), _) => self.metrics.kafka_error(error_kind(e)),
            (None, Some(topic)) => self.topic_took(topic),
            (None, None) => {}
        }
        if !r.tag.from_spool() {
            let Some((&lowest, _)) = self.direct.first_key_value() else {
                return;
            };
            let seq = r.tag.seq(lowest);
            let Some(mut d) = self.direct.remove(&seq) else {
                return;
            };
            self.latency(d.sent);
            match r.error {
                None => {
                    self.healthy = true;
                    if d.event {
                        self.inputs[d.input as usize].delivered.inc();
                    }
                    if d.spooled {
                        self.delete_row(seq);
                    }
                    // Dropping the ack releases it upstream.
                }
                Some(e) if self.refused_for_good(&e, false, r.topic.as_deref()) => {
                    self.reject(d.input, d.event, seq, &e, None);
                    // Set aside like a spooled record: its copy in the spool if it has
                    // one, else the bytes kept for one.
                    let reason = e.to_string();
                    let queued = if d.spooled {
                        // A copy still pending is written and deleted in the next
                        // commit (which releases its ack with the others'); the
                        // quarantine gets its bytes.
                        match self.pending.iter().find(|r| r.seq == seq) {
                            Some(row) => {
                                let data = row.data.clone();
                                self.delete_row(seq);
                                self.quarantine_record(seq, d.input, data, &reason);
                            }
                            None => self.set_aside(seq, &reason),
                        }
                        false
                    } else if !d.copy_dropped {
                        let data = std::mem::take(&mut d.data);
                        self.quarantine_record(seq, d.input, data, &reason)
                    } else {
                        false
                    };
                    // A direct ack (on_delivery) goes with the quarantine's commit when one
                    // waits; else it is released now, with `d`: the record is counted.
                    if let (true, Some(ack)) = (queued, d.ack.take()) {
                        self.pending_acks.push(ack);
                    }
                }
                Some(e) => {
                    // A topic refused for now: re-spooled below, parked there by the drain.
                    if !topic_error(&e) {
                        self.failed(seq, &e, "Kafka delivery failed; spooling until it recovers");
                    }
                    if d.copy_dropped {
                        if d.event {
                            self.metrics.dropped(
                                &self.inputs[d.input as usize].name,
                                "spool_overflow",
                                1,
                            );
                        }
                    } else if !d.spooled {
                        // It re-enters at its own seq, which may be below the drain
                        // cursor: the next drain commits it and restarts from the top.
                        self.respooled_low = true;
                        let ack = d.ack.take().unwrap_or_default();
                        let data = std::mem::take(&mut d.data);
                        self.spool_row(seq, d.input, data, ack, d.until_delivered);
                    } else if let Some(ack) = d.ack.take() {
                        // An on_delivery ack waits with the spooled copy.
                        self.delivery_acks.insert(seq, ack);
                    }
                }
            }
        } else {
            let Some((&lowest, _)) = self.drain_inflight.first_key_value() else {
                return;
            };
            let seq = r.tag.seq(lowest);
            let Some(Drained {
                input,
                event,
                sent,
                alone,
                ..
            }) = self.drain_inflight.remove(&seq)
            else {
                return;
            };
            self.latency(sent);
            match r.error {
                None => {
                    if !self.healthy {
                        tracing::info!(
                            spool_rows = self.spool.rows(),
                            "Kafka is confirming again; draining the spool"
                        );
                    }
                    self.healthy = true;
                    if event {
                        self.inputs[input as usize].delivered.inc();
                    }
                    self.metrics.drained(1);
                    self.delete_row(seq);
                }
                Some(e) if self.refused_for_good(&e, alone, r.topic.as_deref()) => {
                    self.isolation_found |= batch_wide(&e);
                    self.delivery_acks.remove(&seq);
                    self.reject(input, event, seq, &e, Some(seq));
                }
                // Its topic is refused for now: the row stays in the spool, parked, and
                // the drain goes on with the others.
                Some(e) if topic_error(&e) => {
                    self.park(r.topic.as_deref().unwrap_or_default(), seq)
                }
                Some(e) => {
                    self.failed(seq, &e, "Kafka delivery failed while draining; retrying");
                    self.reread_from(seq);
                }
            }
        }
    }

    /// Whether the error of a send that failed is final for its record.
    fn sent_for_good(&mut self, e: &KafkaError) -> bool {
        if topic_error(e) {
            let topic = self.sink.refused_topic().to_string();
            self.topic_refused(&topic, e)
        } else {
            permanent(e)
        }
    }

    /// Whether a delivery report's error is final for its record (`alone`: it was sent
    /// with nothing else in flight).
    fn refused_for_good(&mut self, e: &KafkaError, alone: bool, topic: Option<&str>) -> bool {
        if topic_error(e) {
            self.topic_refused(topic.unwrap_or_default(), e)
        } else {
            permanent_report(e, alone)
        }
    }

    /// Kafka refused a record for its topic: whether that is final, which it is once the
    /// topic has refused records for `topic_refused_after` without taking one. Until then
    /// the record is retried like any failed one: a topic deleted and made again, or an
    /// ACL fixed, loses nothing. Retried for good, one `route` to a topic that does not
    /// exist would hold every record behind it in the spool, for every device.
    fn topic_refused(&mut self, topic: &str, e: &KafkaError) -> bool {
        let grace = self.sink.config().topic_refused_after;
        if self.topic_trouble.is_empty() {
            // Its first success must be seen to start it over.
            self.sink.report_topics(true);
        }
        let now = Instant::now();
        let t = self
            .topic_trouble
            .entry(topic.to_string())
            .or_insert_with(|| Trouble::new(now));
        // A refusal after a quiet spell starts a new episode, with its own grace: an old
        // one must not set live records aside at the first transient refusal.
        if now.saturating_duration_since(t.last) > t.forgotten_after() {
            let parked = t.first_parked;
            *t = Trouble::new(now);
            t.first_parked = parked;
        }
        t.last = now;
        t.retry_at = now + PROBE_INTERVAL;
        if !t.logged {
            t.logged = true;
            tracing::warn!(topic, error = %e, retry_for = ?grace,
                "Kafka refuses the topic; its records wait in the spool (the others go on) and are retried, then set aside (output.kafka.topic_refused_after)");
        }
        if !t.set_aside && now.saturating_duration_since(t.since) >= grace {
            t.set_aside = true;
            tracing::error!(topic, error = %e, refused_for = ?grace,
                "Kafka still refuses the topic: its records are dropped (kafka_rejected) and kept in the spool's quarantine table until it takes one again");
            // The drain reads the parked ones again, to set them aside too.
            if let Some(first) = t.first_parked.take() {
                self.reread_from(first);
            }
            return true;
        }
        t.set_aside
    }

    /// Record `seq` of `topic` (in the spool) waits there, skipped by the drain, while
    /// Kafka refuses the topic for now ([`Router::topic_refused`] said so).
    fn park(&mut self, topic: &str, seq: u64) {
        if let Some(t) = self.topic_trouble.get_mut(topic) {
            t.first_parked = Some(t.first_parked.map_or(seq, |s| s.min(seq)));
        }
    }

    /// The topic of `record` if it is parked (in trouble, not set aside).
    fn parked_topic(&mut self, record: &Record) -> Option<String> {
        if self.topic_trouble.is_empty() {
            return None;
        }
        let topic = self.sink.topic_of(record);
        self.topic_trouble
            .get(&topic)
            .is_some_and(|t| !t.set_aside)
            .then_some(topic)
    }

    /// Sends one record of every parked topic whose retry is due: its lowest parked row,
    /// out of the drain's order (nothing of that topic went after it). Taken, the topic
    /// is out of trouble and the drain reads its rows again ([`Router::topic_took`]);
    /// refused, they stay parked until the next retry.
    fn probe_parked(&mut self) {
        let now = Instant::now();
        // Looked at ten times a second, not on every tick: there may be a topic per device.
        if self.topic_trouble.is_empty() || now < self.parked_looked_at + PROBE_INTERVAL / 10 {
            return;
        }
        self.parked_looked_at = now;
        // Kafka away: one probe at a time (each would wait for message_timeout).
        if !self.healthy && self.drain_inflight.iter().any(|(_, d)| d.probe) {
            return;
        }
        let mut due: Vec<(String, u64)> = self
            .topic_trouble
            .iter()
            .filter(|(_, t)| !t.set_aside && now >= t.retry_at)
            .filter_map(|(topic, t)| Some((topic.clone(), t.first_parked?)))
            .collect();
        due.sort_unstable_by_key(|(_, seq)| *seq);
        if !self.healthy {
            due.truncate(1);
        }
        for (topic, seq) in due {
            // Not while a lower row other than a probe is in flight (one of its topic sent
            // before it was refused would go after it if it failed).
            if self
                .drain_inflight
                .iter()
                .take_while(|(s, _)| **s < seq)
                .any(|(_, d)| !d.probe)
                || self.drain_inflight.contains(&seq)
            {
                continue;
            }
            if let Some(t) = self.topic_trouble.get_mut(&topic) {
                t.retry_at = now + PROBE_INTERVAL;
            }
            match self.spool.read_after(seq.saturating_sub(1), 1) {
                Ok(rows) => match rows.into_iter().next() {
                    Some(row) if row.seq == seq => {
                        self.now = Instant::now();
                        // The only record of its topic in flight: an error for its whole
                        // request is its own.
                        if let Step::Stop = self.send_drained(row, true, true) {
                            return;
                        }
                    }
                    // Gone (dropped by drop_oldest): the drain finds the topic's rows again.
                    _ => {
                        if let Some(t) = self.topic_trouble.get_mut(&topic) {
                            t.first_parked = None;
                        }
                        self.reread_from(seq);
                    }
                },
                Err(e) => {
                    self.exit_if_corrupt(&e);
                    self.metrics.spool_error("read");
                    return;
                }
            }
        }
    }

    /// Restarts the drain at `seq` (once nothing is in flight): rows it passed are read
    /// again.
    fn reread_from(&mut self, seq: u64) {
        self.drain_failed_min = Some(self.drain_failed_min.map_or(seq, |m| m.min(seq)));
    }

    /// Forgets topics that have not refused a record for a while (see
    /// [`Trouble::forgotten_after`]). Once a second: the router ticks far more often, and
    /// with a topic per device there may be one entry per device to look through.
    fn forget_old_trouble(&mut self) {
        let now = Instant::now();
        if self.topic_trouble.is_empty()
            || now.saturating_duration_since(self.trouble_looked_at) < Duration::from_secs(1)
        {
            return;
        }
        self.trouble_looked_at = now;
        // A topic with parked rows is probed every second: it is not forgotten while it
        // refuses them (a topic set aside has none: `topic_refused` took them).
        self.topic_trouble.retain(|_, t| {
            now.saturating_duration_since(t.last) <= t.forgotten_after() || t.first_parked.is_some()
        });
        if self.topic_trouble.is_empty() {
            self.sink.report_topics(false);
        }
    }

    /// Kafka took a record of `topic` (reported while a topic is in trouble).
    fn topic_took(&mut self, topic: &str) {
        if let Some(t) = self.topic_trouble.remove(topic) {
            tracing::info!(topic, "Kafka takes records of the topic again");
            // Its parked rows go now, in order: the drain reads them again (and, until
            // it does, sends nothing else of the topic).
            if let Some(first) = t.first_parked {
                self.reread_from(first);
            }
            if self.topic_trouble.is_empty() {
                self.sink.report_topics(false);
            }
        }
    }

    /// Record `seq` failed and will be sent again: a [`batch_wide`] error starts (or
    /// extends) an isolation round, any other makes Kafka unhealthy (`news` is logged
    /// when it was healthy).
    fn failed(&mut self, seq: u64, e: &KafkaError, news: &str) {
        if batch_wide(e) {
            self.isolate(seq, e);
        } else {
            if self.healthy {
                tracing::warn!(error = %e, "{news}");
            }
            self.healthy = false;
        }
    }

    /// Record `seq` failed with a [`batch_wide`] error without having been sent alone:
    /// the drain will send everything up to it one at a time.
    fn isolate(&mut self, seq: u64, e: &KafkaError) {
        if self.isolate_until.is_none() {
            // The report itself was counted by kind in `on_report`.
            self.isolation_found = false;
            tracing::warn!(error = %e, "Kafka refused a batch of records; sending them one at a time to find the one it is about");
        }
        self.isolate_until = Some(self.isolate_until.map_or(seq, |u| u.max(seq)));
    }

    /// Records the time from a record's send to its report.
    fn latency(&self, sent: Instant) {
        self.metrics
            .kafka_latency(self.now.saturating_duration_since(sent).as_secs_f64());
    }

    /// Accounts for a record Kafka will never take; a spooled one moves to the
    /// quarantine table (`gateway spool stats` counts it) so it can be inspected. A dead
    /// letter is not counted again: its payload was counted as dropped when it was
    /// refused (`malformed_json`, a stage's reason, ...).
    fn reject(
        &mut self,
        input: u32,
        event: bool,
        seq: u64,
        e: &KafkaError,
        spooled_row: Option<u64>,
    ) {
        let name = self.inputs[input as usize].name.clone();
        if event {
            tracing::error!(input = %name, seq, error = %e, "Kafka rejected a record for good; dropped (reason kafka_rejected)");
            self.metrics.dropped(&name, "kafka_rejected", 1);
        } else {
            tracing::error!(input = %name, seq, error = %e, "Kafka rejected a dead letter for good (its payload was counted as dropped when it was refused)");
        }
        if let Some(row) = spooled_row {
            self.set_aside(row, &e.to_string());
        }
    }

    /// Moves spool row `seq`, already counted as dropped, to the quarantine table. Drained
    /// rows are committed rows: they go as they are (no commit of the pending rows, which
    /// could run the overflow policy in the middle of a drain batch), together at the end
    /// of a batch of reports (`move_set_aside`: one transaction, not one per row: a
    /// topic set aside with a backlog of 100,000 rows was as many fsyncs). If that fails
    /// (a full disk, say), the rows are deleted with the delivered ones instead: left in
    /// the spool, they would be sent, refused and counted again at every drain, and keep
    /// the router from direct mode for good.
    fn set_aside(&mut self, seq: u64, reason: &str) {
        if !self.quarantine_has_room(0) {
            self.delete_row(seq);
            return;
        }
        // Moved with the others of this batch of reports, or of this drain
        // (`move_set_aside`; the drain's cursor is past it already).
        self.pending_moves.push((seq, reason.to_string()));
    }

    /// Puts a direct record Kafka refused for good (already counted) in the quarantine
    /// table, where a spooled one goes, with the next commit; false when it has no room.
    fn quarantine_record(&mut self, seq: u64, input: u32, data: Vec<u8>, reason: &str) -> bool {
        if !self.quarantine_has_room(data.len() as u64) {
            return false;
        }
        self.pending_quarantine_bytes += data.len() as u64;
        self.pending_quarantine.push(Quarantined {
            seq,
            source: self.inputs[input as usize].name.clone(),
            data,
            reason: reason.to_string(),
        });
        self.pending_since.get_or_insert_with(Instant::now);
        true
    }

    /// Whether the quarantine table may take `more` bytes: it holds at most a quarter of
    /// `spool.max_bytes` (it is outside the budget, and a topic set aside with live
    /// traffic would otherwise fill the disk). Past that, refused records are only
    /// counted (logged once a minute).
    fn quarantine_has_room(&mut self, more: u64) -> bool {
        let used = self.spool.quarantine_bytes() + self.pending_quarantine_bytes + more;
        let room = used <= self.cfg.max_bytes / 4;
        if !room {
            self.quarantine_full();
        }
        room
    }

    /// Logs, at most once a minute, that the quarantine table is full.
    fn quarantine_full(&mut self) {
        if self
            .quarantine_full_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.quarantine_full_logged = Some(Instant::now());
            tracing::error!(limit = self.cfg.max_bytes / 4, "the spool's quarantine table is full (a quarter of spool.max_bytes): records Kafka refuses are dropped without a copy; `gateway spool export --quarantined` writes it out (README, \"Inspect the spool\")");
        }
    }

    fn delete_row(&mut self, seq: u64) {
        self.delivery_acks.remove(&seq);
        self.pending_deletes.push(seq);
        self.deletes_since.get_or_insert_with(Instant::now);
    }

    fn tick(&mut self) {
        self.forget_old_trouble();
        self.look_after_reserve();
        // Kafka slow: copy direct records into the spool so their acks can go out.
        if let Some((_, oldest)) = self.direct.first_key_value() {
            if oldest.sent.elapsed() > self.spool_after && self.uncopied_direct {
                if self.healthy {
                    tracing::warn!(waiting = self.direct.len(), after = ?self.spool_after, "Kafka is not confirming; spooling");
                }
                self.healthy = false;
                self.metrics.kafka_error("slow");
                self.spool_direct_copies();
            }
        }
        if self.sink.is_fatal()
            && self.direct.is_empty()
            && self.drain_inflight.is_empty()
            && self.recreate_at.is_none_or(|t| Instant::now() >= t)
        {
            let cfg = self.sink.config().clone();
            match self.replace_sink(&cfg) {
                // Counted once per producer given up (the new one starts clean).
                Ok(()) => {
                    self.recreate_at = None;
                    self.metrics.kafka_error("fatal");
                }
                // Not on every tick: the same error would flood the log.
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?RECREATE_RETRY, "cannot recreate the Kafka producer");
                    self.recreate_at = Some(Instant::now() + RECREATE_RETRY);
                }
            }
        }
        // After a failed write, the next try waits for its time (not every turn of the
        // loop while `pending` stays over `commit_rows`: a full disk was written to
        // about a hundred times a second).
        // Deletes keep their pace while appends wait (they make the room on a full
        // disk), unless they fail too.
        let deletes_due = self.pending_deletes.len() >= 8192
            || self
                .deletes_since
                .is_some_and(|t| t.elapsed() >= self.cfg.commit_interval);
        let commit_due = match self.write_retry_at {
            Some(t) => Instant::now() >= t || (deletes_due && !self.deletes_fail),
            None => {
                self.pending.len() >= self.cfg.commit_rows
                    || self
                        .pending_since
                        .is_some_and(|t| t.elapsed() >= self.cfg.commit_interval)
                    || deletes_due
            }
        };
        if commit_due {
            self.commit();
        }
        self.drain();
        self.publish_state();
    }

    fn spool_direct_copies(&mut self) {
        let mut copies = Vec::new();
        for (seq, d) in self.direct.iter_mut() {
            if d.spooled || d.copy_dropped {
                continue;
            }
            d.spooled = true;
            // on_spool: the ack goes out with the commit; on_delivery: it stays with
            // the direct record until Kafka answers.
            let ack = if d.until_delivered {
                Ack::none()
            } else {
                d.ack.take().unwrap_or_default()
            };
            copies.push((*seq, d.input, d.data.clone(), ack));
        }
        self.uncopied_direct = false;
        if !copies.is_empty() {
            self.respooled_low = true;
        }
        for (seq, input, data, ack) in copies {
            self.spool_row(seq, input, data, ack, false);
        }
    }

    /// Takes out of `pending` the rows whose deletes wait too (spool copies of direct
    /// records Kafka has since confirmed): written with their deletes in one transaction
    /// they come to nothing, but deletes written alone would leave them to be spooled
    /// and sent again.
    fn forget_confirmed_pending(&mut self) {
        if self.pending.is_empty() || self.pending_deletes.is_empty() {
            return;
        }
        let confirmed: std::collections::HashSet<u64> =
            self.pending_deletes.iter().copied().collect();
        let mut freed = 0;
        self.pending.retain(|r| {
            let keep = !confirmed.contains(&r.seq);
            if !keep {
                freed += r.data.len() as u64;
            }
            keep
        });
        self.pending_bytes -= freed;
    }

    fn enforce_budget(&mut self) {
        if self.cfg.overflow != OverflowPolicy::DropOldest {
            return;
        }
        let mut total = self.spool.bytes() + self.pending_bytes;
        if total <= self.cfg.max_bytes {
            return;
        }
        // Rows Kafka already confirmed go first: deleting them drops nothing.
        if !self.pending_deletes.is_empty() {
            self.forget_confirmed_pending();
            if self.spool.write(&[], &self.pending_deletes).is_err() {
                return; // the commit that follows reports the error
            }
            self.deletes_fail = false;
            self.pending_deletes.clear();
            self.deletes_since = None;
            total = self.spool.bytes() + self.pending_bytes;
            if total <= self.cfg.max_bytes {
                return;
            }
        }
        let mut need = total - self.cfg.max_bytes;
        // Rows being drained are not dropped: they may be confirmed any moment. Parked
        // rows (below the drain cursor) are the oldest, and go first.
        let after = self
            .drain_inflight
            .last_key_value()
            .map_or(self.drain_cursor, |(s, _)| *s)
            .max(self.drain_cursor);
        let after = self
            .topic_trouble
            .values()
            .filter_map(|t| t.first_parked)
            .min()
            .map_or(after, |p| after.min(p.saturating_sub(1)));
        let in_flight = &self.drain_inflight;
        match self
            .spool
            .drop_oldest(after, need, |seq| in_flight.contains(&seq))
        {
            Ok(dropped) => {
                let freed_rows = dropped.len();
                for (seq, source, event) in dropped {
                    self.count_overflow(seq, &source, event);
                }
                if freed_rows > 0 {
                    tracing::warn!(
                        rows = freed_rows,
                        "spool full: dropped the oldest events (drop_oldest)"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "spool overflow: cannot drop old rows"),
        }
        let total = self.spool.bytes() + self.pending_bytes;
        if total > self.cfg.max_bytes {
            need = total - self.cfg.max_bytes;
            // Still over: the pending batch alone is too big; drop its oldest rows
            // (pending can hold re-spooled records below newer ones: order by seq).
            self.pending.sort_unstable_by_key(|r| r.seq);
            let mut freed = 0;
            let mut k = 0;
            while k < self.pending.len() && freed < need {
                freed += self.pending[k].data.len() as u64;
                k += 1;
            }
            let rows: Vec<Row> = self.pending.drain(..k).collect();
            for row in rows {
                let event = !Record::is_dead_letter(&row.data);
                self.count_overflow(row.seq, &row.source, event);
            }
            self.pending_bytes -= freed;
        }
    }

    /// Accounts for a spool row dropped by `drop_oldest`. A dead letter is not counted
    /// again: its payload was counted as dropped when it was refused.
    fn count_overflow(&mut self, seq: u64, source: &str, event: bool) {
        if let Some(d) = self.direct.get_mut(&seq) {
            // Still in flight in the producer: its fate decides.
            d.spooled = false;
            d.copy_dropped = true;
            return;
        }
        self.delivery_acks.remove(&seq);
        if event {
            self.metrics.dropped(source, "spool_overflow", 1);
        }
    }

    fn commit(&mut self) {
        if self.pending.is_empty()
            && self.pending_deletes.is_empty()
            && self.pending_quarantine.is_empty()
        {
            // Nothing to write: no ack can be waiting for it.
            self.pending_acks.clear();
            self.pending_since = None;
            self.deletes_since = None;
            if self.write_retry_at.take().is_some() {
                tracing::info!("spool writes work again");
            }
            return;
        }
        self.enforce_budget();
        if (self.write_retry_at.is_some() || !self.room_for_appends())
            && !(self.pending_deletes.is_empty() && self.pending_quarantine.is_empty())
        {
            // Deletes (and refused records) first, in their own transaction: they are
            // what makes room, and must not wait for appends that do not fit.
            self.forget_confirmed_pending();
            match self
                .spool
                .write_with(&[], &self.pending_deletes, &self.pending_quarantine)
            {
                Ok(_) => {
                    self.deletes_fail = false;
                    self.pending_deletes.clear();
                    self.pending_quarantine.clear();
                    self.pending_quarantine_bytes = 0;
                    self.deletes_since = None;
                }
                Err(e) => {
                    self.write_failed(e);
                    self.deletes_fail = true;
                    return;
                }
            }
            if self.pending.is_empty() {
                return self.commit();
            }
        }
        if self
            .write_retry_at
            .is_some_and(|t| Instant::now() < t && !self.shutting_down)
        {
            return; // appends wait for their retry time
        }
        if !self.room_for_appends() {
            if !self.write_low_rows() {
                return;
            }
            if self.pending.is_empty() {
                return self.commit();
            }
            if self.write_retry_at.is_none() {
                tracing::error!(
                    reserve_bytes = self.reserve.size(),
                    "the spool's disk has less room left than its reserve \
                     (spool.reserve_bytes) and the spool no free pages; holding inputs back \
                     until the spool drains or space returns"
                );
            }
            self.metrics.spool_error("disk_full");
            self.write_retry_at = Some(Instant::now() + WRITE_RETRY);
            return;
        }
        match self.spool.write_with(
            &self.pending,
            &self.pending_deletes,
            &self.pending_quarantine,
        ) {
            Ok(_) => {
                if self.write_retry_at.take().is_some() {
                    tracing::info!("spool writes work again");
                }
                for row in &self.pending {
                    if let Some(i) = self.input_idx.get(&row.source) {
                        self.inputs[*i as usize].spooled.inc();
                    }
                }
                self.pending.clear();
                self.pending_bytes = 0;
                self.pending_deletes.clear();
                self.pending_quarantine.clear();
                self.pending_quarantine_bytes = 0;
                // Committed: release the upstream acks.
                self.pending_acks.clear();
                self.pending_since = None;
                self.deletes_since = None;
            }
            Err(e) => self.write_failed(e),
        }
    }

    /// Writes the pending rows below the spool's newest on their own, while newer ones
    /// wait for room ([`Router::room_for_appends`]): records re-spooled after Kafka
    /// failed them or was slow (at most the producer's queue), which the drain must send
    /// first. They may take the room kept for SQLite. Returns false if the write failed.
    fn write_low_rows(&mut self) -> bool {
        let top = self.spool.max_seq();
        if !self.pending.iter().any(|r| r.seq <= top) {
            return true;
        }
        let (low, rest): (Vec<Row>, Vec<Row>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| r.seq <= top);
        match self.spool.write(&low, &[]) {
            Ok(_) => {
                for row in &low {
                    self.pending_bytes -= row.data.len() as u64;
                    if let Some(i) = self.input_idx.get(&row.source) {
                        self.inputs[*i as usize].spooled.inc();
                    }
                }
                self.pending = rest;
                true
            }
            Err(e) => {
                self.pending = low;
                self.pending.extend(rest);
                self.write_failed(e);
                false
            }
        }
    }

    /// A spool write failed: counted, logged once, tried again in a second. On a full
    /// disk the reserve is given up, so that the deletes of what Kafka confirms fit.
    fn write_failed(&mut self, e: SpoolError) {
        self.exit_if_corrupt(&e);
        let full = matches!(e, SpoolError::DiskFull(_));
        self.metrics
            .spool_error(if full { "disk_full" } else { "io" });
        // A full disk also shows as an I/O error (the WAL's shared-memory index cannot
        // grow): the reserve goes then too, if the file system is that short of room.
        let short = full || (e.may_pass() && self.reserve.short_of_room());
        if self.write_retry_at.is_none() {
            tracing::error!(error = %e, "cannot write the spool; holding inputs back and retrying every second");
            self.deletes_fail = false;
        }
        self.write_retry_at = Some(Instant::now() + WRITE_RETRY);
        if short {
            match self.reserve.release() {
                Ok(true) => {
                    self.metrics.spool_reserve(0);
                    tracing::warn!(
                        bytes = self.reserve.size(),
                        reserve = %self.reserve.path().display(),
                        "the spool's disk is full: gave up its reserve, so that the spool can \
                         delete what Kafka confirms; new events wait for the room that makes"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, reserve = %self.reserve.path().display(), "cannot give up the spool's reserve file (truncate it)")
                }
            }
        }
    }

    /// Whether the pending appends may be written. A spool whose reserve was given up
    /// to a full disk (and not taken again) keeps that much of its file system free
    /// instead, for SQLite's checkpoint (which may grow the file by the
    /// WAL's new pages, up to about 4 MiB) and the deletes that drain the spool: appends
    /// go into free pages inside the file, or where they leave that much free.
    fn room_for_appends(&self) -> bool {
        if self.pending.is_empty() || !self.reserve.given_up() {
            return true;
        }
        // Twice the records' bytes: SQLite's pages are not full, and the WAL holds them
        // until a checkpoint.
        let need = self.pending_bytes.saturating_mul(2);
        if self.spool.free_bytes().is_ok_and(|free| free >= need) {
            return true;
        }
        // A file system that cannot say (an error) is not held back for it.
        crate::spool::reserve::available(self.reserve.dir())
            .map_or(true, |a| a >= self.reserve.size().saturating_add(need))
    }

    /// Takes a reserve not held when there is room for it again; an empty spool first
    /// gives its free pages back (after it filled its disk, they are the room).
    fn look_after_reserve(&mut self) {
        if self.reserve.size() == 0
            || self.reserve.held()
            || self.reserve_looked_at.elapsed() < RESERVE_LOOK
        {
            return;
        }
        self.reserve_looked_at = Instant::now();
        let empty = self.spool.rows() == 0
            && self.pending.is_empty()
            && self.pending_deletes.is_empty()
            && self.write_retry_at.is_none();
        if !empty {
            self.compact_tried = false;
        }
        // Once per emptying (a failure is not tried over and over), and only with a
        // small quarantine table: VACUUM copies what is left through memory
        // (`temp_store=MEMORY`) and the WAL.
        if empty
            && !self.compact_tried
            && self.spool.quarantine_bytes() <= self.reserve.size() / 4
            && self
                .spool
                .free_bytes()
                .is_ok_and(|free| free >= self.reserve.size())
        {
            self.compact_tried = true;
            match self.spool.compact() {
                Ok(()) => tracing::info!(
                    "the spool is empty: gave its free pages back to the file system"
                ),
                Err(e) => {
                    self.exit_if_corrupt(&e);
                    tracing::warn!(error = %e, "cannot give the empty spool's free pages back");
                }
            }
        }
        take_reserve(&mut self.reserve, &self.metrics, false);
    }

    /// A spool file that turns corrupt while the gateway runs (a bad block on the SD
    /// card after the start's integrity check passed) fails every write and read from then
    /// on: retrying would hold inputs back for good. The process exits instead (as a
    /// crash would: nothing unconfirmed was acknowledged from memory), and the next start
    /// finds the damage, moves the file aside with its rows (`gateway spool export
    /// --path` reads what is readable) and starts a fresh spool.
    fn exit_if_corrupt(&self, e: &SpoolError) {
        if let SpoolError::Corrupt(why) = e {
            self.metrics.spool_error("corrupt");
            if let Err(m) = self.spool.mark_corrupt() {
                tracing::error!(error = %m, "cannot leave the marker that makes the next start move the spool aside");
            }
            tracing::error!(error = %why, "the spool file became corrupt while running; exiting so that the next start moves it aside and starts a fresh spool");
            std::process::exit(EXIT_SPOOL_CORRUPT);
        }
    }

    fn drain(&mut self) {
        self.drain_rows();
        // What it set aside (undecodable rows, rows refused at send), in one go.
        self.move_set_aside();
    }

    fn drain_rows(&mut self) {
        // Nor while spool writes fail and deletes fail with them: what Kafka confirms
        // could not be deleted, and would pile up in memory, to be sent all over again
        // after a restart. (While only appends fail, on a full disk, the drain is what
        // makes room.)
        if self.shutting_down
            || !self.direct.is_empty()
            || self.sink.is_fatal()
            || (self.write_retry_at.is_some()
                && self.deletes_fail
                && !self.pending_deletes.is_empty())
        {
            return;
        }
        if self.respooled_low {
            // Rows newer than the spool's may wait for room (a full disk): the drain
            // restarts below them.
            let top = self.spool.max_seq();
            if self.pending.iter().any(|r| r.seq <= top) {
                self.commit();
                if self.pending.iter().any(|r| r.seq <= self.spool.max_seq()) {
                    return;
                }
            }
            self.respooled_low = false;
            self.drain_failed_min = Some(0);
        }
        if let Some(min) = self.drain_failed_min {
            if !self.drain_inflight.is_empty() {
                return;
            }
            // Restart the drain at the first failed row; flush confirmed deletes first
            // so they are not sent again (and wait while the spool cannot be written).
            // Appends may still wait (a full disk, where the drain is what makes room):
            // they are newer than every spool row (older ones were `respooled_low`).
            self.commit();
            if !self.pending_deletes.is_empty() {
                return;
            }
            self.drain_cursor = min.saturating_sub(1);
            self.drain_failed_min = None;
            self.next_probe = Instant::now()
                + if self.healthy {
                    Duration::ZERO
                } else {
                    PROBE_INTERVAL
                };
        }
        if self.spool.rows() == 0 {
            self.drain_cursor = 0;
            // Nothing committed, nothing parked (drop_oldest may have taken the rows).
            for t in self.topic_trouble.values_mut() {
                t.first_parked = None;
            }
            return;
        }
        if self
            .isolate_until
            .is_some_and(|u| self.drain_cursor >= u && self.drain_inflight.is_empty())
        {
            self.isolate_until = None;
            if self.isolation_found {
                tracing::info!("the records of the refused batch were sent one at a time; draining in batches again");
            } else {
                // Each went through alone: the batch itself was too much for the topic.
                tracing::warn!("every record of the refused batch went through alone: the topic's max.message.bytes is probably below output.kafka.batch_bytes; lower batch_bytes, or batches will keep being refused and resent one record at a time");
            }
        }
        // Unhealthy too: a spool of nothing but parked rows has nothing else to send, and
        // only a probe finds out whether their topic takes records again.
        if self.isolate_until.is_none() {
            self.probe_parked();
        }
        let budget = if self.healthy && self.isolate_until.is_some() {
            usize::from(self.drain_inflight.is_empty())
        } else if self.healthy {
            self.max_inflight
                .saturating_sub(self.drain_inflight.len() + self.direct.len())
        } else if self.drain_inflight.is_empty() && Instant::now() >= self.next_probe {
            // One row: enough to learn whether Kafka is back, and the only row that
            // drop_oldest must leave alone while it is in flight.
            self.next_probe = Instant::now() + PROBE_INTERVAL;
            1
        } else {
            0
        };
        let mut left = budget;
        // Rows passed over (parked, set aside) do not count against the budget: a bound
        // on the rows read keeps one call short behind a long run of a parked topic's rows.
        let mut scanned = 0usize;
        let mut passed = 0usize;
        while left > 0 && scanned < DRAIN_SCAN_LIMIT {
            // With parked rows about, read more than the budget as rows are passed over:
            // one query per row would be slow. What is not reached stays unread.
            let want = if self.topic_trouble.is_empty() {
                left
            } else {
                left.max(passed * 2).max(64)
            };
            let rows = match self
                .spool
                .read_after(self.drain_cursor, want.min(self.cfg.drain_batch))
            {
                Ok(r) => r,
                Err(e) => {
                    self.exit_if_corrupt(&e);
                    self.metrics.spool_error("read");
                    if self
                        .read_error_logged
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                    {
                        self.read_error_logged = Some(Instant::now());
                        tracing::error!(error = %e, "cannot read the spool; the drain tries again");
                    }
                    return;
                }
            };
            if rows.is_empty() {
                break;
            }
            // Commits and reads above may have taken a while: the send times are now.
            self.now = Instant::now();
            scanned += rows.len();
            for row in rows {
                if left == 0 {
                    break;
                }
                let alone = budget == 1 && self.drain_inflight.is_empty();
                match self.send_drained(row, alone, false) {
                    Step::Sent => left -= 1,
                    Step::Passed => passed += 1,
                    Step::Stop => return,
                }
            }
        }
        if self.spool.rows() == 0 && self.drain_inflight.is_empty() {
            self.drain_cursor = 0;
        }
        if self.last_progress_log.elapsed() >= Duration::from_secs(5) && self.spool.rows() > 0 {
            self.last_progress_log = Instant::now();
            tracing::info!(
                spool_rows = self.spool.rows(),
                spool_bytes = self.spool.bytes(),
                in_flight = self.drain_inflight.len(),
                kafka_up = self.healthy,
                "draining the spool"
            );
        }
    }

    /// Hands one spool row to the producer (`alone`: nothing else is in flight). A row of a
    /// parked topic is skipped, unless it is that topic's `probe`; a probe, sent out of
    /// the drain's order, leaves the drain cursor where it is.
    fn send_drained(&mut self, row: Row, alone: bool, probe: bool) -> Step {
        let record = match Record::decode(&row.data) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(seq = row.seq, error = %e, "undecodable spool row moved to quarantine");
                // A dead letter's payload was counted when it was refused.
                if !Record::is_dead_letter(&row.data) {
                    self.metrics.dropped(&row.source, "corrupt_record", 1);
                }
                self.delivery_acks.remove(&row.seq);
                self.set_aside(row.seq, &e.to_string());
                self.pass(row.seq, probe);
                return Step::Passed;
            }
        };
        if !probe {
            if let Some(topic) = self.parked_topic(&record) {
                self.park(&topic, row.seq);
                self.pass(row.seq, probe);
                return Step::Passed;
            }
        }
        let input = self.input(&row.source);
        match self.sink.send(&record, Tag::new(row.seq, true)) {
            Ok(()) => {
                let drained = Drained {
                    input,
                    event: matches!(record, Record::Event(_)),
                    sent: self.now,
                    alone,
                    probe,
                };
                self.drain_inflight.insert(row.seq, drained);
                self.pass(row.seq, probe);
                Step::Sent
            }
            Err(e) if self.sent_for_good(&e) => {
                self.metrics.kafka_error(error_kind(&e));
                self.pass(row.seq, probe);
                self.delivery_acks.remove(&row.seq);
                let event = matches!(record, Record::Event(_));
                self.reject(input, event, row.seq, &e, Some(row.seq));
                Step::Passed
            }
            // Its topic is refused for now: parked, the drain goes on with the others.
            Err(e) if topic_error(&e) => {
                self.metrics.kafka_error(error_kind(&e));
                let topic = self.sink.refused_topic().to_string();
                self.park(&topic, row.seq);
                self.pass(row.seq, probe);
                Step::Passed
            }
            Err(e) => {
                if !matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull)) {
                    self.metrics.kafka_error(error_kind(&e));
                    tracing::warn!(error = %e, "cannot hand a spooled record to the producer");
                    self.healthy = false;
                }
                Step::Stop
            }
        }
    }

    /// The drain is done with row `seq` for now (not for a probe, which is out of order).
    fn pass(&mut self, seq: u64, probe: bool) {
        if !probe {
            self.drain_cursor = seq;
        }
    }

    fn publish_state(&self) {
        self.metrics.spool_depth(
            self.spool.rows() + self.pending.len() as u64,
            self.spool.bytes() + self.pending_bytes,
        );
        let spooling = !self.healthy || self.spool.rows() > 0 || !self.pending.is_empty();
        crate::allocator_direct_mode(!spooling);
        self.metrics.router_state(
            self.healthy,
            spooling,
            self.direct.len() + self.drain_inflight.len(),
        );
    }

    /// Swaps the producer: direct records are copied to the spool, the old producer is
    /// purged and its reports handled, then the new one takes over.
    fn replace_sink(&mut self, out: &KafkaOutput) -> Result<(), String> {
        if out == self.sink.config() && !self.sink.is_fatal() {
            return Ok(());
        }
        let new = KafkaSink::new(out, &self.gateway_id, self.kick_tx.clone())?;
        self.retire_sink();
        self.sink = new;
        self.sink.report_topics(!self.topic_trouble.is_empty());
        self.max_inflight = (out.queue_max_messages as usize).clamp(1, 1_000_000);
        self.gate_linger = gate_linger(out);
        self.spool_after = out.spool_after;
        self.healthy = true;
        tracing::info!(brokers = %out.brokers, "Kafka output replaced");
        Ok(())
    }

    /// Moves everything the current producer holds back to the spool.
    fn retire_sink(&mut self) {
        self.spool_direct_copies();
        self.commit();
        self.sink.purge();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (!self.direct.is_empty() || !self.drain_inflight.is_empty())
            && Instant::now() < deadline
        {
            self.serve_reports(|sink, out| sink.poll_for(Duration::from_millis(10), out));
        }
        // Whatever did not report: the spool holds a copy and on_delivery acks wait
        // with it; unless the copy was dropped by the overflow policy, which counts now.
        for (seq, mut d) in std::mem::take(&mut self.direct) {
            if d.copy_dropped {
                if d.event {
                    let name = self.inputs[d.input as usize].name.clone();
                    self.metrics.dropped(&name, "spool_overflow", 1);
                }
                continue;
            }
            if let Some(ack) = d.ack.take() {
                self.delivery_acks.insert(seq, ack);
            }
        }
        self.drain_inflight.clear();
        self.drain_failed_min = Some(0);
        self.commit();
    }

    fn finish(&mut self) {
        // Give Kafka a moment for what is in flight, then spool the rest.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (!self.direct.is_empty() || !self.drain_inflight.is_empty())
            && Instant::now() < deadline
        {
            self.serve_reports(|sink, out| sink.flush(Duration::from_millis(100), out));
        }
        self.retire_sink();
        if self.write_retry_at.is_some()
            || !self.pending.is_empty()
            || !self.pending_deletes.is_empty()
            || !self.pending_quarantine.is_empty()
        {
            // One last try; what fails stays unacknowledged upstream and is redelivered.
            self.commit();
        }
        // Not safe yet: these must not be acknowledged upstream when dropped.
        for ack in self.delivery_acks.values().chain(self.pending_acks.iter()) {
            ack.disarm();
        }
        self.publish_state();
        tracing::info!(spool_rows = self.spool.rows(), "router stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckQueue;
    use crate::event::Value;
    use crate::stages::tests::event;
    use std::sync::Mutex;

    fn item(ack: Ack) -> Item {
        Item {
            record: Record::Event(event("d", "t", 1.0)),
            ack,
            until_delivered: false,
        }
    }

    #[tokio::test]
    async fn senders_wait_for_room_counted_in_records_not_batches() {
        let (tx, rx) = RouterSender::for_test(3);
        let two = || (0..2).map(|_| item(Ack::none())).collect::<Batch>();
        tx.send(two()).await.expect("room for two");
        let waiting = tokio::time::timeout(Duration::from_millis(50), tx.send(two())).await;
        assert!(waiting.is_err(), "four records do not fit in three");
        // The router takes the first batch in and gives its two permits back.
        let first = rx.try_recv().expect("sent");
        assert_eq!(first.len(), 2);
        tx.slots.add_permits(first.len());
        tx.send(two()).await.expect("room again");
        // A closed router fails a waiting sender instead of leaving it waiting.
        let waiter = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(two()).await.is_err() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(CloseOnExit(tx.slots.clone()));
        assert!(
            waiter.await.expect("joined"),
            "fails once the router is gone"
        );
    }

    #[test]
    fn the_gate_holds_records_only_behind_a_sent_request() {
        let ms = Duration::from_millis;
        let (linger, patience) = (ms(20), ms(5000));
        let check = |in_flight, oldest: Option<u64>, waiting, closed| {
            assert_eq!(
                gate(in_flight, oldest.map(ms), linger, patience, waiting),
                closed,
                "{in_flight} in flight, oldest {oldest:?} ms, {waiting} waiting"
            );
        };
        // A request of records past linger is out, or about to leave: new records wait.
        check(5, Some(30), 0, true);
        check(500, Some(200), GATE_MAX_WAITING - 1, true);
        check(500, Some(18), 0, true);
        // Still gathering: they join the batch.
        check(500, Some(17), 0, false);
        check(500, Some(0), 0, false);
        // Too few in flight for librdkafka to hold the next request back.
        check(4, Some(200), 0, false);
        check(0, None, 0, false);
        // Enough waiting: the inputs come first.
        check(500, Some(200), GATE_MAX_WAITING, false);
        // Kafka (or a partition) slow: the others do not wait for it past spool_after.
        check(500, Some(5000), 0, true);
        check(500, Some(5001), 0, false);
    }

    #[test]
    fn the_gate_sees_librdkafkas_own_linger_and_stays_off_where_it_cannot_help() {
        let out = |linger_ms: u64, options: &[(&str, &str)]| {
            let mut o: KafkaOutput =
                toml::from_str("brokers = \"k:9092\"").expect("a minimal output");
            o.linger = Duration::from_millis(linger_ms);
            o.options = options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            o
        };
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(gate_linger(&out(20, &[])), ms(20));
        assert_eq!(gate_linger(&out(20, &[("linger.ms", "100")])), ms(100));
        assert_eq!(
            gate_linger(&out(20, &[("queue.buffering.max.ms", "50")])),
            ms(50)
        );
        assert_eq!(gate_linger(&out(5, &[])), ms(5));
        // Too short to tell a gathering batch from a sent one.
        assert_eq!(gate_linger(&out(4, &[])), None);
        assert_eq!(gate_linger(&out(20, &[("linger.ms", "0.5")])), None);
        // Not idempotent: librdkafka pipelines, nothing to gate.
        assert_eq!(
            gate_linger(&out(20, &[("enable.idempotence", "false")])),
            None
        );
    }

    #[tokio::test]
    async fn a_send_told_to_stop_gives_back_exactly_what_did_not_go_in() {
        let items = |n: u32| {
            (0..n)
                .map(|i| Item {
                    record: Record::Event(event("d", "t", f64::from(i))),
                    ack: Ack::none(),
                    until_delivered: false,
                })
                .collect::<Batch>()
        };
        let (tx, rx) = RouterSender::for_test(8);
        // Room for all of it: the stop (already due) does not win.
        assert!(tx.send_unless(items(3), async {}).await.is_ok());
        // 5 permits left; 11 records go in parts of 2 while there is room (2, 2), then
        // the third part waits, and the stop gives back the other 7.
        let unsent = tx
            .send_unless(items(11), tokio::time::sleep(Duration::from_millis(50)))
            .await
            .expect_err("stopped");
        assert_eq!(unsent.len(), 7);
        let taken: usize = rx.drain().map(|b| b.len()).sum();
        assert_eq!(taken, 3 + 4, "every record is either in or given back");
        assert_eq!(tx.slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_batch_larger_than_all_the_room_goes_in_parts_in_order() {
        let (tx, rx) = RouterSender::for_test(8);
        let batch = (0..11)
            .map(|i| Item {
                record: Record::Event(event("d", "t", f64::from(i))),
                ack: Ack::none(),
                until_delivered: false,
            })
            .collect::<Batch>();
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(batch).await.is_ok() }
        });
        // The router's part: take each part in and give its permits back.
        let mut sizes = Vec::new();
        let mut values = Vec::new();
        while values.len() < 11 {
            // Before the parts, such a batch waited for ever for 11 of 8 permits.
            let part = tokio::time::timeout(Duration::from_secs(5), rx.recv_async())
                .await
                .expect("a part within 5 s")
                .expect("a part");
            sizes.push(part.len());
            for item in part.iter() {
                let Record::Event(e) = &item.record else {
                    panic!("an event")
                };
                if let Some(Value::Number(v)) = e.readings.get("temperature") {
                    values.push(*v);
                }
            }
            tx.slots.add_permits(part.len());
        }
        assert!(sender.await.expect("joined"), "all sent");
        // Parts of a quarter of the room, until the rest fits.
        assert_eq!(sizes, vec![2, 2, 7]);
        assert_eq!(values, (0..11).map(f64::from).collect::<Vec<_>>());
        assert_eq!(tx.slots.available_permits(), 8, "no permit made or lost");
    }

    #[tokio::test]
    async fn a_batch_the_router_never_takes_is_not_acknowledged() {
        let released = Arc::new(Mutex::new(Vec::new()));
        let queue = || {
            let r = released.clone();
            AckQueue::new(move |m: u32| r.lock().expect("lock").push(m))
        };
        let (q1, q2) = (queue(), queue());
        // A send dropped while it waits for room.
        let (tx, _rx) = RouterSender::for_test(1);
        let batch: Batch = [item(q1.push(1)), item(Ack::none())].into_iter().collect();
        let waited = tokio::time::timeout(Duration::from_millis(20), tx.send(batch)).await;
        assert!(waited.is_err(), "no room for two");
        // Taken out of a batch and accepted: released as usual once dropped.
        let mut batch: Batch = [item(q2.push(2))].into_iter().collect();
        drop(batch.take());
        drop(batch);
        assert_eq!(*released.lock().expect("lock"), vec![2]);
    }
}
