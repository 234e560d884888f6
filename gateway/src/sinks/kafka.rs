//! The Kafka output: an idempotent librdkafka producer with delivery reports.
//!
//! Records are handed to a [`ThreadedProducer`] with a small [`Opaque`] (seq, where the
//! record came from, when it was sent); librdkafka batches, compresses and retries, and its
//! delivery callback sends a [`Report`] back to the router for every record, success or
//! failure. Many records are in flight at once; nothing here waits for a round trip.
//!
//! The value schema `edge-gateway.event.v1` (JSON) is documented in the README; headers
//! carry the event id (for de-duplication), source, gateway id, content type and schema.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_config::{KafkaOutput, ValueFormat};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;

use crate::event::{rfc3339, Event, Location, Record, Value};

/// The JSON value schema name, also sent in the `schema` header.
pub const SCHEMA: &str = "edge-gateway.event.v1";

/// What travels with a record through librdkafka and comes back in its report.
#[derive(Debug)]
pub struct Opaque {
    /// Receive order of the record.
    pub seq: u64,
    /// True when the record was read from the spool (its row must be deleted on success).
    pub from_spool: bool,
    /// When it was handed to the producer.
    pub sent: Instant,
}

/// A delivery report.
#[derive(Debug)]
pub struct Report {
    /// The opaque given at send.
    pub opaque: Box<Opaque>,
    /// `None` when Kafka confirmed the record.
    pub error: Option<KafkaError>,
}

/// The producer context: forwards delivery reports, flags fatal errors.
pub struct Context {
    reports: flume::Sender<Report>,
    fatal: Arc<AtomicBool>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
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
    type DeliveryOpaque = Box<Opaque>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Opaque>) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        // The router outlives the producer; if it is gone there is nobody to tell.
        let _ = self.reports.send(Report { opaque, error });
    }
}

/// A Kafka producer for one output config.
pub struct KafkaSink {
    producer: ThreadedProducer<Context>,
    cfg: KafkaOutput,
    gateway_id: String,
    fatal: Arc<AtomicBool>,
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
        .set("reconnect.backoff.max.ms", "2000");
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
    Ok(c)
}

impl KafkaSink {
    /// Creates the producer; delivery reports go to `reports`.
    pub fn new(
        cfg: &KafkaOutput,
        gateway_id: &str,
        reports: flume::Sender<Report>,
    ) -> Result<KafkaSink, String> {
        let fatal = Arc::new(AtomicBool::new(false));
        let ctx = Context {
            reports,
            fatal: fatal.clone(),
        };
        let producer = client_config(cfg, gateway_id)?
            .create_with_context(ctx)
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        Ok(KafkaSink {
            producer,
            cfg: cfg.clone(),
            gateway_id: gateway_id.to_string(),
            fatal,
        })
    }

    /// The output config this producer was made from.
    pub fn config(&self) -> &KafkaOutput {
        &self.cfg
    }

    /// Hands a record to the producer. `QueueFull` (and any other immediate error) gives
    /// the opaque back.
    pub fn send(
        &self,
        record: &Record,
        opaque: Box<Opaque>,
    ) -> Result<(), (KafkaError, Box<Opaque>)> {
        let (topic, key, value, headers, ts) = match record {
            Record::Event(e) => {
                // A `route` stage's choice, rendered when it was made; else the output's.
                let route = e.route.as_deref();
                let topic = match route.and_then(|r| r.topic.clone()) {
                    Some(t) => t,
                    None => render(&self.cfg.topic, e),
                };
                let key = match route.and_then(|r| r.key.clone()) {
                    Some(k) => k,
                    None => render_raw(&self.cfg.key, e),
                };
                let (value, ctype) = match self.cfg.value_format {
                    ValueFormat::Json => (event_json_bytes(e), "application/json"),
                    ValueFormat::Postcard => (record.value_bytes(), "application/x-postcard"),
                };
                let h = headers(&[
                    ("event-id", &e.id),
                    ("source", &e.source),
                    ("gateway-id", &self.gateway_id),
                    ("content-type", ctype),
                    ("schema", SCHEMA),
                ]);
                (topic, key, value, h, e.time_ns / 1_000_000)
            }
            Record::DeadLetter(d) => {
                let topic = self
                    .cfg
                    .dead_letter_topic
                    .clone()
                    .unwrap_or_else(|| "dead-letter".into());
                let h = headers(&[
                    ("dead-letter-reason", &d.reason),
                    ("dead-letter-detail", &d.detail),
                    ("source", &d.source),
                    ("origin", &d.origin),
                    ("gateway-id", &self.gateway_id),
                ]);
                (
                    topic,
                    d.origin.clone(),
                    d.payload.clone(),
                    h,
                    d.received_ns / 1_000_000,
                )
            }
        };
        let rec = BaseRecord::with_opaque_to(&topic, opaque)
            .key(key.as_bytes())
            .payload(&value)
            .headers(headers)
            .timestamp(ts);
        self.producer
            .send(rec)
            .map_err(|(e, r)| (e, r.delivery_opaque))
    }

    /// Records in librdkafka's queues.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// True once librdkafka reported a fatal error (the producer must be recreated).
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for outstanding deliveries.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }

    /// Fails every queued and in-flight record now (their reports arrive with an error).
    pub fn purge(&self) {
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
    }
}

