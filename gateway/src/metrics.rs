//! Telemetry: Prometheus metrics and the `/metrics` + `/health` HTTP endpoint.
//!
//! Accounting invariant, per input: `received + generated = delivered + dropped (by
//! reason) + spooled now + in flight` (`generated`: events stages made, such as window
//! summaries and geofence transitions). Every drop increments `gateway_events_dropped_total` with a reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every reason an event can be dropped for (the `reason` label of
/// `gateway_events_dropped_total`).
pub const DROP_REASONS: &[&str] = &[
    "malformed_json",
    "malformed_senml",
    "malformed_number",
    "missing_device",
    "unsubscribed_topic",
    "bad_time",
    "bad_location",
    "too_large",
    "filtered",
    "out_of_range",
    "spool_overflow",
    "corrupt_record",
    "kafka_rejected",
    "corrupt_frame",
    "unknown_message",
    "malformed_reading",
    "out_of_sequence",
    "duplicate",
    "no_hello",
    "unknown_boot",
    "input_stopped",
    "stage_flush_timeout",
    "bad_checksum",
    "malformed_nmea",
    "no_fix",
    "unsupported_sentence",
    "filter_error",
    "missing_field",
    "time_in_future",
    "time_too_old",
    "dedup",
    "throttled",
    "deadband",
    "windowed",
    "late",
    "null_island",
    "bad_fix",
    "inaccurate_fix",
    "impossible_speed",
];

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];

/// All of the gateway's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    received: Family<L1, Counter>,
    generated: Family<L1, Counter>,
    delivered: Family<L1, Counter>,
    spooled: Family<L1, Counter>,
    dropped: Family<L2, Counter>,
    dead_letters: Family<L1, Counter>,
    acks: Family<L1, Counter>,
    connected: Family<L1, Gauge>,
    silent: Family<L1, Gauge>,
    reconnects: Family<L1, Counter>,
    device_lost: Family<L1, Counter>,
    values_skipped: Family<L2, Counter>,
    stage_in: Family<L1, Counter>,
    stage_out: Family<L1, Counter>,
    stage_dropped: Family<L2, Counter>,
    stage_evicted: Family<L1, Counter>,
    spool_rows: Gauge,
    spool_bytes: Gauge,
    spool_quarantined: Counter,
    spool_errors: Family<L1, Counter>,
    spool_blocked: Gauge,
    spool_reserve: Gauge,
    drained: Counter,
    kafka_latency: Histogram,
    kafka_errors: Family<L1, Counter>,
    kafka_gated: Counter,
    kafka_up: Gauge,
    spooling: Gauge,
    inflight: Gauge,
    router_alive: AtomicBool,
}

