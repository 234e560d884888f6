//! The Kafka output: an idempotent librdkafka producer with delivery reports.
//!
//! Records are handed to a [`BaseProducer`] with a [`Tag`] (seq, and whether the record
//! came from the spool) packed into librdkafka's per-message opaque pointer; librdkafka
//! batches, compresses and retries. Many records are in flight at once; nothing here
//! waits for a round trip.
//!
//! A send names its topic by a librdkafka topic handle ([`Topics`]) and goes through
//! `rd_kafka_produceva` directly: rdkafka's `send` made a C string of the topic name, and
//! librdkafka looked the name up under its client-wide write lock, for every record.
//!
//! The router thread serves librdkafka's event queue itself ([`KafkaSink::poll`]): a
//! [`Report`] per record, success or failure, plus errors and logs. librdkafka kicks the
//! router through a channel when that queue turns non-empty, so there is no polling
//! thread, no channel operation per report, and each message is freed on the thread
//! that allocated it.
//!
//! The value schema `edge-gateway.event.v1` (JSON) is documented in the README; headers
//! carry the event id (for de-duplication), source, gateway id, content type and schema.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use gateway_config::{KafkaOutput, ValueFormat};
use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::event::{rfc3339, Event, Record};

pub use super::event_json::{event_json_bytes, SCHEMA};
use super::event_json::{write_event, CONTENT_TYPE_JSON, CONTENT_TYPE_POSTCARD};

/// What travels with a record through librdkafka and comes back in its report: the
/// record's seq and whether it came from the spool, packed into the message's opaque
/// pointer, so a record in flight costs no allocation of its own.
///
/// The pointer holds the seq's low bits: all of them on 64-bit targets, 31 on 32-bit
/// ones. [`Tag::seq`] restores the rest from the lowest seq still in flight, which tells
/// records apart as long as fewer than 2^31 records arrive while one is in flight (at
/// 50,000 events/s, twelve hours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(usize);

impl Tag {
    /// A tag for record `seq`; `from_spool` when it was read from the spool.
    pub fn new(seq: u64, from_spool: bool) -> Tag {
        Tag(((seq as usize) << 1) | usize::from(from_spool))
    }

    /// True when the record was read from the spool (its row must be deleted on
    /// success).
    pub fn from_spool(self) -> bool {
        self.0 & 1 == 1
    }

    /// The record's seq, given `lowest`, the lowest seq in flight in the table the record
    /// belongs to: the one seq at or above `lowest` with the tag's low bits. The tag of a
    /// record no longer in flight gives a seq that is not in the table either.
    pub fn seq(self, lowest: u64) -> u64 {
        restore((self.0 >> 1) as u64, usize::BITS - 1, lowest)
    }
}

/// The one number at or above `lowest` whose low `bits` bits are `low`.
fn restore(low: u64, bits: u32, lowest: u64) -> u64 {
    let mask = u64::MAX >> (64 - bits);
    lowest.wrapping_add(low.wrapping_sub(lowest) & mask)
}

/// A delivery report.
#[derive(Debug)]
pub struct Report {
    /// The tag given at send.
    pub tag: Tag,
    /// `None` when Kafka confirmed the record.
    pub error: Option<KafkaError>,
    /// The record's topic: given with a [`topic_error`], and with every report while
    /// [`KafkaSink::report_topics`] is on.
    pub topic: Option<String>,
}

/// An error about the record's topic rather than the record or the cluster: the topic
/// does not exist (with auto-creation off) or the gateway may not write to it.
pub fn topic_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::TopicAuthorizationFailed
        )
    )
}

/// The producer context: collects delivery reports while the router polls, flags fatal
/// errors.
pub struct Context {
    /// Filled by `delivery` while rdkafka's own poll runs ([`KafkaSink::poll_for`],
    /// [`KafkaSink::flush`]), emptied by [`KafkaSink::poll`], which reads other delivery
    /// reports off the queue itself (only the router thread touches it: the lock is
    /// never contended).
    reports: Mutex<Vec<Report>>,
    fatal: Arc<AtomicBool>,
    /// Every report carries its topic (see [`KafkaSink::report_topics`]).
    report_topics: AtomicBool,
    /// The last error handled, and when (see [`Context::repeated`]).
    last_error: Mutex<Option<(String, Instant)>>,
}

impl Context {
    fn new(fatal: Arc<AtomicBool>) -> Context {
        Context {
            reports: Mutex::new(Vec::new()),
            fatal,
            report_topics: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Whether `text` is the error handled just before (within 100 ms). rdkafka 0.39
    /// hands each error event to [`ClientContext::error`] twice (`Client::poll_event`
    /// handles it, then `BaseProducer::poll` again), which logged every error twice.
    fn repeated(&self, text: &str) -> bool {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last
            .as_ref()
            .is_some_and(|(t, at)| t == text && at.elapsed() < Duration::from_millis(100))
        {
            return true;
        }
        *last = Some((text.to_string(), Instant::now()));
        false
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        if self.repeated(&format!("{error}: {reason}")) {
            return;
        }
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fatal) => {
                self.fatal.store(true, Ordering::SeqCst);
                tracing::error!(%error, reason, "fatal Kafka producer error; the producer will be recreated");
            }
            // Connection trouble: the router reports the state change once (Kafka not
            // confirming / confirming again) and the metrics show it; no log flood.
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve,
            ) => {
                tracing::debug!(%error, reason, "Kafka connection problem");
            }
            _ => tracing::warn!(%error, reason, "Kafka client error"),
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical => {
                tracing::error!(target: "librdkafka", "{fac} {message}")
            }
            // librdkafka logs every failed connect as an error; the router and metrics
            // already tell when Kafka is away.
            L::Error | L::Warning => tracing::info!(target: "librdkafka", "{fac} {message}"),
            L::Notice | L::Info => tracing::debug!(target: "librdkafka", "{fac} {message}"),
            L::Debug => tracing::trace!(target: "librdkafka", "{fac} {message}"),
        }
    }
}

impl ProducerContext for Context {
    /// A [`Tag`]'s bits.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        use rdkafka::Message as _;
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        let topic = (self.report_topics.load(Ordering::Relaxed)
            || error.as_ref().is_some_and(topic_error))
        .then(|| match result {
            Ok(m) => m.topic().to_string(),
            Err((_, m)) => m.topic().to_string(),
        });
        if let Ok(mut reports) = self.reports.lock() {
            reports.push(Report {
                tag: Tag(opaque),
                error,
                topic,
            });
        }
    }
}