/// Record headers from (key, text value) pairs.
fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(
        OwnedHeaders::new_with_capacity(pairs.len()),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(*value),
            })
        },
    )
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
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let field = &rest[start + 1..start + len];
        let value = match field {
            "source" => Some(e.source.as_str()),
            "device" => Some(e.device.as_str()),
            f => f
                .strip_prefix("tag.")
                .and_then(|t| e.tags.get(t))
                .map(String::as_str),
        }
        .unwrap_or("unknown");
        if safe {
            topic_safe(value, &mut out);
        } else {
            out.push_str(value);
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// Renders a topic template for an event.
pub fn render(template: &str, e: &Event) -> String {
    expand(template, e, true)
}

/// Renders a key template for an event (no character filtering).
pub fn render_raw(template: &str, e: &Event) -> String {
    expand(template, e, false)
}

#[derive(Serialize)]
struct JsonLocation {
    lat: f64,
    lon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    alt: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<f64>,
}

/// Readings serialised straight from the event's map (no intermediate map).
struct JsonReadings<'a>(&'a std::collections::BTreeMap<String, Value>);

impl Serialize for JsonReadings<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            match v {
                Value::Number(n) => m.serialize_entry(k, n)?,
                Value::Text(t) => m.serialize_entry(k, t)?,
                Value::Bool(b) => m.serialize_entry(k, b)?,
            }
        }
        m.end()
    }
}

#[derive(Serialize)]
struct JsonEvent<'a> {
    schema: &'static str,
    id: &'a str,
    device: &'a str,
    source: &'a str,
    origin: &'a str,
    time: String,
    time_ms: i64,
    clock: &'static str,
    received: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<JsonLocation>,
    readings: JsonReadings<'a>,
    tags: &'a std::collections::BTreeMap<String, String>,
}

fn json_event(e: &Event) -> JsonEvent<'_> {
    JsonEvent {
        schema: SCHEMA,
        id: &e.id,
        device: &e.device,
        source: &e.source,
        origin: &e.origin,
        time: rfc3339(e.time_ns),
        time_ms: e.time_ns / 1_000_000,
        clock: e.clock.as_str(),
        received: rfc3339(e.received_ns),
        location: e.location.map(
            |Location {
                 lat,
                 lon,
                 alt,
                 accuracy,
             }| JsonLocation {
                lat,
                lon,
                alt,
                accuracy,
            },
        ),
        readings: JsonReadings(&e.readings),
        tags: &e.tags,
    }
}

/// The JSON value bytes of an event.
pub fn event_json_bytes(e: &Event) -> Vec<u8> {
    // Sized for the fixed fields plus a typical reading or tag, so that the buffer is
    // not grown (and copied) two or three times per event.
    let guess =
        320 + e.id.len() + e.device.len() + e.origin.len() + 40 * (e.readings.len() + e.tags.len());
    let mut out = Vec::with_capacity(guess);
    // Writing to a Vec fails only if serialising fails, which these types never do.
    let _ = serde_json::to_writer(&mut out, &json_event(e));
    out
}

/// A record as a JSON value (events in the value schema; dead letters with the payload
/// as text where it is UTF-8).
pub fn record_json(r: &Record) -> serde_json::Value {
    match r {
        Record::Event(e) => serde_json::to_value(json_event(e)).unwrap_or_default(),
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
    use crate::event::ClockQuality;

    fn event() -> Event {
        Event {
            id: "d/1:5".into(),
            device: "d/1".into(),
            source: "site".into(),
            origin: "t".into(),
            time_ns: 1_700_000_000_123_000_000,
            clock: ClockQuality::Device,
            received_ns: 1_700_000_000_123_000_000,
            location: Some(Location {
                lat: 1.5,
                lon: 2.5,
                alt: None,
                accuracy: Some(3.0),
            }),
            readings: [
                ("t".to_string(), Value::Number(20.5)),
                ("s".to_string(), Value::Text("ok".into())),
            ]
            .into(),
            tags: [("site".to_string(), "b 1".to_string())].into(),
            route: None,
        }
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
        let (tx, _rx) = flume::unbounded();
        assert!(KafkaSink::new(&cfg, "g", tx.clone()).is_ok());
        // A CA file that does not exist is refused at start, with the reason.
        let bad = output("[security]\nprotocol = \"ssl\"\nca_file = \"/nonexistent/ca.pem\"");
        let err = KafkaSink::new(&bad, "g", tx).err().expect("refused");
        assert!(err.contains("cannot create the Kafka producer"), "{err}");
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
    fn json_value_schema_is_pinned() {
        let text = String::from_utf8(event_json_bytes(&event())).expect("utf8");
        assert_eq!(
            text,
            r#"{"schema":"edge-gateway.event.v1","id":"d/1:5","device":"d/1","source":"site","origin":"t","time":"2023-11-14T22:13:20.123Z","time_ms":1700000000123,"clock":"device","received":"2023-11-14T22:13:20.123Z","location":{"lat":1.5,"lon":2.5,"accuracy":3.0},"readings":{"s":"ok","t":20.5},"tags":{"site":"b 1"}}"#
        );
    }
}