fn l1(k: &'static str, v: &str) -> L1 {
    [(k, v.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("gateway");
        let received = Family::default();
        let generated = Family::default();
        let delivered = Family::default();
        let spooled = Family::default();
        let dropped = Family::default();
        let dead_letters = Family::default();
        let acks = Family::default();
        let connected = Family::default();
        let silent = Family::default();
        let reconnects = Family::default();
        let device_lost = Family::default();
        let values_skipped = Family::default();
        let stage_in = Family::default();
        let stage_out = Family::default();
        let stage_dropped = Family::default();
        let stage_evicted = Family::default();
        let spool_rows = Gauge::default();
        let spool_bytes = Gauge::default();
        let spool_quarantined = Counter::default();
        let spool_errors = Family::default();
        let spool_blocked = Gauge::default();
        let spool_reserve = Gauge::default();
        let drained = Counter::default();
        let kafka_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let kafka_errors = Family::default();
        let kafka_gated = Counter::default();
        let kafka_up = Gauge::default();
        let spooling = Gauge::default();
        let inflight = Gauge::default();
        r.register(
            "events_received",
            "Events (and undecodable payloads) received, per input",
            received.clone(),
        );
        r.register(
            "events_generated",
            "Events made by stages (window summaries, geofence enter and exit), per input",
            generated.clone(),
        );
        r.register(
            "events_delivered",
            "Events confirmed by Kafka, per input",
            delivered.clone(),
        );
        r.register(
            "events_spooled",
            "Events written to the spool, per input",
            spooled.clone(),
        );
        r.register(
            "events_dropped",
            "Events dropped, per input and reason",
            dropped.clone(),
        );
        r.register(
            "dead_letters",
            "Undecodable payloads sent to the dead-letter topic",
            dead_letters.clone(),
        );
        r.register(
            "upstream_acks",
            "Acknowledgements sent upstream, per input",
            acks.clone(),
        );
        r.register(
            "input_connected",
            "1 while the input is connected (MQTT: and its subscriptions are acknowledged)",
            connected.clone(),
        );
        r.register(
            "input_silent",
            "1 while a connected input has heard nothing for its silence timeout (serial)",
            silent.clone(),
        );
        r.register(
            "input_values_skipped",
            "Values left out of an otherwise good event (reason not_finite: a NaN or infinite sensor value), per input",
            values_skipped.clone(),
        );
        r.register(
            "input_reconnects",
            "Reconnect attempts, per input",
            reconnects.clone(),
        );
        r.register(
            "input_device_lost",
            "Readings a serial device gave up before the gateway had them (its buffer overflowed while unacknowledged), per input; never received",
            device_lost.clone(),
        );
        r.register("stage_events_in", "Events into a stage", stage_in.clone());
        r.register(
            "stage_events_out",
            "Events out of a stage",
            stage_out.clone(),
        );
        r.register(
            "stage_events_dropped",
            "Events dropped by a stage, per reason",
            stage_dropped.clone(),
        );
        r.register(
            "stage_evictions",
            "Entries a stage with bounded state forgot to stay within its bound",
            stage_evicted.clone(),
        );
        r.register("spool_rows", "Events in the spool", spool_rows.clone());
        r.register(
            "spool_bytes",
            "Bytes of event data in the spool",
            spool_bytes.clone(),
        );
        r.register(
            "spool_quarantined",
            "Corrupt spool files moved aside",
            spool_quarantined.clone(),
        );
        r.register(
            "spool_errors",
            "Spool errors, per kind (disk_full, io, read, corrupt)",
            spool_errors.clone(),
        );
        r.register(
            "spool_blocked",
            "1 while inputs are held back (spool full or failing)",
            spool_blocked.clone(),
        );
        r.register(
            "spool_reserve_bytes",
            "Bytes of the spool's reserve file held (0 once given up to a full disk)",
            spool_reserve.clone(),
        );
        r.register(
            "spool_drained",
            "Events drained from the spool to Kafka",
            drained.clone(),
        );
        r.register(
            "kafka_delivery_latency_seconds",
            "Send to delivery report",
            kafka_latency.clone(),
        );
        r.register(
            "kafka_errors",
            "Kafka delivery errors, per kind",
            kafka_errors.clone(),
        );
        r.register(
            "kafka_gated",
            "Times new records were held back while a batch waited for Kafka's answer (the send gate)",
            kafka_gated.clone(),
        );
        r.register(
            "kafka_up",
            "1 while Kafka confirms deliveries",
            kafka_up.clone(),
        );
        r.register(
            "spooling",
            "1 while new events go to the spool instead of straight to Kafka",
            spooling.clone(),
        );
        r.register(
            "kafka_inflight",
            "Records handed to the producer, not yet confirmed",
            inflight.clone(),
        );
        Metrics(Arc::new(Inner {
            registry: r,
            received,
            generated,
            delivered,
            spooled,
            dropped,
            dead_letters,
            acks,
            connected,
            silent,
            reconnects,
            device_lost,
            values_skipped,
            stage_in,
            stage_out,
            stage_dropped,
            stage_evicted,
            spool_rows,
            spool_bytes,
            spool_quarantined,
            spool_errors,
            spool_blocked,
            spool_reserve,
            drained,
            kafka_latency,
            kafka_errors,
            kafka_gated,
            kafka_up,
            spooling,
            inflight,
            router_alive: AtomicBool::new(false),
        }))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.0.registry);
        s
    }

    /// Per-input counters, resolved once.
    pub fn input(&self, input: &str) -> InputMetrics {
        let l = l1("input", input);
        InputMetrics {
            name: input.to_string(),
            received: self.0.received.get_or_create(&l).clone(),
            generated: self.0.generated.get_or_create(&l).clone(),
            delivered: self.0.delivered.get_or_create(&l).clone(),
            spooled: self.0.spooled.get_or_create(&l).clone(),
            dead_letters: self.0.dead_letters.get_or_create(&l).clone(),
            acks: self.0.acks.get_or_create(&l).clone(),
            connected: self.0.connected.get_or_create(&l).clone(),
            silent: self.0.silent.get_or_create(&l).clone(),
            reconnects: self.0.reconnects.get_or_create(&l).clone(),
            device_lost: self.0.device_lost.get_or_create(&l).clone(),
            metrics: self.clone(),
        }
    }

    pub(crate) fn stage_in(&self, stage: &str) -> Counter {
        self.0.stage_in.get_or_create(&l1("stage", stage)).clone()
    }
    pub(crate) fn stage_out(&self, stage: &str) -> Counter {
        self.0.stage_out.get_or_create(&l1("stage", stage)).clone()
    }
    pub(crate) fn stage_evicted(&self, stage: &str) -> Counter {
        self.0
            .stage_evicted
            .get_or_create(&l1("stage", stage))
            .clone()
    }
    pub(crate) fn stage_dropped(&self, stage: &str, reason: &str) {
        self.0
            .stage_dropped
            .get_or_create(&[("stage", stage.to_string()), ("reason", reason.to_string())])
            .inc();
    }
    /// Counts a drop for an input.
    pub fn dropped(&self, input: &str, reason: &str, n: u64) {
        self.0
            .dropped
            .get_or_create(&[("input", input.to_string()), ("reason", reason.to_string())])
            .inc_by(n);
    }
    /// Sets the spool depth gauges.
    pub fn spool_depth(&self, rows: u64, bytes: u64) {
        self.0.spool_rows.set(rows as i64);
        self.0.spool_bytes.set(bytes as i64);
    }
    /// Counts a quarantined spool file.
    pub fn spool_quarantined(&self) {
        self.0.spool_quarantined.inc();
    }
    /// Counts a spool write error of a kind (`disk_full`, `io`).
    pub fn spool_error(&self, kind: &str) {
        self.0.spool_errors.get_or_create(&l1("kind", kind)).inc();
    }
    /// Counts a closing of the send gate.
    pub fn kafka_gated(&self) {
        self.0.kafka_gated.inc();
    }
    /// Bytes of the spool's reserve file held.
    pub fn spool_reserve(&self, bytes: u64) {
        self.0.spool_reserve.set(bytes as i64);
    }
    /// Whether inputs are held back.
    pub fn spool_blocked(&self, blocked: bool) {
        self.0.spool_blocked.set(blocked as i64);
    }
    /// Counts events drained from the spool.
    pub fn drained(&self, n: u64) {
        self.0.drained.inc_by(n);
    }
    /// Records a delivery latency.
    pub fn kafka_latency(&self, secs: f64) {
        self.0.kafka_latency.observe(secs);
    }
    /// Counts a Kafka error of a kind.
    pub fn kafka_error(&self, kind: &str) {
        self.0.kafka_errors.get_or_create(&l1("kind", kind)).inc();
    }
    /// Sets the router state gauges.
    pub fn router_state(&self, kafka_up: bool, spooling: bool, inflight: usize) {
        self.0.kafka_up.set(kafka_up as i64);
        self.0.spooling.set(spooling as i64);
        self.0.inflight.set(inflight as i64);
    }
    /// Marks the router thread alive or gone.
    pub fn router_alive(&self, alive: bool) {
        self.0.router_alive.store(alive, Ordering::Relaxed);
    }

    /// A snapshot of the totals, for reconciliation (demo, tests).
    pub fn totals(&self) -> Totals {
        Totals {
            spool_rows: self.0.spool_rows.get() as u64,
            spool_bytes: self.0.spool_bytes.get() as u64,
            drained: self.0.drained.get(),
            kafka_up: self.0.kafka_up.get() == 1,
            spooling: self.0.spooling.get() == 1,
            inflight: self.0.inflight.get() as u64,
        }
    }

    /// The sum of every series of the counter `name` (e.g.
    /// `gateway_events_dropped_total`), over all its labels, as exposed on `/metrics`.
    pub fn sum(&self, name: &str) -> f64 {
        self.render()
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Drops of one input for one reason.
    pub fn dropped_count(&self, input: &str, reason: &str) -> u64 {
        self.0
            .dropped
            .get_or_create(&[("input", input.to_string()), ("reason", reason.to_string())])
            .get()
    }

    fn health(&self) -> (bool, String) {
        let alive = self.0.router_alive.load(Ordering::Relaxed);
        let t = self.totals();
        let body = format!(
            "{{\"status\":\"{}\",\"kafka_up\":{},\"spooling\":{},\"spool_rows\":{},\"spool_bytes\":{},\"blocked\":{}}}\n",
            if alive { "ok" } else { "down" },
            t.kafka_up,
            t.spooling,
            t.spool_rows,
            t.spool_bytes,
            self.0.spool_blocked.get() == 1
        );
        (alive, body)
    }
}

/// Snapshot of gateway-wide gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Events in the spool.
    pub spool_rows: u64,
    /// Bytes in the spool.
    pub spool_bytes: u64,
    /// Events drained so far.
    pub drained: u64,
    /// Kafka confirming deliveries.
    pub kafka_up: bool,
    /// New events going to the spool.
    pub spooling: bool,
    /// Records in the producer.
    pub inflight: u64,
}