/// librdkafka's event queue (delivery reports, errors, logs) with a kick: when the queue
/// turns non-empty, librdkafka calls [`kick`] from its own thread, which puts a token in
/// the router's wake-up channel.
struct EventQueue {
    queue: *mut rdkafka::bindings::rd_kafka_queue_t,
    /// The callback's argument; boxed so its address stays put, held until the callback
    /// is off.
    _kick: Box<flume::Sender<()>>,
}

// SAFETY: the queue handle is thread-safe in librdkafka (every queue call locks it), and
// the sender is Send + Sync.
#[allow(unsafe_code)]
unsafe impl Send for EventQueue {}
#[allow(unsafe_code)]
unsafe impl Sync for EventQueue {}

/// Called by librdkafka, with the queue locked, when its event queue turns non-empty.
#[allow(unsafe_code)]
unsafe extern "C" fn kick(_rk: *mut rdkafka::bindings::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `_kick` box of an `EventQueue`, which turns
    // this callback off (under the same queue lock) before the box is freed.
    let tx = unsafe { &*(opaque as *const flume::Sender<()>) };
    // Full means a kick is already waiting: one is enough.
    let _ = tx.try_send(());
}

impl EventQueue {
    #[allow(unsafe_code)]
    fn new(producer: &BaseProducer<Context>, kick_tx: flume::Sender<()>) -> EventQueue {
        let kick_box = Box::new(kick_tx);
        // SAFETY: the client pointer is valid while `producer` lives, and `KafkaSink`
        // drops this queue (which releases the handle) before the producer. The opaque
        // outlives the callback: `drop` turns the callback off first.
        let queue = unsafe {
            let q = rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr());
            rdkafka::bindings::rd_kafka_queue_cb_event_enable(
                q,
                Some(kick),
                &*kick_box as *const flume::Sender<()> as *mut c_void,
            );
            q
        };
        EventQueue {
            queue,
            _kick: kick_box,
        }
    }

    /// The next event, without waiting.
    #[allow(unsafe_code)]
    fn next(&self) -> Option<QueueEvent> {
        // SAFETY: the queue handle is valid until `drop`; a non-null event is ours to
        // destroy, which `QueueEvent`'s drop does once.
        NonNull::new(unsafe { rd::rd_kafka_queue_poll(self.queue, 0) }).map(QueueEvent)
    }
}

impl Drop for EventQueue {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: turning the callback off takes the queue lock the callback runs under,
        // so no call is running or will run with `self._kick` after this; then the handle
        // (a reference on the queue) is released.
        unsafe {
            rdkafka::bindings::rd_kafka_queue_cb_event_enable(
                self.queue,
                None,
                std::ptr::null_mut(),
            );
            rdkafka::bindings::rd_kafka_queue_destroy(self.queue);
        }
    }
}

/// An event taken from librdkafka's queue, destroyed on drop.
struct QueueEvent(NonNull<rd::rd_kafka_event_t>);

impl Drop for QueueEvent {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the event came from `rd_kafka_queue_poll` and is destroyed once, here;
        // nothing borrowed from it (its messages) outlives it.
        unsafe { rd::rd_kafka_event_destroy(self.0.as_ptr()) }
    }
}

/// librdkafka's syslog level as rdkafka's enum (its own conversion is private).
fn log_level(level: i32) -> rdkafka::config::RDKafkaLogLevel {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        i32::MIN..=0 => L::Emerg,
        1 => L::Alert,
        2 => L::Critical,
        3 => L::Error,
        4 => L::Warning,
        5 => L::Notice,
        6 => L::Info,
        _ => L::Debug,
    }
}

/// Appends a [`Report`] per message of a delivery-report event.
///
/// # Safety
/// `event` must be a live `RD_KAFKA_EVENT_DR` event.
#[allow(unsafe_code)]
unsafe fn reports_of(event: &QueueEvent, out: &mut Vec<Report>, with_topics: bool) {
    const CHUNK: usize = 256;
    let mut messages: [*const rd::rd_kafka_message_t; CHUNK] = [std::ptr::null(); CHUNK];
    loop {
        // SAFETY: the array has room for CHUNK pointers; each next call continues where
        // the last stopped, and the messages live as long as the event.
        let n = unsafe {
            rd::rd_kafka_event_message_array(event.0.as_ptr(), messages.as_mut_ptr(), CHUNK)
        };
        out.reserve(n);
        for &m in &messages[..n.min(CHUNK)] {
            // SAFETY: `m` is one of the event's messages.
            let (err, opaque) = unsafe { ((*m).err, (*m)._private) };
            // As rdkafka's `DeliveryResult` makes it.
            let error = (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                .then(|| KafkaError::MessageProduction(err.into()));
            let topic = (with_topics || error.as_ref().is_some_and(topic_error)).then(|| {
                // SAFETY: a message's topic handle and its name live as long as it (a
                // delivery report's message always has one; checked all the same).
                unsafe {
                    let rkt = (*m).rkt;
                    if rkt.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(rd::rd_kafka_topic_name(rkt))
                            .to_string_lossy()
                            .into_owned()
                    }
                }
            });
            out.push(Report {
                tag: Tag(opaque as usize),
                error,
                topic,
            });
        }
        if n < CHUNK {
            break;
        }
    }
}

/// The largest value buffer kept between sends (bytes); a larger one is freed after use.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// Per-record scratch space, kept between sends.
#[derive(Default)]
struct Buffers {
    topic: String,
    /// The source `topic` was rendered for, when the output's topic template depends on
    /// nothing else (see [`KafkaSink::topic_by_source`]): the next event of that source
    /// reuses it.
    topic_source: Option<CompactString>,
    key: String,
    value: Vec<u8>,
}

/// A librdkafka topic handle (an application reference, released on drop).
struct TopicHandle(NonNull<rd::rd_kafka_topic_t>);