/// One input's counters.
#[derive(Clone)]
pub struct InputMetrics {
    /// The input name.
    pub name: String,
    /// Received events.
    pub received: Counter,
    /// Events made by stages from this input's events.
    pub generated: Counter,
    /// Delivered events.
    pub delivered: Counter,
    /// Spooled events.
    pub spooled: Counter,
    /// Dead letters sent.
    pub dead_letters: Counter,
    /// Upstream acks sent.
    pub acks: Counter,
    /// Connected (0/1).
    pub connected: Gauge,
    /// Nothing heard for the silence timeout (0/1).
    pub silent: Gauge,
    /// Reconnect attempts.
    pub reconnects: Counter,
    /// Readings a device gave up before the gateway had them (serial firmware-bridge:
    /// its buffer overflowed while unacknowledged). Never received, so not in `received`.
    pub device_lost: Counter,
    metrics: Metrics,
}

impl InputMetrics {
    /// Counts a drop.
    pub fn dropped(&self, reason: &str, n: u64) {
        self.metrics.dropped(&self.name, reason, n);
    }

    /// Counts `n` messages that came in as the input stopped, already acknowledged
    /// upstream (QoS 0, `on_receive`), and were not taken: received and dropped as
    /// `input_stopped`.
    pub fn stopped_unseen(&self, n: u64) {
        self.received.inc_by(n);
        self.dropped("input_stopped", n);
    }

    /// Counts values left out of an event that still goes on.
    pub fn values_skipped(&self, reason: &str, n: u64) {
        self.metrics
            .0
            .values_skipped
            .get_or_create(&[("input", self.name.clone()), ("reason", reason.to_string())])
            .inc_by(n);
    }
}

/// Scrapes served at once; a connection past them waits for one to end.
const MAX_SCRAPES: usize = 8;

/// How long one scrape may take, from accept to the last byte written.
const SCRAPE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `/metrics` and `/health` until the task is dropped: at most [`MAX_SCRAPES`]
/// connections at once, each for at most [`SCRAPE_LIMIT`].
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    let scrapes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let mut accept_errors: u64 = 0;
    loop {
        let Ok(permit) = scrapes.clone().acquire_owned().await else {
            return;
        };
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors, say: retrying at once would spin a core.
                if accept_errors % 100 == 0 {
                    tracing::warn!(error = %e, "metrics: cannot accept a connection");
                }
                accept_errors += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(SCRAPE_LIMIT, answer(&mut sock, &metrics)).await;
        });
    }
}

/// Reads one request's head from `sock` and writes the response.
async fn answer(sock: &mut tokio::net::TcpStream, metrics: &Metrics) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/health" => {
            let (ok, body) = metrics.health();
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "application/json",
                body,
            )
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics or /health\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::DROP_REASONS;
    use std::path::Path;

    /// Every reason literal in the gateway's sources, at the places that name one: the
    /// drop counters, the payload decoders' `bad(..)`, the stages' `Drop(..)` and
    /// `reason: ..` fields.
    fn reasons_in(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                reasons_in(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("metrics.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for marker in ["dropped(", "bad(", "Drop(", "reason: "] {
                for (at, _) in text.match_indices(marker) {
                    let rest = &text[at + marker.len()..];
                    let call = &rest[..rest.find([')', ';', '\n']).unwrap_or(rest.len())];
                    let Some(open) = call.find('"') else { continue };
                    if marker == "reason: " && open != 0 {
                        continue;
                    }
                    let lit = &call[open + 1..];
                    let Some(close) = lit.find('"') else { continue };
                    out.push((lit[..close].to_string(), path.display().to_string()));
                }
            }
        }
    }

    #[test]
    fn every_drop_reason_in_the_code_is_listed() {
        let mut found = Vec::new();
        reasons_in(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.len() > 40, "the scan found too little: {found:?}");
        let missing: Vec<_> = found
            .iter()
            // `run_one`'s "the chain made nothing" is not a counted drop.
            .filter(|(r, _)| r != "nothing" && !DROP_REASONS.contains(&r.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "drop reasons missing from DROP_REASONS (and the demo's reconcile): {missing:?}"
        );
    }
}