impl Drop for TopicHandle {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_topic_new` and is released once, here;
        // `KafkaSink` drops its topics before its producer.
        unsafe { rd::rd_kafka_topic_destroy(self.0.as_ptr()) }
    }
}

/// The topic handles a sink has used, by name.
#[derive(Default)]
struct Topics {
    handles: HashMap<String, TopicHandle>,
    /// The last name looked up and its handle: most records go where the one before went.
    last: Option<(String, NonNull<rd::rd_kafka_topic_t>)>,
}

// SAFETY: librdkafka's topic handles may be used and released from any thread.
#[allow(unsafe_code)]
unsafe impl Send for Topics {}

impl Topics {
    /// Handles kept at most; past that (topics rendered per device, say) they are all
    /// released and made again as records need them.
    const MAX: usize = 1024;

    /// The handle of topic `name`, made on first use.
    #[allow(unsafe_code)]
    fn get(
        &mut self,
        rk: *mut rd::rd_kafka_t,
        name: &str,
    ) -> Result<NonNull<rd::rd_kafka_topic_t>, KafkaError> {
        if let Some((last, handle)) = &self.last {
            if last == name {
                return Ok(*handle);
            }
        }
        let handle = match self.handles.get(name) {
            Some(h) => h.0,
            None => {
                if self.handles.len() >= Self::MAX {
                    self.last = None;
                    self.handles.clear();
                }
                // librdkafka refuses a name over 512 bytes; a NUL cannot be passed at all.
                let invalid = || KafkaError::MessageProduction(RDKafkaErrorCode::InvalidArgument);
                let c = CString::new(name).map_err(|_| invalid())?;
                // SAFETY: `rk` is the live client of the sink that owns these topics, the
                // name is a C string, and a null config means the client's defaults.
                let raw = unsafe { rd::rd_kafka_topic_new(rk, c.as_ptr(), std::ptr::null_mut()) };
                let h = NonNull::new(raw).ok_or_else(invalid)?;
                self.handles.insert(name.to_string(), TopicHandle(h));
                h
            }
        };
        match &mut self.last {
            Some((last, h)) => {
                last.clear();
                last.push_str(name);
                *h = handle;
            }
            None => self.last = Some((name.to_string(), handle)),
        }
        Ok(handle)
    }
}

/// A Kafka producer for one output config.
pub struct KafkaSink {
    buffers: Buffers,
    // Declared before `producer`: dropped (callback off, handles released) first.
    events: EventQueue,
    topics: Topics,
    producer: BaseProducer<Context>,
    cfg: KafkaOutput,
    /// The topic template uses no field but `{source}`.
    topic_by_source: bool,
    gateway_id: String,
    fatal: Arc<AtomicBool>,
    /// The topic of the last record [`KafkaSink::send`] failed with a [`topic_error`].
    refused_topic: String,
}

/// Whether a broker of `cfg` answers a metadata request within `timeout`, from a client
/// made for the question (blocking: run it off the async threads). The router counts
/// Kafka as up until a send fails, so on a quiet site a new output that reaches no broker
/// would look healthy; the health window of a remote config asks this instead. The
/// request is for all topics' metadata (what `kcat -L` asks): naming one topic could
/// create it on a broker that creates topics on demand.
pub fn answers(cfg: &KafkaOutput, gateway_id: &str, timeout: Duration) -> Result<(), String> {
    let mut c = client_config(cfg, gateway_id)?;
    // Only metadata: no producer id to ask for (and gapless needs idempotence).
    c.set("enable.idempotence", "false")
        .remove("enable.gapless.guarantee");
    let probe: BaseProducer = c.create().map_err(|e| e.to_string())?;
    probe
        .client()
        .fetch_metadata(None, timeout)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks an output as far as it can be without a broker: its password can be read,
/// its certificate and key files opened, and librdkafka makes a producer of it (which
/// loads the certificates and checks every property, `options` too). That producer has
/// no brokers to connect to and no log, and is dropped at once. A stored remote pipeline
/// that fails this is passed over at start instead of failing every start.
pub fn check(cfg: &KafkaOutput, gateway_id: &str) -> Result<(), String> {
    let mut config = client_config(cfg, gateway_id)?;
    config
        .remove("bootstrap.servers")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg);
    let s = &cfg.security;
    for (field, file) in [
        ("ca_file", &s.ca_file),
        ("client_cert_file", &s.client_cert_file),
        ("client_key_file", &s.client_key_file),
    ] {
        if let Some(f) = file {
            std::fs::File::open(f).map_err(|e| {
                format!(
                    "output.kafka.security.{field}: cannot read {}: {e}",
                    f.display()
                )
            })?;
        }
    }
    config
        .create::<BaseProducer>()
        .map(drop)
        .map_err(|e| format!("output.kafka: librdkafka cannot make a producer of it: {e}"))
}

/// The librdkafka properties for an output config.
pub fn client_config(cfg: &KafkaOutput, gateway_id: &str) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("edge-gateway-{gateway_id}"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", cfg.compression.as_str())
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set(
            "batch.size",
            cfg.batch_bytes.min(i32::MAX as u64).to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            cfg.queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            cfg.queue_max_kbytes.to_string(),
        )
        .set(
            "message.timeout.ms",
            cfg.message_timeout.as_millis().to_string(),
        )
        .set("security.protocol", &cfg.security.protocol)
        // Reconnect within 2 s of the uplink returning (librdkafka's default backs off
        // up to 10 s); override with options."reconnect.backoff.max.ms".
        .set("reconnect.backoff.max.ms", "2000")
        // librdkafka's default (`consistent_random`) with one difference: a record with
        // an empty key (a key template that renders nothing) goes to one partition, not
        // a random one, so the order of such records holds too. Keys that are not empty
        // map to the same partitions.
        .set("partitioner", "consistent");
    let s = &cfg.security;
    if let Some(m) = &s.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &s.username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &s.password {
        c.set(
            "sasl.password",
            p.read()
                .map_err(|e| format!("output.kafka.security.password: {e}"))?,
        );
    }
    if let Some(f) = &s.ca_file {
        c.set("ssl.ca.location", f.display().to_string());
    }
    if let Some(f) = &s.client_cert_file {
        c.set("ssl.certificate.location", f.display().to_string());
    }
    if let Some(f) = &s.client_key_file {
        c.set("ssl.key.location", f.display().to_string());
    }
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    // Without idempotence a retried request lands after the ones behind it: one request
    // in flight per connection keeps each device's order (config validation refuses
    // more).
    let in_flight_set = ["max.in.flight.requests.per.connection", "max.in.flight"]
        .iter()
        .any(|k| cfg.options.contains_key(*k));
    if !cfg.idempotent() && !in_flight_set {
        c.set("max.in.flight.requests.per.connection", "1");
    }
    Ok(c)
}

impl KafkaSink {
    /// Creates the producer. `kick` gets a token whenever librdkafka has events
    /// (delivery reports) for [`KafkaSink::poll`]; a bounded(1) channel is enough.
    pub fn new(
        cfg: &KafkaOutput,
        gateway_id: &str,
        kick: flume::Sender<()>,
    ) -> Result<KafkaSink, String> {
        let fatal = Arc::new(AtomicBool::new(false));
        let ctx = Context::new(fatal.clone());
        let producer: BaseProducer<Context> = client_config(cfg, gateway_id)?
            .create_with_context(ctx)
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        Ok(KafkaSink {
            buffers: Buffers::default(),
            events: EventQueue::new(&producer, kick),
            topics: Topics::default(),
            producer,
            cfg: cfg.clone(),
            // A field is the text between a `{` and the next `}`, so a template that
            // renders `{device}` or a tag contains it literally.
            topic_by_source: !cfg.topic.contains("{device}") && !cfg.topic.contains("{tag."),
            gateway_id: gateway_id.to_string(),
            fatal,
            refused_topic: String::new(),
        })
    }

    /// The topic of the last record [`KafkaSink::send`] refused with a [`topic_error`].
    pub fn refused_topic(&self) -> &str {
        &self.refused_topic
    }

    /// The topic [`KafkaSink::send`] would send `record` to.
    pub fn topic_of(&mut self, record: &Record) -> String {
        match record {
            Record::Event(e) => {
                let Buffers {
                    topic,
                    topic_source,
                    ..
                } = &mut self.buffers;
                event_topic(&self.cfg, self.topic_by_source, topic, topic_source, e).to_string()
            }
            Record::DeadLetter(_) => dead_letter_topic(&self.cfg).to_string(),
        }
    }

    /// Whether every delivery report carries its topic ([`Report::topic`]), not only
    /// those with a [`topic_error`]: on while a topic is in trouble, so that its first
    /// success is seen; off otherwise (a string per report).
    pub fn report_topics(&self, on: bool) {
        self.producer
            .context()
            .report_topics
            .store(on, Ordering::Relaxed);
    }

    /// The output config this producer was made from.
    pub fn config(&self) -> &KafkaOutput {
        &self.cfg
    }

    /// Hands a record to the producer. `QueueFull` (and any other immediate error) comes
    /// back as an error: the record is not in the producer.
    pub fn send(&mut self, record: &Record, tag: Tag) -> Result<(), KafkaError> {
        // librdkafka copies topic, key, value and headers: the buffers are reused.
        let Buffers {
            topic,
            topic_source,
            key,
            value,
        } = &mut self.buffers;
        let rk = self.producer.client().native_ptr();
        let mut refused = None;
        let sent = match record {
            Record::Event(e) => {
                let topic = event_topic(&self.cfg, self.topic_by_source, topic, topic_source, e);
                let route = e.route.as_deref();
                let key: &str = match route.and_then(|r| r.key.as_deref()) {
                    Some(k) => k,
                    None if self.cfg.key == "{device}" => &e.device,
                    None => {
                        key.clear();
                        expand_into(&self.cfg.key, e, false, key);
                        key
                    }
                };
                let ctype = match self.cfg.value_format {
                    ValueFormat::Json => {
                        value.clear();
                        write_event(e, value);
                        CONTENT_TYPE_JSON
                    }
                    ValueFormat::Postcard => {
                        *value = record.value_bytes();
                        CONTENT_TYPE_POSTCARD
                    }
                };
                // Every header is copied, written and compressed once per record: four
                // carry what a consumer needs without parsing the value.
                produce(
                    rk,
                    self.topics.get(rk, topic)?,
                    key.as_bytes(),
                    value,
                    &[
                        (c"event-id", &e.id),
                        (c"source", &e.source),
                        (c"gateway-id", &self.gateway_id),
                        (c"content-type", ctype),
                    ],
                    record_timestamp_ms(e),
                    tag,
                )
                .inspect_err(|e| {
                    if topic_error(e) {
                        refused = Some(topic.to_string());
                    }
                })
            }
            Record::DeadLetter(d) => {
                // The same payload again (a redelivery) has the same id.
                let id = crate::event::content_id(&d.source, &d.origin, &d.payload, 0);
                let topic = dead_letter_topic(&self.cfg);
                produce(
                    rk,
                    self.topics.get(rk, topic)?,
                    d.origin.as_bytes(),
                    &d.payload,
                    &[
                        (c"event-id", &id),
                        (c"dead-letter-reason", &d.reason),
                        (c"dead-letter-detail", &d.detail),
                        (c"source", &d.source),
                        (c"origin", &d.origin),
                        (c"gateway-id", &self.gateway_id),
                    ],
                    d.received_ns / 1_000_000,
                    tag,
                )
                .inspect_err(|e| {
                    if topic_error(e) {
                        refused = Some(topic.to_string());
                    }
                })
            }
        };
        if let Some(t) = refused {
            self.refused_topic = t;
        }
        // One large event must not keep its buffer for good.
        if self.buffers.value.capacity() > MAX_KEPT_BUFFER {
            self.buffers.value = Vec::new();
        }
        sent
    }

    /// Serves librdkafka's event queue until it is empty: delivery reports are appended
    /// to `out`, errors and logs go to the context. Call it on every kick.
    ///
    /// The events are taken here rather than through rdkafka's `poll`, which made a
    /// `BorrowedMessage` (an `Arc` clone) per report and called [`Context::delivery`]
    /// (a lock) per report: a delivery-report event's messages are read in one loop,
    /// whose loads (each message is thousands of records old and out of the cache)
    /// overlap, and are warm again when the event is destroyed.
    #[allow(unsafe_code)]
    pub fn poll(&self, out: &mut Vec<Report>) {
        // Reports rdkafka's own poll collected (`poll_for`, `flush`) came first.
        self.take_reports(out);
        while let Some(event) = self.events.next() {
            // SAFETY (each call below): `event` is a live event of the kind its type says.
            match unsafe { rd::rd_kafka_event_type(event.0.as_ptr()) } {
                rd::RD_KAFKA_EVENT_DR => unsafe {
                    reports_of(
                        &event,
                        out,
                        self.producer
                            .context()
                            .report_topics
                            .load(Ordering::Relaxed),
                    )
                },
                rd::RD_KAFKA_EVENT_ERROR => {
                    let (code, fatal, reason) = unsafe {
                        let reason = rd::rd_kafka_event_error_string(event.0.as_ptr());
                        (
                            RDKafkaErrorCode::from(rd::rd_kafka_event_error(event.0.as_ptr())),
                            rd::rd_kafka_event_error_is_fatal(event.0.as_ptr()) != 0,
                            if reason.is_null() {
                                String::new()
                            } else {
                                CStr::from_ptr(reason).to_string_lossy().into_owned()
                            },
                        )
                    };
                    // A fatal error arrives with the code that caused it (an idempotence
                    // violation, say), not `Fatal`, and only this flag says so.
                    let (error, reason) = if fatal {
                        (
                            KafkaError::Global(RDKafkaErrorCode::Fatal),
                            format!("{code}: {}", reason.trim()),
                        )
                    } else {
                        (KafkaError::Global(code), reason.trim().to_string())
                    };
                    self.producer.context().error(error, &reason);
                }
                rd::RD_KAFKA_EVENT_LOG => {
                    let mut fac: *const std::ffi::c_char = std::ptr::null();
                    let mut text: *const std::ffi::c_char = std::ptr::null();
                    let mut level: i32 = 0;
                    let got = unsafe {
                        rd::rd_kafka_event_log(event.0.as_ptr(), &mut fac, &mut text, &mut level)
                    };
                    if got == 0 && !fac.is_null() && !text.is_null() {
                        let (fac, text) = unsafe {
                            (
                                CStr::from_ptr(fac).to_string_lossy(),
                                CStr::from_ptr(text).to_string_lossy(),
                            )
                        };
                        self.producer
                            .context()
                            .log(log_level(level), fac.trim(), text.trim());
                    }
                }
                // Statistics and OAUTHBEARER refreshes are not asked for (rdkafka's own
                // poll drops them too for this context).
                _ => {}
            }
        }
    }

    /// Serves the event queue for `timeout` (for shutdown and replacement, where the
    /// router does nothing else).
    pub fn poll_for(&self, timeout: Duration, out: &mut Vec<Report>) {
        self.producer.poll(timeout);
        self.poll(out);
    }

    fn take_reports(&self, out: &mut Vec<Report>) {
        if let Ok(mut reports) = self.producer.context().reports.lock() {
            out.append(&mut reports);
        }
    }

    /// Records in librdkafka's queues.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// True once librdkafka raised a fatal error (the producer must be recreated).
    ///
    /// Asked of librdkafka too, not only of the error events: rdkafka's own poll
    /// (`poll_for`, `flush`) hands a fatal error's event to the context with the code
    /// that caused it, which does not say it was fatal.
    #[allow(unsafe_code)]
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::SeqCst) || {
            // SAFETY: a live producer; no error string is asked for (NULL, size 0).
            let code = unsafe {
                rd::rd_kafka_fatal_error(
                    self.producer.client().native_ptr(),
                    std::ptr::null_mut(),
                    0,
                )
            };
            code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        }
    }

    /// Waits up to `timeout` for outstanding deliveries; their reports are appended to
    /// `out`.
    pub fn flush(&self, timeout: Duration, out: &mut Vec<Report>) {
        let _ = self.producer.flush(timeout);
        self.poll(out);
    }

    /// Fails every queued and in-flight record now (their reports arrive with an error).
    pub fn purge(&self) {
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
    }
}

/// Hands one message to librdkafka (copied: nothing here needs to outlive the call).
#[allow(unsafe_code, clippy::too_many_arguments)]
fn produce(
    rk: *mut rd::rd_kafka_t,
    topic: NonNull<rd::rd_kafka_topic_t>,
    key: &[u8],
    value: &[u8],
    headers: &[(&CStr, &str)],
    timestamp_ms: i64,
    tag: Tag,
) -> Result<(), KafkaError> {
    use rd::rd_kafka_vtype_t as V;
    use rd::rd_kafka_vu_s__bindgen_ty_1 as U;
    const MAX_HEADERS: usize = 6;
    let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
    let mem = |b: &[u8]| U {
        mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
            ptr: b.as_ptr() as *mut c_void,
            size: b.len(),
        },
    };
    let mut vus = [vu(V::RD_KAFKA_VTYPE_END, U { i: 0 }); 7 + MAX_HEADERS];
    vus[..7].copy_from_slice(&[
        vu(
            V::RD_KAFKA_VTYPE_RKT,
            U {
                rkt: topic.as_ptr(),
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_PARTITION,
            U {
                i32_: rdkafka::producer::PARTITION_UA,
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_MSGFLAGS,
            U {
                i: rd::RD_KAFKA_MSG_F_COPY,
            },
        ),
        vu(V::RD_KAFKA_VTYPE_VALUE, mem(value)),
        vu(V::RD_KAFKA_VTYPE_KEY, mem(key)),
        vu(
            V::RD_KAFKA_VTYPE_OPAQUE,
            U {
                ptr: tag.0 as *mut c_void,
            },
        ),
        vu(V::RD_KAFKA_VTYPE_TIMESTAMP, U { i64_: timestamp_ms }),
    ]);
    debug_assert!(headers.len() <= MAX_HEADERS);
    let mut n = 7;
    for (name, text) in headers.iter().take(MAX_HEADERS) {
        vus[n] = vu(
            V::RD_KAFKA_VTYPE_HEADER,
            U {
                header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                    name: name.as_ptr(),
                    val: text.as_ptr().cast(),
                    size: text.len() as isize,
                },
            },
        );
        n += 1;
    }
    // SAFETY: `rk` is a live producer and `topic` a handle of it; every pointer in `vus`
    // is valid for the call (librdkafka copies the value, key and headers: MSG_F_COPY,
    // and header values with their explicit sizes), header names are C strings; the
    // opaque is a plain integer librdkafka only hands back. The error, if any, is ours
    // to destroy.
    unsafe {
        let error = rd::rd_kafka_produceva(rk, vus.as_ptr(), n);
        if error.is_null() {
            return Ok(());
        }
        let code = rd::rd_kafka_error_code(error);
        rd::rd_kafka_error_destroy(error);
        Err(KafkaError::MessageProduction(code.into()))
    }
}

/// Where dead letters go.
fn dead_letter_topic(cfg: &KafkaOutput) -> &str {
    cfg.dead_letter_topic.as_deref().unwrap_or("dead-letter")
}

/// An event's topic: a `route` stage's choice, rendered when it was made; else the
/// output's template, rendered into `buf` (and kept there for the next event of the same
/// source, `by_source`, when the template depends on nothing else).
fn event_topic<'a>(
    cfg: &KafkaOutput,
    by_source: bool,
    buf: &'a mut String,
    buf_source: &mut Option<CompactString>,
    e: &'a Event,
) -> &'a str {
    if let Some(t) = e.route.as_deref().and_then(|r| r.topic.as_deref()) {
        return t;
    }
    if !(by_source && buf_source.as_deref() == Some(&e.source)) {
        buf.clear();
        expand_into(&cfg.topic, e, true, buf);
        *buf_source = by_source.then(|| e.source.clone());
    }
    buf
}

/// Kafka topic names allow `[A-Za-z0-9._-]`; anything else in a substituted value
/// becomes `_`.
fn topic_safe(s: &str, out: &mut String) {
    out.extend(s.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        }
    }));
}

fn expand(template: &str, e: &Event, safe: bool) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    expand_into(template, e, safe, &mut out);
    out
}

/// Appends the rendering of `template` for `e` to `out`.
fn expand_into(template: &str, e: &Event, safe: bool, out: &mut String) {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return;
        };
        let field = &rest[start + 1..start + len];
        let value = match field {
            "source" => Some(e.source.as_str()),
            "device" => Some(e.device.as_str()),
            f => f
                .strip_prefix("tag.")
                .and_then(|t| e.tags.get(t))
                .map(CompactString::as_str),
        }
        .unwrap_or("unknown");
        if safe {
            topic_safe(value, out);
        } else {
            out.push_str(value);
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    if safe {
        kafka_topic_name(out);
    }
}

/// An event's Kafka record timestamp: its time in ms. The receive time instead for a
/// time at or before the epoch (a stage's arithmetic, a clock never set that went
/// through: librdkafka reads 0 as "now", which would differ between a direct send and a
/// later drain, and -1 as no timestamp), and for one more than [`MAX_AHEAD_MS`] after
/// the receive time (a device clock far ahead): Kafka 4.0 refuses a record more than
/// an hour ahead of the broker's clock (`log.message.timestamp.after.max.ms`), and with
/// it the whole batch it came in. The value keeps the event's own time either way.
fn record_timestamp_ms(e: &Event) -> i64 {
    let ms = e.time_ns.div_euclid(1_000_000);
    let received = e.received_ns.div_euclid(1_000_000).max(1);
    // Only a gateway clock that was set can say a device's is ahead (a board without a
    // real-time clock starts offline in 1970 or at a stale saved time).
    let gateway_clock_set = e.received_ns >= crate::sources::payload::UNSET_CLOCK_BEFORE_NS;
    let too_far_ahead = gateway_clock_set && ms > received.saturating_add(MAX_AHEAD_MS);
    if ms > 0 && !too_far_ahead {
        ms
    } else {
        received
    }
}

/// How far past its receipt an event's time may be and still be its record's
/// timestamp: half of Kafka 4.0's default limit, leaving room for the gateway's clock
/// and the broker's to differ.
const MAX_AHEAD_MS: i64 = 30 * 60 * 1000;

/// The longest topic name Kafka takes.
const MAX_TOPIC_NAME: usize = 249;

/// Makes a rendered topic a name Kafka takes: `.` and `..` are not topic names (a device
/// called so, under `topic = "{device}"`), and a name is at most 249 characters (a long
/// one is cut, with a hash of the whole so that long names stay apart). Otherwise each
/// such record would be refused for good.
fn kafka_topic_name(name: &mut String) {
    if name.is_empty() || name == "." || name == ".." {
        *name = "_".repeat(name.len().max(1));
    }
    if name.len() > MAX_TOPIC_NAME {
        let hash = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
        let mut cut = MAX_TOPIC_NAME - 17;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push_str(&format!("-{hash:016x}"));
    }
}

/// Renders a topic template for an event.
pub fn render(template: &str, e: &Event) -> String {
    expand(template, e, true)
}

/// Renders a key template for an event (no character filtering).
pub fn render_raw(template: &str, e: &Event) -> String {
    expand(template, e, false)
}

/// An event in the value schema as a `serde_json::Value` (for `spool export`), built from
/// the event rather than by parsing the Kafka bytes, whose floats would not all read back
/// to the last bit; `export_value_matches_the_kafka_value` compares the two.
fn event_value(e: &Event) -> serde_json::Value {
    use crate::event::Value as V;
    use serde_json::{json, Map, Value};
    let mut v = json!({
        "schema": SCHEMA,
        "id": e.id.as_str(),
        "device": e.device.as_str(),
        "source": e.source.as_str(),
        "origin": e.origin.as_str(),
        "time": rfc3339(e.time_ns),
        "time_ms": e.time_ns.div_euclid(1_000_000),
        "clock": e.clock.as_str(),
        "received": rfc3339(e.received_ns),
        "readings": e.readings.iter().map(|(k, r)| {
            let r = match r {
                V::Number(n) => json!(n),
                V::Text(t) => json!(t.as_str()),
                V::Bool(b) => json!(b),
            };
            (k.to_string(), r)
        }).collect::<Map<String, Value>>(),
        "tags": e.tags.iter().map(|(k, t)| (k.to_string(), json!(t.as_str()))).collect::<Map<String, Value>>(),
    });
    if let (Some(l), Some(obj)) = (e.location, v.as_object_mut()) {
        let mut loc = Map::new();
        loc.insert("lat".into(), json!(l.lat));
        loc.insert("lon".into(), json!(l.lon));
        if let Some(alt) = l.alt {
            loc.insert("alt".into(), json!(alt));
        }
        if let Some(acc) = l.accuracy {
            loc.insert("accuracy".into(), json!(acc));
        }
        obj.insert("location".into(), Value::Object(loc));
    }
    v
}

/// A record as a JSON value (events in the value schema; dead letters with the payload
/// as text where it is UTF-8).
pub fn record_json(r: &Record) -> serde_json::Value {
    match r {
        Record::Event(e) => event_value(e),
        Record::DeadLetter(d) => serde_json::json!({
            "dead_letter": true,
            "source": d.source,
            "origin": d.origin,
            "reason": d.reason,
            "detail": d.detail,
            "received": rfc3339(d.received_ns),
            "payload": String::from_utf8_lossy(&d.payload),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::event_json::tests::event;

    #[test]
    fn an_error_handed_over_twice_is_handled_once() {
        let ctx = Context::new(Arc::new(AtomicBool::new(false)));
        assert!(!ctx.repeated("Local: Broker transport failure: a"));
        assert!(ctx.repeated("Local: Broker transport failure: a"));
        assert!(!ctx.repeated("Local: Fatal error: b"));
        assert!(!ctx.repeated("Local: Broker transport failure: a"));
    }

    #[test]
    fn export_value_matches_the_kafka_value() {
        let mut e = event();
        e.readings
            .insert("odd".into(), crate::event::Value::Number(0.1 + 0.2));
        e.readings
            .insert("on".into(), crate::event::Value::Bool(true));
        let exported = record_json(&Record::Event(e.clone()));
        let kafka: serde_json::Value =
            serde_json::from_slice(&event_json_bytes(&e)).expect("valid JSON");
        // The same fields, values and order as the bytes Kafka gets.
        assert_eq!(
            exported.to_string(),
            serde_json::to_string(&kafka).expect("json")
        );
        assert_eq!(exported["readings"]["odd"].as_f64(), Some(0.1 + 0.2));
        e.location = None;
        assert!(record_json(&Record::Event(e)).get("location").is_none());
    }

    #[cfg(feature = "kafka-tls")]
    fn output(text: &str) -> KafkaOutput {
        toml::from_str(&format!("brokers = \"127.0.0.1:1\"\n{text}")).expect("kafka output")
    }

    #[cfg(feature = "kafka-tls")]
    #[test]
    fn tls_and_scram_are_built_in() {
        std::env::set_var("GATEWAY_TEST_KAFKA_PASSWORD", "secret");
        let cfg = output(
            "[security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"gw\"\npassword = { env = \"GATEWAY_TEST_KAFKA_PASSWORD\" }",
        );
        let (tx, _rx) = flume::bounded(1);
        assert!(KafkaSink::new(&cfg, "g", tx.clone()).is_ok());
        // A CA file that does not exist is refused at start, with the reason.
        let bad = output("[security]\nprotocol = \"ssl\"\nca_file = \"/nonexistent/ca.pem\"");
        let err = KafkaSink::new(&bad, "g", tx).err().expect("refused");
        assert!(err.contains("cannot create the Kafka producer"), "{err}");
    }

    #[cfg(feature = "kafka-tls")]
    #[test]
    fn a_check_makes_the_producer_a_start_would() {
        assert_eq!(check(&output(""), "g"), Ok(()));
        // A property librdkafka refuses only when it makes the producer, and a CA file
        // that turned into something else than a certificate.
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        for (text, says) in [
            (
                "[options]
\"no.such.property\" = \"1\""
                    .to_string(),
                "no.such.property",
            ),
            (
                format!(
                    "[security]\nprotocol = \"ssl\"\nca_file = \"{}\"",
                    ca.display()
                ),
                "ssl.ca.location",
            ),
        ] {
            let err = check(&output(&text), "g").expect_err("refused");
            assert!(
                err.contains("cannot make a producer") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn a_tag_gives_back_its_seq_and_origin() {
        for (seq, lowest) in [(0, 0), (7, 3), (1 << 40, (1 << 40) - 5), (u64::MAX >> 1, 1)] {
            for from_spool in [false, true] {
                let t = Tag::new(seq, from_spool);
                assert_eq!(t.seq(lowest), seq);
                assert_eq!(t.from_spool(), from_spool);
            }
        }
        // A record reported after its table moved past it maps to no seq in flight.
        assert!(Tag::new(3, false).seq(10) > 10 + (1 << 30));
        // 32-bit targets keep 31 bits: the rest comes from the lowest seq in flight.
        let low = |seq: u64| seq & ((1 << 31) - 1);
        let seq = (1u64 << 31) + 5;
        assert_eq!(restore(low(seq), 31, 1 << 31), seq);
        assert_eq!(restore(low(seq), 31, (1 << 31) - 10), seq);
        assert_eq!(restore(low(seq), 31, seq), seq);
        assert_eq!(restore(low(3 << 31), 31, (3 << 31) - 1), 3 << 31);
    }

    #[test]
    fn sends_render_topics_per_source_and_refuse_invalid_names() {
        let cfg: KafkaOutput =
            toml::from_str("brokers = \"127.0.0.1:1\"\nmessage_timeout = \"1s\"").expect("cfg");
        let (tx, _rx) = flume::bounded(1);
        let mut sink = KafkaSink::new(&cfg, "g", tx).expect("sink");
        assert!(sink.topic_by_source);
        let site = event();
        let mut other = event();
        other.source = "other/x".into();
        for (e, topic) in [
            (&site, "telemetry.site"),
            (&site, "telemetry.site"),
            (&other, "telemetry.other_x"),
            (&site, "telemetry.site"),
        ] {
            sink.send(&Record::Event(e.clone()), Tag::new(1, false))
                .expect("queued");
            assert_eq!(sink.buffers.topic, topic);
        }
        assert_eq!(sink.topics.handles.len(), 2);
        // librdkafka refuses a topic name over 512 bytes, and a NUL cannot be passed:
        // for good (the router drops and counts such a record instead of retrying it).
        for bad in ["t".repeat(600), "a\0b".to_string()] {
            let mut e = event();
            e.route = Some(Box::new(crate::event::Route {
                topic: Some(bad),
                key: None,
            }));
            let err = sink
                .send(&Record::Event(e), Tag::new(2, false))
                .expect_err("refused");
            assert_eq!(
                err.rdkafka_error_code(),
                Some(RDKafkaErrorCode::InvalidArgument)
            );
        }
        // The four queued records come back with their tags (purged: no broker); the
        // refused ones were never queued. (`in_flight` also counts librdkafka's error
        // events about the missing broker, so it is no count of records here.)
        sink.purge();
        let mut reports = Vec::new();
        let start = Instant::now();
        while reports.len() < 4 && start.elapsed() < Duration::from_secs(10) {
            sink.poll_for(Duration::from_millis(50), &mut reports);
        }
        sink.poll_for(Duration::from_millis(100), &mut reports);
        assert_eq!(reports.len(), 4);
        assert!(reports
            .iter()
            .all(|r| r.tag == Tag::new(1, false) && r.error.is_some()));
        let by_device: KafkaOutput =
            toml::from_str("brokers = \"127.0.0.1:1\"\ntopic = \"t.{source}.{device}\"")
                .expect("cfg");
        let (tx, _rx) = flume::bounded(1);
        assert!(
            !KafkaSink::new(&by_device, "g", tx)
                .expect("sink")
                .topic_by_source
        );
    }

    /// The router's poll (`KafkaSink::poll`, woken by the kick) reads delivery reports
    /// and error events off librdkafka's queue itself: reports with their tags and
    /// errors, and a fatal error that flags the producer for replacement.
    #[test]
    #[allow(unsafe_code)]
    fn the_router_s_poll_reads_reports_and_a_fatal_error() {
        let cfg: KafkaOutput =
            toml::from_str("brokers = \"127.0.0.1:1\"\nmessage_timeout = \"1s\"").expect("cfg");
        let (tx, kicks) = flume::bounded(1);
        let mut sink = KafkaSink::new(&cfg, "g", tx).expect("sink");
        for seq in 0..3 {
            sink.send(&Record::Event(event()), Tag::new(seq, false))
                .expect("queued");
        }
        // No broker: purged, each comes back with the purge error.
        sink.purge();
        let mut reports = Vec::new();
        let start = Instant::now();
        while reports.len() < 3 && start.elapsed() < Duration::from_secs(10) {
            let _ = kicks.recv_timeout(Duration::from_millis(100));
            sink.poll(&mut reports);
        }
        let got: Vec<(Tag, Option<RDKafkaErrorCode>)> = reports
            .iter()
            .map(|r| {
                (
                    r.tag,
                    r.error.as_ref().and_then(KafkaError::rdkafka_error_code),
                )
            })
            .collect();
        let purged = Some(RDKafkaErrorCode::PurgeQueue);
        assert_eq!(
            got,
            [
                (Tag::new(0, false), purged),
                (Tag::new(1, false), purged),
                (Tag::new(2, false), purged)
            ]
        );
        assert!(!sink.is_fatal());
        // SAFETY: a live producer; the reason is a C string.
        let raised = unsafe {
            rd::rd_kafka_test_fatal_error(
                sink.producer.client().native_ptr(),
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"a test".as_ptr(),
            )
        };
        assert_eq!(raised, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        // librdkafka says so at once; the error event (with the code that caused it,
        // not `Fatal`) reaches the context through the poll.
        assert!(sink.is_fatal());
        let start = Instant::now();
        while !sink.fatal.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
            let _ = kicks.recv_timeout(Duration::from_millis(100));
            sink.poll(&mut reports);
        }
        assert!(
            sink.fatal.load(Ordering::SeqCst),
            "the fatal error event was served"
        );
    }

    #[test]
    fn a_record_timestamp_is_the_event_time_unless_before_1970_or_far_ahead() {
        let at = |time_ms: i64, received_ms: i64| {
            let mut e = event();
            e.time_ns = time_ms * 1_000_000;
            e.received_ns = received_ms * 1_000_000;
            record_timestamp_ms(&e)
        };
        let now = 1_800_000_000_000;
        assert_eq!(at(now - 86_400_000, now), now - 86_400_000, "a day old");
        assert_eq!(at(now + MAX_AHEAD_MS, now), now + MAX_AHEAD_MS);
        assert_eq!(at(now + MAX_AHEAD_MS + 1, now), now, "too far ahead");
        assert_eq!(at(4_102_444_800_000, now), now, "a clock at 2100");
        assert_eq!(at(0, now), now);
        assert_eq!(at(-5, now), now);
        assert_eq!(at(-5, 0), 1, "never 0 (now) or -1 (none)");
        // A gateway clock not set yet (1970, or before 2001) says nothing.
        assert_eq!(at(now, 5_000), now);
        assert_eq!(at(now, 900_000_000_000), now);
    }

    /// The librdkafka property `key` that `client_config` sets for an output with
    /// `options` (TOML lines).
    fn property(options: &str, key: &str) -> Option<String> {
        let cfg: KafkaOutput =
            toml::from_str(&format!("brokers = \"127.0.0.1:1\"\n[options]\n{options}"))
                .expect("cfg");
        let c = client_config(&cfg, "g").expect("config");
        c.get(key).map(str::to_string)
    }

    #[test]
    fn empty_keys_keep_to_one_partition_unless_options_say_otherwise() {
        let with = |opts: &str| property(opts, "partitioner");
        assert_eq!(with("").as_deref(), Some("consistent"));
        assert_eq!(
            with("\"partitioner\" = \"murmur2_random\"").as_deref(),
            Some("murmur2_random")
        );
    }

    #[test]
    fn without_idempotence_one_request_is_in_flight() {
        let with = |opts: &str| property(opts, "max.in.flight.requests.per.connection");
        assert_eq!(with(""), None, "idempotent: librdkafka's own limit");
        assert_eq!(with("\"enable.idempotence\" = \"False\""), Some("1".into()));
        assert_eq!(
            with("\"enable.idempotence\" = \"0\"\n\"max.in.flight\" = \"1\""),
            None,
            "the alias the options set stands"
        );
    }

    #[test]
    fn templates() {
        let e = event();
        assert_eq!(render("telemetry.{source}", &e), "telemetry.site");
        assert_eq!(
            render("t.{device}.{tag.site}.{tag.none}", &e),
            "t.d_1.b_1.unknown"
        );
        assert_eq!(render_raw("{device}", &e), "d/1");
        assert_eq!(render("broken{", &e), "broken{");
    }

    #[test]
    fn a_rendered_topic_is_a_name_kafka_takes() {
        let with = |device: &str| {
            let mut e = event();
            e.device = device.into();
            render("{device}", &e)
        };
        assert_eq!(with("."), "_");
        assert_eq!(with(".."), "__");
        let (a, b) = (
            with(&"a".repeat(300)),
            with(&format!("{}b", "a".repeat(299))),
        );
        assert_eq!(a.len(), MAX_TOPIC_NAME);
        assert_eq!(b.len(), MAX_TOPIC_NAME);
        assert_ne!(a, b, "long names stay apart");
        assert_eq!(
            with(&"a".repeat(249)),
            "a".repeat(249),
            "249 is still whole"
        );
    }
}
