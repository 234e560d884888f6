//! The gateway's configuration model: what the user writes (TOML), validated into values
//! that are ready to run.
//!
//! Layout:
//! - [`Config`] is the whole file. It has two parts that change in different ways:
//!   - the **local bootstrap** ([`Config::gateway`], [`Config::spool`],
//!     [`Config::telemetry`]): identity, state directory, spool and telemetry. It only
//!     changes on the device itself.
//!   - the **pipeline** ([`Pipeline`]: `inputs`, `stages`, `output`): replaced at run
//!     time by a SIGHUP reload (and, later, by remote configuration). Rebuilding it never
//!     touches the spool.
//! - [`load`] / [`parse`] read and validate; every error names the file, line and column
//!   (syntax and type errors) or the field path (semantic errors) and what to do.
//! - [`DEFAULT_CONFIG`] is the commented default that `gateway print-config` prints; a test
//!   checks that it parses and validates.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod duration;
pub mod remote;
mod stages;
mod template;

pub use stages::*;
pub use template::{Captures, TopicTemplate, TopicTemplateError};

/// The commented default configuration printed by `gateway print-config`.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Local bootstrap: identity and state directory of this gateway.
    pub gateway: Bootstrap,
    /// Local bootstrap: the SQLite spool that holds events while Kafka is away.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Local bootstrap: logs, metrics and health endpoint.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Local bootstrap: remote configuration (unset: the pipeline is only local).
    pub control: Option<Control>,
    /// Pipeline: the inputs events come from.
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// Pipeline: the stages every event passes through, in order.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Pipeline: where events go.
    pub output: Output,
}

/// The part of the configuration that can be replaced at run time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    /// The inputs events come from.
    pub inputs: Vec<Input>,
    /// The stages every event passes through, in order.
    pub stages: Vec<Stage>,
    /// Where events go.
    pub output: Output,
}

impl Config {
    /// The replaceable part of this configuration.
    pub fn pipeline(&self) -> Pipeline {
        Pipeline {
            inputs: self.inputs.clone(),
            stages: self.stages.clone(),
            output: self.output.clone(),
        }
    }

    /// Where the spool database lives: `spool.path`, or `spool.sqlite` in the state
    /// directory.
    pub fn spool_path(&self) -> PathBuf {
        self.spool
            .path
            .clone()
            .unwrap_or_else(|| self.gateway.state_dir.join("spool.sqlite"))
    }
}

/// Identity and local state of this gateway. Never replaced remotely.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// This gateway's id: sent to Kafka as the `gateway-id` header and used in MQTT client
    /// ids. Letters, digits, `-`, `_` and `.` only.
    pub id: String,
    /// Directory for the spool and other state. Created if missing.
    pub state_dir: PathBuf,
    /// Groups this gateway belongs to: it also takes remote configs published for them
    /// (its own config wins over a group's).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The control plane: where remote configs come from (an MQTT broker, possibly not the
/// data broker), and the keys that may sign them. Local bootstrap: never replaced
/// remotely.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Broker host.
    pub host: String,
    /// Broker port. Default 1883 (8883 with TLS).
    pub port: Option<u16>,
    /// Topic prefix: configs on `<prefix>/<gateway id>/config` and
    /// `<prefix>/groups/<group>/config`, reports on `<prefix>/<gateway id>/config/status`
    /// and `<prefix>/<gateway id>/status`. Default `edge-gateway`.
    #[serde(default = "default_control_prefix")]
    pub prefix: String,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password, from a file or the environment.
    pub password: Option<Secret>,
    /// TLS to the broker.
    pub tls: Option<TlsConfig>,
    /// Public keys that may sign envelopes (rotated by signed `keys` envelopes).
    #[serde(default)]
    pub trusted_keys: Vec<remote::TrustedKey>,
    /// How long a new pipeline must stay healthy before it is kept; an unhealthy one is
    /// rolled back to the last known good. Default 60 s.
    #[serde(default = "default_health_window", with = "duration")]
    pub health_window: Duration,
    /// How often the status message goes out. Default 30 s.
    #[serde(default = "default_status_interval", with = "duration")]
    pub status_interval: Duration,
}

fn default_control_prefix() -> String {
    "edge-gateway".into()
}
fn default_health_window() -> Duration {
    Duration::from_secs(60)
}
fn default_status_interval() -> Duration {
    Duration::from_secs(30)
}

/// Durability of spool commits (SQLite `PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync on every commit: a committed event survives power loss. The default.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a crash of the process, not a power cut.
    Normal,
    /// No fsync: for tests and RAM disks only.
    Off,
}

/// What the spool does when its byte budget is used up.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Stop taking new events (and so stop acknowledging them upstream): backpressure.
    /// Nothing is dropped. The default.
    #[default]
    Block,
    /// Delete the oldest spooled events to make room; every one is counted as dropped
    /// (`reason="spool_overflow"`).
    DropOldest,
}

/// The smallest spool reserve that is of use (`spool.reserve_bytes`, also its default):
/// SQLite's checkpoint may have to grow the database file by up to the WAL's
/// automatic-checkpoint size (1000 pages, about 4 MiB) plus one transaction, while
/// checkpoints complete (a long-running reader can hold them back and let the WAL grow).
pub const MIN_RESERVE_BYTES: u64 = 8 * 1024 * 1024;

/// The SQLite spool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Path of the database file. Default: `<gateway.state_dir>/spool.sqlite`.
    pub path: Option<PathBuf>,
    /// Byte budget for spooled event data (payload bytes, not counting SQLite overhead).
    pub max_bytes: u64,
    /// What happens when `max_bytes` is reached: `block` or `drop_oldest`.
    pub overflow: OverflowPolicy,
    /// `full` (default: survives power loss), `normal` or `off`.
    pub synchronous: Synchronous,
    /// Group commit: commit after this many rows...
    pub commit_rows: usize,
    /// ...or after this long, whichever comes first.
    #[serde(with = "duration")]
    pub commit_interval: Duration,
    /// Rows read per drain batch when Kafka is back.
    pub drain_batch: usize,
    /// Size of the reserve file kept next to the spool (`<path>.reserve`), given up when
    /// the disk fills: without it, a spool that filled its own disk could not write even
    /// the deletes that drain it once Kafka is back. Taken again when the file system
    /// has room for it twice. 0: no reserve; otherwise at least 8 MiB (8388608), what a
    /// checkpoint and the first deletes may need.
    pub reserve_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: None,
            max_bytes: 256 * 1024 * 1024,
            overflow: OverflowPolicy::Block,
            synchronous: Synchronous::Full,
            commit_rows: 1000,
            commit_interval: Duration::from_millis(50),
            drain_batch: 1000,
            reserve_bytes: MIN_RESERVE_BYTES,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines. The default.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Logs, metrics and health.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `gateway=debug,rdkafka=warn`. `RUST_LOG` overrides.
    pub log_level: String,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/health`.
    /// Unset: no endpoint.
    pub listen: Option<String>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            log_format: LogFormat::Human,
            log_level: "info".into(),
            listen: None,
        }
    }
}

/// One input.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// An MQTT subscription.
    Mqtt(MqttInput),
    /// A serial port.
    Serial(SerialInput),
}

impl Input {
    /// The input's name (unique in a config).
    pub fn name(&self) -> &str {
        match self {
            Input::Mqtt(m) => &m.name,
            Input::Serial(s) => &s.name,
        }
    }

    /// The input's own stages.
    pub fn stages(&self) -> &[Stage] {
        match self {
            Input::Mqtt(m) => &m.stages,
            Input::Serial(s) => &s.stages,
        }
    }
}

/// How bytes on a serial line become events.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SerialFraming {
    /// Our firmware's protocol (crate `firmware-bridge`): COBS frames with a CRC, readings
    /// acknowledged back to the device once safe. The default.
    #[default]
    FirmwareBridge,
    /// One JSON object per line, mapped by `json` like an MQTT payload.
    JsonLines,
    /// NMEA 0183 from a GPS receiver: GGA, RMC and GLL fixes (checksums verified) become
    /// location events of `device`.
    Nmea,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit. The default.
    #[default]
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

/// Serial flow control.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    /// None. The default.
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// A serial input: a UART or USB serial adapter with one device on it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialInput {
    /// Unique name: the events' `source`.
    pub name: String,
    /// Stages for this input's events only, run before the global `stages`.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// The port. Prefer `/dev/serial/by-id/...`: it names the same adapter after a replug.
    pub path: PathBuf,
    /// Bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits: 5, 6, 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// Parity.
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Flow control.
    #[serde(default)]
    pub flow_control: FlowControl,
    /// What the bytes are.
    #[serde(default)]
    pub framing: SerialFraming,
    /// When a reading is acknowledged to the device (`firmware-bridge` framing).
    #[serde(default)]
    pub ack_policy: AckPolicy,
    /// Device id for lines that carry none (`json-lines`), and of the receiver (`nmea`,
    /// required there).
    pub device: Option<String>,
    /// `firmware-bridge` channel id (0 to 65535) to reading name, e.g.
    /// `{ 1 = "temperature" }`; unnamed channels are called `ch<id>`.
    #[serde(default)]
    pub channels: std::collections::BTreeMap<String, String>,
    /// Field mapping for `json-lines`.
    #[serde(default)]
    pub json: JsonMapping,
    /// Longest line (`json-lines`), in bytes; longer ones are dropped as `too_large`.
    #[serde(default = "default_max_payload")]
    pub max_line: usize,
    /// No byte for this long raises the silence alarm (log and metric).
    #[serde(default = "default_silence_timeout", with = "duration")]
    pub silence_timeout: Duration,
    /// How often the gateway's clock is sent to a `firmware-bridge` device (also after
    /// every `Hello`).
    #[serde(default = "default_time_sync_interval", with = "duration")]
    pub time_sync_interval: Duration,
    /// Delay between attempts to open the port (after an unplug, say).
    #[serde(default)]
    pub reconnect: Backoff,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_silence_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_time_sync_interval() -> Duration {
    Duration::from_secs(600)
}

/// When an input acknowledges an event upstream.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// As soon as it is received: fastest; an event can be lost if the gateway dies.
    OnReceive,
    /// Once it is safe: committed to the spool, or confirmed by Kafka. The default.
    #[default]
    OnSpool,
    /// Only once Kafka confirmed it, even when it went through the spool.
    OnDelivery,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MqttVersion {
    /// MQTT 3.1.1. The default.
    #[default]
    V311,
    /// MQTT 5 (announces `receive_maximum`, keeps the session for `session_expiry`).
    V5,
}

/// Payload format of an MQTT input.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object, mapped by `[inputs.json]`. The default.
    #[default]
    Json,
    /// SenML (RFC 8428) JSON: an array of records.
    Senml,
    /// A bare number; the reading name comes from the `{metric}` topic field.
    Number,
}

/// How to read an epoch or text timestamp.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Numbers by magnitude (s, ms, us or ns), strings as RFC 3339. The default.
    #[default]
    Auto,
    /// Epoch seconds (may have a fraction).
    S,
    /// Epoch milliseconds.
    Ms,
    /// Epoch microseconds.
    Us,
    /// Epoch nanoseconds.
    Ns,
    /// RFC 3339 text.
    Rfc3339,
}

/// Which fields of a JSON payload carry what. Field names may be dotted paths
/// (`"gps.lat"`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JsonMapping {
    /// Field with the device id. Used when the topic has no `{device}` field.
    pub device: String,
    /// Field with the event time. Missing: gateway time, clock quality `gateway`.
    pub time: String,
    /// How to read `time`.
    pub time_unit: TimeUnit,
    /// Field with a per-device sequence number; when present it makes the event id.
    pub seq: String,
    /// Latitude field (degrees).
    pub lat: String,
    /// Longitude field (degrees).
    pub lon: String,
    /// Altitude field (metres).
    pub alt: String,
    /// Horizontal accuracy field (metres).
    pub accuracy: String,
    /// Reading fields. Empty: every other top-level number (and string, as a text reading).
    pub readings: Vec<String>,
    /// Fields copied into tags.
    pub tags: Vec<String>,
}

impl Default for JsonMapping {
    fn default() -> Self {
        JsonMapping {
            device: "device".into(),
            time: "ts".into(),
            time_unit: TimeUnit::Auto,
            seq: "seq".into(),
            lat: "lat".into(),
            lon: "lon".into(),
            alt: "alt".into(),
            accuracy: "acc".into(),
            readings: Vec::new(),
            tags: Vec::new(),
        }
    }
}

/// TLS settings for a connection.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) to trust.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// A secret: read from a file or from an environment variable, never written in the
/// config itself and never logged.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// Read the secret from this file (trailing newline removed).
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    pub env: Option<String>,
}

impl Secret {
    /// Reads the secret's value.
    pub fn read(&self) -> Result<String, String> {
        if let Some(var) = &self.env {
            if let Ok(v) = std::env::var(var) {
                return Ok(v);
            }
            if self.file.is_none() {
                return Err(format!("environment variable {var} is not set"));
            }
        }
        match &self.file {
            Some(f) => std::fs::read_to_string(f)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("cannot read secret file {}: {e}", f.display())),
            None => Err("a secret needs `file` or `env`".into()),
        }
    }
}

/// Reconnect backoff: doubles from `min` up to `max`, with random jitter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// First delay.
    #[serde(with = "duration")]
    pub min: Duration,
    /// Longest delay.
    #[serde(with = "duration")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// An MQTT input.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttInput {
    /// Name of the input: the `source` of its events and the `input` metrics label.
    pub name: String,
    /// Stages for this input's events only, run before the global `stages`.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Broker host.
    pub host: String,
    /// Broker port. Default 1883 (8883 with TLS).
    pub port: Option<u16>,
    /// `v311` (default) or `v5`.
    #[serde(default)]
    pub protocol: MqttVersion,
    /// Client id. Default `<gateway.id>-<name>`: stable, so a persistent session survives
    /// restarts.
    pub client_id: Option<String>,
    /// Start a clean session each connect. Default `false`: the broker keeps QoS 1
    /// messages for the gateway while it is away.
    #[serde(default)]
    pub clean_session: bool,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive", with = "duration")]
    pub keep_alive: Duration,
    /// User name.
    pub username: Option<String>,
    /// Password (from a file or the environment).
    pub password: Option<Secret>,
    /// TLS (rustls). Unset: plain TCP.
    pub tls: Option<TlsConfig>,
    /// Subscription QoS: 0 or 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// When a message is acknowledged to the broker: `on_receive`, `on_spool` (default)
    /// or `on_delivery`.
    #[serde(default)]
    pub ack_policy: AckPolicy,
    /// Topic templates: MQTT filters where `{name}` matches one level and captures it
    /// (`{device}` is the device id, `{metric}` the reading name of a bare number, others
    /// become tags). `+` and a final `#` work as usual.
    pub topics: Vec<String>,
    /// Payload format: `json` (default), `senml` or `number`.
    #[serde(default)]
    pub format: PayloadFormat,
    /// Field mapping for `json` payloads.
    #[serde(default)]
    pub json: JsonMapping,
    /// Largest accepted payload in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: Backoff,
    /// MQTT 5 only: the receive maximum the gateway announces (how many QoS 1 messages
    /// the broker may have unacknowledged at once).
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// MQTT 5 only: how long the broker keeps the session after a disconnect (with
    /// `clean_session = false`).
    #[serde(default = "default_session_expiry", with = "duration")]
    pub session_expiry: Duration,
}

fn default_receive_maximum() -> u16 {
    1000
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_qos() -> u8 {
    1
}
/// The largest `max_payload` (and `max_line`) accepted: a payload is held in memory a
/// few times over on its way (the packet, the decoded event, a dead letter), and a JSON
/// payload of many tiny objects parses into about ten times its size for a moment.
const MAX_PAYLOAD_LIMIT: usize = 4 << 20;

fn default_max_payload() -> usize {
    256 * 1024
}

/// Where events go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// The Kafka output.
    pub kafka: KafkaOutput,
}

/// Kafka record value encoding.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// JSON, schema `edge-gateway.event.v1` (README). The default.
    #[default]
    Json,
    /// postcard bytes of the event model.
    Postcard,
}

/// Kafka compression codec.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// snappy.
    Snappy,
    /// lz4. The default: cheap on small CPUs.
    #[default]
    Lz4,
    /// zstd: best ratio.
    Zstd,
}

impl Compression {
    /// librdkafka's name for the codec.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Kafka security settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password (from a file or the environment).
    pub password: Option<Secret>,
    /// CA certificate file for `ssl` / `sasl_ssl`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// Client key for mutual TLS.
    pub client_key_file: Option<PathBuf>,
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        KafkaSecurity {
            protocol: default_protocol(),
            sasl_mechanism: None,
            username: None,
            password: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

fn default_protocol() -> String {
    "plaintext".into()
}

/// The Kafka output.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaOutput {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic template. Fields: `{source}`, `{device}`, and any tag as `{tag.NAME}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Record key template (default `{device}`, so a device's events stay in order).
    #[serde(default = "default_key")]
    pub key: String,
    /// `json` (default) or `postcard`.
    #[serde(default)]
    pub value_format: ValueFormat,
    /// `none`, `gzip`, `snappy`, `lz4` (default) or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// How long to wait to fill a batch (`linger.ms`).
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// Largest batch in bytes (`batch.size`).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u64,
    /// Producer queue bound in messages (`queue.buffering.max.messages`).
    #[serde(default = "default_queue_messages")]
    pub queue_max_messages: u64,
    /// Producer queue bound in KiB (`queue.buffering.max.kbytes`). librdkafka's default
    /// is 1 GiB, far too much for a small device.
    #[serde(default = "default_queue_kbytes")]
    pub queue_max_kbytes: u64,
    /// A record not confirmed within this time fails (`message.timeout.ms`) and goes
    /// back to the spool.
    #[serde(default = "default_message_timeout", with = "duration")]
    pub message_timeout: Duration,
    /// Switch to spooling when the oldest unconfirmed record is older than this.
    #[serde(default = "default_spool_after", with = "duration")]
    pub spool_after: Duration,
    /// How long Kafka may refuse one topic's records (the topic does not exist, with
    /// auto-creation off, or the gateway may not write to it) before they are set aside
    /// (dropped as `kafka_rejected`, kept in the spool's quarantine table). Until then
    /// they wait in the spool, one retried every second, while every other topic's
    /// records flow; a topic deleted and created again, or an ACL fixed, loses nothing.
    /// A record the topic takes starts it over.
    #[serde(default = "default_topic_refused_after", with = "duration")]
    pub topic_refused_after: Duration,
    /// Topic for payloads that could not be decoded (raw bytes, reason in headers).
    /// Unset: they are only counted.
    pub dead_letter_topic: Option<String>,
    /// TLS / SASL.
    #[serde(default)]
    pub security: KafkaSecurity,
    /// Other librdkafka producer properties, passed through as they are.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_topic() -> String {
    "telemetry.{source}".into()
}
fn default_key() -> String {
    "{device}".into()
}

impl KafkaOutput {
    /// The producer is idempotent: `options` do not turn `enable.idempotence` off
    /// (librdkafka reads `false`, `f` and `0`, in any case, as false).
    pub fn idempotent(&self) -> bool {
        !self
            .options
            .get("enable.idempotence")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "f" | "0"))
    }
}

fn default_linger() -> Duration {
    Duration::from_millis(20)
}
fn default_batch_bytes() -> u64 {
    512 * 1024
}
fn default_queue_messages() -> u64 {
    10_000
}
fn default_queue_kbytes() -> u64 {
    8 * 1024
}
fn default_message_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_spool_after() -> Duration {
    Duration::from_secs(5)
}
fn default_topic_refused_after() -> Duration {
    Duration::from_secs(5 * 60)
}

/// A configuration error: where it is and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The file, if the config came from one.
    pub file: Option<PathBuf>,
    /// 1-based line and column, for syntax and type errors.
    pub position: Option<(usize, usize)>,
    /// The field path (`inputs[0].qos`), for semantic errors.
    pub path: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some((l, c)) = self.position {
                write!(f, ":{l}:{c}")?;
            }
            write!(f, ": ")?;
        } else if let Some((l, c)) = self.position {
            write!(f, "line {l}, column {c}: ")?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// All the errors found in one config (validation reports every field error at once).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: Some(path.to_path_buf()),
            position: None,
            path: None,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    parse(&text, Some(path))
}

/// Parses and validates config text. `file` is only used in error messages.
pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigErrors> {
    let config: Config = toml::from_str(text)
        .map_err(|e| input_error(text, file).unwrap_or_else(|| syntax_error(&e, text, file)))?;
    checked(config, file, Some(text))
}

/// serde reads an `[[inputs]]` or `[[stages]]` entry through its `type` tag, and so loses
/// the position and the name of a field of the wrong type (`qos = "1"` was reported at
/// the entry's header as `invalid type: string "1", expected u8`). This reads each entry
/// again as its own type to find them; `None` when that finds nothing. An input's own
/// stages are read before the input, so the error names the stage's field.
pub(crate) fn input_error(text: &str, file: Option<&Path>) -> Option<ConfigErrors> {
    let doc: toml::Table = toml::from_str(text).ok()?;
    let entries = |key: &str| -> Vec<toml::Value> {
        doc.get(key)
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut found = None;
    'search: for (i, entry) in entries("inputs").iter().enumerate() {
        let stages = entry
            .get("stages")
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (j, stage) in stages.iter().enumerate() {
            found = entry_error(
                stage,
                &format!("inputs[{i}].stages[{j}]"),
                stage_as_its_type,
            );
            if found.is_some() {
                break 'search;
            }
        }
        found = entry_error(entry, &format!("inputs[{i}]"), |kind, body| match kind {
            "mqtt" => toml::from_str::<MqttInput>(body).err(),
            "serial" => toml::from_str::<SerialInput>(body).err(),
            _ => None,
        });
        if found.is_some() {
            break;
        }
    }
    if found.is_none() {
        for (j, stage) in entries("stages").iter().enumerate() {
            found = entry_error(stage, &format!("stages[{j}]"), stage_as_its_type);
            if found.is_some() {
                break;
            }
        }
    }
    let (path, message) = found?;
    Some(ConfigErrors(vec![ConfigError {
        file: file.map(Path::to_path_buf),
        position: locate(text, &path).map(|o| line_col(text, o)),
        path: Some(path),
        message,
    }]))
}

/// A stage's body (its table without `type`) read as the type its `type` names; the
/// stages written as struct variants of [`Stage`] (`tags`, `range`, `latest_location`)
/// have no type of their own and are not read.
fn stage_as_its_type(kind: &str, body: &str) -> Option<toml::de::Error> {
    match kind {
        "keep" | "drop" => toml::from_str::<MatchSpec>(body).err(),
        "filter" => toml::from_str::<FilterStage>(body).err(),
        "validate" => toml::from_str::<ValidateStage>(body).err(),
        "dedup" => toml::from_str::<DedupStage>(body).err(),
        "throttle" => toml::from_str::<ThrottleStage>(body).err(),
        "deadband" => toml::from_str::<DeadbandStage>(body).err(),
        "window" => toml::from_str::<WindowStage>(body).err(),
        "geofence" => toml::from_str::<GeofenceStage>(body).err(),
        "gps_sanity" => toml::from_str::<GpsSanityStage>(body).err(),
        "enrich" => toml::from_str::<EnrichStage>(body).err(),
        "calibrate" => toml::from_str::<CalibrateStage>(body).err(),
        "convert" => toml::from_str::<ConvertStage>(body).err(),
        "route" => toml::from_str::<RouteStage>(body).err(),
        "rename" => toml::from_str::<RenameStage>(body).err(),
        "remove" => toml::from_str::<RemoveStage>(body).err(),
        _ => None,
    }
}

/// The error of one `[[inputs]]` or `[[stages]]` entry read as its own type (`read` gets
/// the `type` and the rest of the entry as TOML): the field's path under `prefix` and the
/// message.
fn entry_error(
    entry: &toml::Value,
    prefix: &str,
    read: impl Fn(&str, &str) -> Option<toml::de::Error>,
) -> Option<(String, String)> {
    let mut table = entry.as_table()?.clone();
    let kind = table.remove("type")?;
    let body = toml::to_string(&table).ok()?;
    let e = read(kind.as_str()?, &body)?;
    // The key on the line the error points at in the rewritten entry, under the last
    // `[table]` header before it. An error of the whole entry (a missing field) has no
    // span of its own: toml gives it the start of the document.
    let whole = e.message().starts_with("missing field");
    let field = e.span().filter(|s| s.start > 0 && !whole).and_then(|span| {
        let before = &body[..span.start.min(body.len())];
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let line = body[line_start..].lines().next()?;
        let key = line.split_once('=')?.0.trim().trim_matches('"');
        let above = &before[..line_start];
        let header = above
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'))
            .map(|h| {
                let name = h.trim_matches(['[', ']']);
                if h.starts_with("[[") {
                    // An array of tables: its entry is the count of its headers so far.
                    let k = above.lines().filter(|l| l.trim() == h).count() - 1;
                    format!("{name}[{k}]")
                } else {
                    name.to_string()
                }
            });
        Some(match header {
            Some(h) => format!("{h}.{key}"),
            None => key.to_string(),
        })
    });
    let path = match field {
        Some(f) => format!("{prefix}.{f}"),
        None => prefix.to_string(),
    };
    Some((path, e.message().trim_end().to_string()))
}

/// A TOML syntax or type error of `text`, with its line and column.
pub(crate) fn syntax_error(e: &toml::de::Error, text: &str, file: Option<&Path>) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.map(Path::to_path_buf),
        position: e.span().map(|s| line_col(text, s.start)),
        path: None,
        message: e.message().trim_end().to_string(),
    }])
}

/// `config` if it validates, else every error with its path (and, when `text` is given,
/// its line and column there).
pub(crate) fn checked(
    config: Config,
    file: Option<&Path>,
    text: Option<&str>,
) -> Result<Config, ConfigErrors> {
    let errors = validate(&config);
    if errors.is_empty() {
        return Ok(config);
    }
    Err(ConfigErrors(
        errors
            .into_iter()
            .map(|(path, message)| ConfigError {
                file: file.map(Path::to_path_buf),
                position: text.and_then(|t| locate(t, &path).map(|o| line_col(t, o))),
                path: Some(path),
                message,
            })
            .collect(),
    ))
}

/// The byte offset of a field path such as `inputs[0].topics[1]` in the text: of the
/// value itself, or of the deepest enclosing table or array written in the file (a field
/// left to its default has no place of its own).
fn locate(text: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut offset = None;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if let Some(v) = value.take() {
            table = match v.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        let found = table?
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v)?;
        offset = Some(found.span().start);
        let mut cur = found;
        for idx in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            let i: usize = idx.parse().ok()?;
            match cur.get_ref() {
                DeValue::Array(a) => match a.get(i) {
                    Some(v) => {
                        cur = v;
                        offset = Some(cur.span().start);
                    }
                    None => return offset,
                },
                _ => return offset,
            }
        }
        value = Some(cur);
    }
    offset
}

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |n| before.len() - n - 1)
        + 1;
    (line, col)
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `spec` without the spaces around its directives and their `=` (`info , librdkafka =
/// warn` reads as `info,librdkafka=warn`), which the log filter's parser would take for
/// part of a target's name.
pub fn tidy_log_filter(spec: &str) -> String {
    spec.split(',')
        .map(|d| match d.split_once('=') {
            Some((target, level)) => format!("{}={}", target.trim(), level.trim()),
            None => d.trim().to_string(),
        })
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `spec` is a log filter the gateway understands: comma-separated directives,
/// each a level or `target=level` (spaces around them are allowed, see
/// [`tidy_log_filter`]).
fn valid_log_filter(spec: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    !spec.trim().is_empty()
        && spec.split(',').all(|d| match d.split_once('=') {
            Some((target, l)) => !target.trim().is_empty() && level(l),
            None => level(d),
        })
}

fn validate_serial(s: &SerialInput, p: &str, err: &mut impl FnMut(String, &str)) {
    if s.path.as_os_str().is_empty() {
        err(format!("{p}.path"), "must not be empty");
    }
    if s.baud == 0 {
        err(format!("{p}.baud"), "must be above zero");
    }
    if !(5..=8).contains(&s.data_bits) {
        err(format!("{p}.data_bits"), "must be 5, 6, 7 or 8");
    }
    if !(1..=2).contains(&s.stop_bits) {
        err(format!("{p}.stop_bits"), "must be 1 or 2");
    }
    match &s.device {
        Some(d) if d.is_empty() => err(format!("{p}.device"), "must not be empty"),
        None if s.framing == SerialFraming::Nmea => err(
            format!("{p}.device"),
            "framing \"nmea\" needs the receiver's device id (NMEA sentences carry none)",
        ),
        _ => {}
    }
    if s.max_line == 0 || s.max_line > MAX_PAYLOAD_LIMIT {
        err(format!("{p}.max_line"), "from 1 byte to 4 MiB (4194304)");
    }
    for (id, name) in &s.channels {
        // Written as the gateway looks them up: `01` or `+1` would never match channel 1.
        if id.parse::<u16>().map(|n| n.to_string()).as_deref() != Ok(id.as_str()) {
            err(
                format!("{p}.channels"),
                &format!(
                    "channel id {id:?}: write it as a plain number from 0 to 65535 (like \"1\")"
                ),
            );
        }
        if name.is_empty() {
            err(format!("{p}.channels"), "a channel name must not be empty");
        }
    }
    if s.silence_timeout.is_zero() || s.time_sync_interval.is_zero() {
        err(
            format!("{p}.silence_timeout"),
            "silence_timeout and time_sync_interval must be above zero",
        );
    }
    if s.reconnect.min.is_zero() || s.reconnect.min > s.reconnect.max {
        err(
            format!("{p}.reconnect"),
            "min must be above zero and not above max",
        );
    }
}

/// Semantic checks; returns every (field path, message) found.
pub fn validate(c: &Config) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let mut err = |p: String, m: &str| errs.push((p, m.to_string()));
    if !valid_id(&c.gateway.id) {
        err(
            "gateway.id".into(),
            "must be non-empty and use only letters, digits, '-', '_' and '.'",
        );
    }
    if c.spool.max_bytes < 64 * 1024 {
        err("spool.max_bytes".into(), "must be at least 65536 bytes");
    }
    if c.spool.reserve_bytes != 0 && c.spool.reserve_bytes < MIN_RESERVE_BYTES {
        err(
            "spool.reserve_bytes".into(),
            "must be 0 (no reserve) or at least 8388608 bytes (8 MiB): a smaller reserve \
             cannot hold what SQLite needs to drain a spool that filled its disk",
        );
    }
    if c.spool.commit_rows == 0 {
        err("spool.commit_rows".into(), "must be at least 1");
    }
    if c.spool.drain_batch == 0 {
        err("spool.drain_batch".into(), "must be at least 1");
    }
    if !valid_log_filter(&c.telemetry.log_level) {
        err(
            "telemetry.log_level".into(),
            "must be a level (error, warn, info, debug, trace, off) or comma-separated \
             `target=level` directives, e.g. \"info,librdkafka=warn\"",
        );
    }
    // Two clients with one id on one broker take the connection from each other in turns.
    let mut client_ids = std::collections::BTreeMap::new();
    for (i, input) in c.inputs.iter().enumerate() {
        if let Input::Mqtt(m) = input {
            let id = m
                .client_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", c.gateway.id, m.name));
            let broker = (m.host.to_ascii_lowercase(), m.port);
            if let Some(first) = client_ids.insert((broker, id), i) {
                err(
                    format!("inputs[{i}].client_id"),
                    &format!("inputs[{first}] has the same client id on the same broker; each needs its own"),
                );
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, input) in c.inputs.iter().enumerate() {
        let p = format!("inputs[{i}]");
        if !valid_id(input.name()) {
            err(
                format!("{p}.name"),
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            );
        }
        if !names.insert(input.name().to_string()) {
            err(
                format!("{p}.name"),
                "another input has this name; names must be unique",
            );
        }
        let m = match input {
            Input::Mqtt(m) => m,
            Input::Serial(s) => {
                validate_serial(s, &p, &mut err);
                continue;
            }
        };
        if m.host.is_empty() {
            err(format!("{p}.host"), "must not be empty");
        }
        if m.qos > 1 {
            err(format!("{p}.qos"), "must be 0 or 1");
        }
        if m.topics.is_empty() {
            err(format!("{p}.topics"), "give at least one topic template");
        }
        for (j, t) in m.topics.iter().enumerate() {
            match TopicTemplate::parse(t) {
                Err(e) => err(format!("{p}.topics[{j}]"), &e.to_string()),
                Ok(tt) => {
                    if m.format == PayloadFormat::Number && !tt.captures().any(|c| c == "metric") {
                        err(
                            format!("{p}.topics[{j}]"),
                            "format \"number\" needs a {metric} field in the topic to name the reading",
                        );
                    }
                }
            }
        }
        check_credentials(&m.username, &m.password, &m.tls, &p, &mut err);
        if m.receive_maximum == 0 {
            err(format!("{p}.receive_maximum"), "must be at least 1");
        }
        // Sent in whole seconds as a u16; MQTT 5 brokers (and rumqttc) want at least 5 s.
        let ka = m.keep_alive;
        let ka_ok = match m.protocol {
            MqttVersion::V311 => ka.is_zero() || (1..=65_535).contains(&ka.as_secs()),
            MqttVersion::V5 => (5..=65_535).contains(&ka.as_secs()),
        };
        if !ka_ok || ka.subsec_nanos() != 0 {
            err(
                format!("{p}.keep_alive"),
                "whole seconds: 0 (off) or 1s to 65535s with MQTT 3.1.1, 5s to 65535s with MQTT 5",
            );
        }
        if m.max_payload == 0 || m.max_payload > MAX_PAYLOAD_LIMIT {
            err(format!("{p}.max_payload"), "from 1 byte to 4 MiB (4194304)");
        }
        if m.reconnect.min.is_zero() || m.reconnect.min > m.reconnect.max {
            err(
                format!("{p}.reconnect"),
                "min must be above zero and not above max",
            );
        }
    }
    if let Some(ctl) = &c.control {
        let topic_part = |t: &str| {
            !t.is_empty() && !t.contains(['+', '#']) && !t.starts_with('/') && !t.ends_with('/')
        };
        if ctl.host.trim().is_empty() {
            err("control.host".into(), "must not be empty");
        }
        check_credentials(&ctl.username, &ctl.password, &ctl.tls, "control", &mut err);
        if !topic_part(&ctl.prefix) {
            err(
                "control.prefix".into(),
                "a topic prefix without '+', '#' or a leading or trailing '/'",
            );
        }
        if ctl.status_interval.is_zero() || ctl.health_window.is_zero() {
            err(
                "control.status_interval".into(),
                "status_interval and health_window must be above zero",
            );
        }
        if ctl.trusted_keys.is_empty() {
            err(
                "control.trusted_keys".into(),
                "trust at least one key (gateway remote keygen prints one)",
            );
        }
        if let Err(e) = remote::verifying_keys(&ctl.trusted_keys) {
            err("control.trusted_keys".into(), &e);
        }
        for (i, g) in c.gateway.groups.iter().enumerate() {
            if !topic_part(g) || g.contains('/') {
                err(
                    format!("gateway.groups[{i}]"),
                    "a group name without '+', '#' or '/'",
                );
            }
        }
        let reserved = format!("{}-control", c.gateway.id);
        for (i, input) in c.inputs.iter().enumerate() {
            if let Input::Mqtt(m) = input {
                let id = m
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", c.gateway.id, m.name));
                if id == reserved {
                    err(
                        format!("inputs[{i}].client_id"),
                        "this MQTT client id is the control plane's; name the input otherwise",
                    );
                }
            }
        }
    }
    validate_stages(&c.stages, "stages", &mut err);
    for (i, input) in c.inputs.iter().enumerate() {
        validate_stages(input.stages(), &format!("inputs[{i}].stages"), &mut err);
    }
    let k = &c.output.kafka;
    if k.brokers.trim().is_empty() {
        err("output.kafka.brokers".into(), "must not be empty");
    }
    if let Err(e) = check_template(&k.topic, true) {
        err("output.kafka.topic".into(), &e);
    }
    if let Err(e) = check_template(&k.key, false) {
        err("output.kafka.key".into(), &e);
    }
    if let Some(t) = &k.dead_letter_topic {
        if let Err(e) = check_template(t, true).and_then(|()| {
            if t.contains('{') {
                Err("the dead-letter topic is a plain topic name, without fields".into())
            } else {
                Ok(())
            }
        }) {
            err("output.kafka.dead_letter_topic".into(), &e);
        }
    }
    for (key, value) in &k.options {
        if let Some(why) = refused_kafka_option(key, value) {
            err(format!("output.kafka.options.\"{key}\""), why);
        }
    }
    // Without idempotence librdkafka retries a failed request after the ones behind it
    // went: with more than one in flight per connection a device's events lose their
    // order. The producer then sends one at a time unless told otherwise; not more.
    if !k.idempotent() {
        for key in ["max.in.flight.requests.per.connection", "max.in.flight"] {
            if k.options.get(key).is_some_and(|v| v.trim() != "1") {
                err(
                    format!("output.kafka.options.\"{key}\""),
                    "must be 1 with enable.idempotence off (a retried request would land after the next one, and a device's events lose their order); leave it out, the gateway sets 1",
                );
            }
        }
    }
    if k.queue_max_messages == 0 || k.queue_max_kbytes == 0 {
        err(
            "output.kafka.queue_max_messages".into(),
            "queue bounds must be above zero",
        );
    }
    if k.message_timeout < Duration::from_secs(1) {
        err("output.kafka.message_timeout".into(), "must be at least 1s");
    }
    // librdkafka's own ranges, so that check-config says what the producer would refuse
    // at start.
    if k.message_timeout.as_millis() > i32::MAX as u128 {
        err(
            "output.kafka.message_timeout".into(),
            "must be at most 24 days",
        );
    }
    if k.linger > Duration::from_secs(900) {
        err("output.kafka.linger".into(), "must be at most 900s");
    } else if k.linger >= k.message_timeout {
        err(
            "output.kafka.linger".into(),
            "must be shorter than message_timeout (a record would time out while it lingers)",
        );
    }
    if k.batch_bytes == 0 || k.batch_bytes > i32::MAX as u64 {
        err(
            "output.kafka.batch_bytes".into(),
            "must be between 1 and 2147483647",
        );
    }
    if k.queue_max_messages > i32::MAX as u64 || k.queue_max_kbytes > i32::MAX as u64 {
        err(
            "output.kafka.queue_max_messages".into(),
            "queue bounds must be at most 2147483647",
        );
    }
    match k.security.protocol.as_str() {
        "plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl" => {}
        _ => err(
            "output.kafka.security.protocol".into(),
            "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
        ),
    }
    if k.security.protocol.starts_with("sasl") {
        match k.security.sasl_mechanism.as_deref() {
            Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
            _ => err(
                "output.kafka.security.sasl_mechanism".into(),
                "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
            ),
        }
        if k.security.username.is_none() || k.security.password.is_none() {
            err(
                "output.kafka.security".into(),
                "SASL needs username and password",
            );
        }
    }
    if let Some(s) = &k.security.password {
        if s.file.is_none() && s.env.is_none() {
            err(
                "output.kafka.security.password".into(),
                "give `file` or `env`",
            );
        }
    }
    if k.security.client_cert_file.is_some() != k.security.client_key_file.is_some() {
        err(
            "output.kafka.security".into(),
            "client_cert_file and client_key_file go together",
        );
    }
    errs
}

/// Checks an MQTT connection's user, password and TLS settings (`p` is its path).
fn check_credentials(
    username: &Option<String>,
    password: &Option<Secret>,
    tls: &Option<TlsConfig>,
    p: &str,
    err: &mut impl FnMut(String, &str),
) {
    if let Some(tls) = tls {
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            err(
                format!("{p}.tls"),
                "client_cert_file and client_key_file go together",
            );
        }
    }
    if let Some(s) = password {
        if s.file.is_none() && s.env.is_none() {
            err(format!("{p}.password"), "give `file` or `env`");
        }
        if username.is_none() {
            err(
                format!("{p}.password"),
                "a password goes with a username (MQTT sends no password without one)",
            );
        }
    }
}

/// Checks a topic or key template: its `{...}` fields are `source`, `device` or
/// `tag.NAME`; a topic's fixed parts are only what Kafka allows in a topic name.
fn check_template(t: &str, topic: bool) -> Result<(), String> {
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = t;
    let mut fixed = String::new();
    while let Some(open) = rest.find(['{', '}']) {
        fixed.push_str(&rest[..open]);
        let close = match rest[open..].find('}') {
            Some(c) if rest.as_bytes()[open] == b'{' => open + c,
            _ => return Err(format!("unbalanced braces in {t:?}")),
        };
        let field = &rest[open + 1..close];
        let known = matches!(field, "source" | "device")
            || field
                .strip_prefix("tag.")
                .is_some_and(|n| !n.is_empty() && !n.contains('{'));
        if !known {
            return Err(format!(
                "unknown field {{{field}}} in {t:?}: the fields are {{source}}, {{device}} and {{tag.NAME}}"
            ));
        }
        rest = &rest[close + 1..];
    }
    fixed.push_str(rest);
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic && !fixed.chars().all(legal) {
        return Err(format!(
            "{t:?}: a topic is letters, digits, '.', '_' and '-', with {{device}}, {{source}} or {{tag.NAME}} fields"
        ));
    }
    if topic && fixed.len() > 249 {
        return Err("Kafka topic names are at most 249 characters".into());
    }
    Ok(())
}

/// Why librdkafka property `key` = `value` may not be passed through `options`, if it
/// may not: it has a typed field (whose checks it would skip), or it would break what the
/// gateway promises (an event counts as delivered only once every in-sync replica has
/// it, every delivery is reported, a device's records share a partition, memory is
/// bounded).
pub fn refused_kafka_option(key: &str, value: &str) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    match key.trim() {
        "acks" | "request.required.acks" if v != "all" && v != "-1" => Some(
            "must stay `all`: a record counts as delivered only once every in-sync replica has it",
        ),
        "delivery.report.only.error" if v != "false" && v != "0" => Some(
            "must stay false: the gateway releases acks and deletes spool rows on delivery reports",
        ),
        "transactional.id" => Some("the gateway's producer is not transactional"),
        "partitioner" if v == "random" => {
            Some("`random` ignores the key, and a device's events would lose their order")
        }
        "queue.buffering.max.kbytes" => Some("set `queue_max_kbytes` instead"),
        "queue.buffering.max.messages" => Some("set `queue_max_messages` instead"),
        "message.timeout.ms" | "delivery.timeout.ms" => Some("set `message_timeout` instead"),
        "bootstrap.servers" | "metadata.broker.list" => Some("set `brokers` instead"),
        "compression.type" | "compression.codec" => Some("set `compression` instead"),
        "security.protocol" => Some("set `security.protocol` instead"),
        "sasl.mechanism" | "sasl.mechanisms" => Some("set `security.sasl_mechanism` instead"),
        "sasl.username" => Some("set `security.username` instead"),
        "sasl.password" => Some(
            "set `security.password` instead: it is read from a file or the environment, \
             not kept in the config in plain text",
        ),
        "ssl.ca.location" => Some("set `security.ca_file` instead"),
        "ssl.certificate.location" => Some("set `security.client_cert_file` instead"),
        "ssl.key.location" => Some("set `security.client_key_file` instead"),
        _ => None,
    }
}

/// Most windows a `window` stage keeps open per device (`allowed_lateness / size`).
pub const MAX_OPEN_WINDOWS: u32 = 1000;

/// Checks one list of stages; `p` is its path (`stages`, `inputs[0].stages`).
fn validate_stages(stages: &[Stage], p: &str, err: &mut impl FnMut(String, &str)) {
    for (i, s) in stages.iter().enumerate() {
        if let Stage::Range { min, max, .. } = s {
            if min.is_none() && max.is_none() {
                err(format!("{p}[{i}]"), "a range needs min, max or both");
            }
            // TOML has nan: a NaN bound would drop every event, or check nothing.
            if min.iter().chain(max.iter()).any(|b| b.is_nan()) {
                err(format!("{p}[{i}]"), "min and max must be numbers, not nan");
            }
            if let (Some(a), Some(b)) = (min, max) {
                if a > b {
                    err(format!("{p}[{i}]"), "min is above max");
                }
            }
        }
        if let Stage::LatestLocation {
            key,
            max_age,
            max_keys,
            ..
        } = s
        {
            let tag = key.strip_prefix("tag.");
            if key != "device" && tag.is_none_or(str::is_empty) {
                err(
                    format!("{p}[{i}].key"),
                    "must be \"device\" or \"tag.NAME\"",
                );
            }
            if max_age.is_zero() || *max_keys == 0 {
                err(
                    format!("{p}[{i}]"),
                    "max_age and max_keys must be above zero",
                );
            }
        }
        if let Stage::Keep(m) | Stage::Drop(m) = s {
            if m.devices.is_empty() && m.topics.is_empty() && m.sources.is_empty() {
                err(
                    format!("{p}[{i}]"),
                    "give at least one of devices, topics, sources",
                );
            }
        }
        let at = |field: &str| format!("{p}[{i}].{field}");
        match s {
            Stage::Filter(f) if f.expr.trim().is_empty() => err(at("expr"), "must not be empty"),
            Stage::Validate(v) => {
                for r in &v.required {
                    let ok = r == "location"
                        || r.strip_prefix("readings.").is_some_and(|n| !n.is_empty())
                        || r.strip_prefix("tags.").is_some_and(|n| !n.is_empty());
                    if !ok {
                        err(
                            at("required"),
                            "each entry is \"location\", \"readings.NAME\" or \"tags.NAME\"",
                        );
                    }
                }
                for (name, b) in &v.ranges {
                    if b.min.iter().chain(b.max.iter()).any(|x| x.is_nan()) {
                        err(
                            at(&format!("ranges.{name}")),
                            "min and max must be numbers, not nan",
                        );
                    }
                    if let (Some(lo), Some(hi)) = (b.min, b.max) {
                        if lo > hi {
                            err(at(&format!("ranges.{name}")), "min is above max");
                        }
                    }
                }
            }
            Stage::Dedup(d) if d.window.is_zero() || d.max_entries == 0 => {
                err(at("window"), "window and max_entries must be above zero")
            }
            Stage::Throttle(t) if t.interval.is_zero() || t.max_devices == 0 => err(
                at("interval"),
                "interval and max_devices must be above zero",
            ),
            Stage::Deadband(d)
                if d.threshold.is_nan() || d.threshold < 0.0 || d.max_devices == 0 =>
            {
                err(
                    at("threshold"),
                    "threshold must be zero or more and max_devices above zero",
                )
            }
            Stage::Window(w) => {
                if w.size.is_zero() || w.max_devices == 0 {
                    err(at("size"), "size and max_devices must be above zero");
                }
                if w.aggregates.is_empty() {
                    err(at("aggregates"), "name at least one aggregate");
                }
                if w.idle_timeout.is_some_and(|t| t.is_zero()) {
                    err(
                        at("idle_timeout"),
                        "must be above zero: every window would close at once and its events count as late",
                    );
                }
                // Each window a device may still take events for is kept open.
                let open = w.allowed_lateness.as_secs_f64() / w.size.as_secs_f64().max(1e-9);
                if !w.size.is_zero() && open > MAX_OPEN_WINDOWS as f64 {
                    err(
                        at("allowed_lateness"),
                        &format!("spans {open:.0} windows of size; at most {MAX_OPEN_WINDOWS} may be open per device (raise size or lower allowed_lateness)"),
                    );
                }
            }
            Stage::Geofence(g) => {
                if g.file.is_some() == g.geojson.is_some() {
                    err(at("file"), "give exactly one of file and geojson");
                }
                if g.max_devices == 0 {
                    err(at("max_devices"), "must be above zero");
                }
            }
            Stage::GpsSanity(g)
                if g.max_speed.is_nan()
                    || g.max_speed <= 0.0
                    || g.max_devices == 0
                    || g.max_accuracy.is_some_and(|a| a.is_nan() || a <= 0.0) =>
            {
                err(
                    at("max_speed"),
                    "max_speed, max_accuracy (when set) and max_devices must be above zero",
                )
            }
            Stage::Route(r) => {
                if r.rules.is_empty() {
                    err(at("rules"), "give at least one rule");
                }
                for (j, rule) in r.rules.iter().enumerate() {
                    let Some(topic) = &rule.topic else { continue };
                    if let Err(e) = check_template(topic, true) {
                        err(at(&format!("rules[{j}].topic")), &e);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c = parse(DEFAULT_CONFIG, None).expect("default config must validate");
        assert_eq!(c.gateway.id, "gw-0001");
        assert_eq!(c.spool.synchronous, Synchronous::Full);
        assert_eq!(c.inputs.len(), 1);
    }

    #[test]
    fn serial_inputs() {
        let text = r#"
[gateway]
id = "gw"
state_dir = "/tmp"
[[inputs]]
type = "serial"
name = "pump"
path = "/dev/serial/by-id/usb-pump"
channels = { 1 = "temperature", 2 = "pressure" }
[[inputs]]
type = "serial"
name = "lines"
path = "/dev/ttyUSB1"
framing = "json-lines"
baud = 9600
parity = "even"
device = "meter-1"
[output.kafka]
brokers = "k:9092"
"#;
        let c = parse(text, None).expect("valid");
        let Input::Serial(s) = &c.inputs[0] else {
            panic!("a serial input")
        };
        assert_eq!(s.framing, SerialFraming::FirmwareBridge);
        assert_eq!(s.baud, 115_200);
        assert_eq!(s.channels.get("2").map(String::as_str), Some("pressure"));
        assert_eq!(s.ack_policy, AckPolicy::OnSpool);
        let Input::Serial(s) = &c.inputs[1] else {
            panic!("a serial input")
        };
        assert_eq!(
            (s.framing, s.baud, s.parity),
            (SerialFraming::JsonLines, 9600, Parity::Even)
        );
        let bad = text.replace("baud = 9600", "baud = 9600\ndata_bits = 9");
        let e = parse(&bad, None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("inputs[1].data_bits"));
        assert_eq!(e.0[0].position, Some((16, 13)));
        for id in ["x", "\"02\"", "\"+2\""] {
            let bad = text.replace("2 = \"pressure\"", &format!("{id} = \"pressure\""));
            let e = parse(&bad, None).unwrap_err();
            assert_eq!(e.0[0].path.as_deref(), Some("inputs[0].channels"), "{id}");
        }
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let text = "[gateway]\nid = \"a\"\nstate_dir = \"/tmp\"\ncolour = 3\n[output.kafka]\nbrokers = \"x:1\"\n";
        let e = parse(text, Some(Path::new("gw.toml"))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("gw.toml:4:1: "), "{msg}");
        assert!(msg.contains("colour"), "{msg}");
    }

    /// The validation errors of `extra` added to a minimal MQTT config, as `path: message`.
    fn errors_with(input_extra: &str, kafka_extra: &str) -> Vec<String> {
        let text = format!(
            "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp\"\n[[inputs]]\ntype = \"mqtt\"\nname = \"m\"\nhost = \"h\"\ntopics = [\"s/{{device}}\"]\n{input_extra}\n[output.kafka]\nbrokers = \"k:9092\"\n{kafka_extra}\n"
        );
        match parse(&text, None) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.iter()
                    .map(|x| format!("{}: {}", x.path.as_deref().unwrap_or("?"), x.message))
                    .collect()
            }
        }
    }

    #[test]
    fn max_payload_is_bounded() {
        assert!(errors_with("max_payload = 4194304", "").is_empty());
        for bad in ["max_payload = 0", "max_payload = 4194305"] {
            let e = errors_with(bad, "");
            assert!(
                e.iter().any(|m| m.starts_with("inputs[0].max_payload")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn keep_alive_is_what_the_protocol_can_send() {
        for ok in [
            "keep_alive = \"0s\"",
            "keep_alive = \"1s\"",
            "keep_alive = \"65535s\"",
        ] {
            assert_eq!(errors_with(ok, ""), Vec::<String>::new(), "{ok}");
        }
        for bad in [
            "keep_alive = \"500ms\"",
            "keep_alive = \"1500ms\"",
            "keep_alive = \"65536s\"",
        ] {
            let e = errors_with(bad, "");
            assert!(
                e.len() == 1 && e[0].starts_with("inputs[0].keep_alive"),
                "{bad}: {e:?}"
            );
        }
        let v5 = |ka: &str| errors_with(&format!("protocol = \"v5\"\nkeep_alive = \"{ka}\""), "");
        assert_eq!(v5("5s"), Vec::<String>::new());
        assert_eq!(v5("4s").len(), 1);
        assert_eq!(
            v5("0s").len(),
            1,
            "MQTT 5 keep-alive cannot be off in rumqttc"
        );
    }

    #[test]
    fn topic_and_key_templates_are_checked() {
        for ok in [
            "topic = \"telemetry.{source}\"",
            "topic = \"t.{device}.{tag.site}\"\nkey = \"{tag.site}:{device}\"",
            "dead_letter_topic = \"dead-letters\"",
        ] {
            assert_eq!(errors_with("", ok), Vec::<String>::new(), "{ok}");
        }
        for (bad, path) in [
            ("topic = \"telemetry/{source}\"", "output.kafka.topic"),
            ("topic = \"telemetry.{sourec}\"", "output.kafka.topic"),
            ("topic = \"telemetry.{source\"", "output.kafka.topic"),
            ("topic = \"t}\"", "output.kafka.topic"),
            ("topic = \"{tag.}\"", "output.kafka.topic"),
            ("key = \"{id}\"", "output.kafka.key"),
            (
                "dead_letter_topic = \"dead letters\"",
                "output.kafka.dead_letter_topic",
            ),
            (
                "dead_letter_topic = \"dead.{source}\"",
                "output.kafka.dead_letter_topic",
            ),
        ] {
            let e = errors_with("", bad);
            assert!(e.len() == 1 && e[0].starts_with(path), "{bad}: {e:?}");
        }
        let long = format!("topic = \"{}\"", "t".repeat(250));
        assert_eq!(errors_with("", &long).len(), 1);
    }

    #[test]
    fn options_that_would_break_a_promise_are_refused() {
        let opts = |kv: &str| errors_with("", &format!("[output.kafka.options]\n{kv}"));
        for ok in [
            "\"acks\" = \"all\"",
            "\"enable.idempotence\" = \"false\"",
            "\"enable.idempotence\" = \"F\"\n\"max.in.flight\" = \"1\"",
            "\"max.in.flight.requests.per.connection\" = \"5\"",
            "\"linger.ms\" = \"50\"",
            "\"partitioner\" = \"murmur2_random\"",
            "\"reconnect.backoff.max.ms\" = \"500\"",
        ] {
            assert_eq!(opts(ok), Vec::<String>::new(), "{ok}");
        }
        for bad in [
            "\"acks\" = \"1\"",
            "\"request.required.acks\" = \"0\"",
            "\"delivery.report.only.error\" = \"true\"",
            "\"transactional.id\" = \"x\"",
            "\"partitioner\" = \"random\"",
            "\"enable.idempotence\" = \"0\"\n\"max.in.flight.requests.per.connection\" = \"5\"",
            "\"enable.idempotence\" = \"false\"\n\"max.in.flight\" = \"2\"",
            "\"queue.buffering.max.kbytes\" = \"1048576\"",
            "\"message.timeout.ms\" = \"0\"",
            "\"compression.codec\" = \"gzip\"",
            "\"bootstrap.servers\" = \"elsewhere:9092\"",
            "\"security.protocol\" = \"ssl\"",
            "\"sasl.password\" = \"hunter2\"",
            "\"ssl.ca.location\" = \"/etc/ca.pem\"",
        ] {
            let e = opts(bad);
            assert!(
                e.len() == 1 && e[0].starts_with("output.kafka.options."),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn producer_settings_librdkafka_would_refuse_are_errors() {
        for ok in [
            "linger = \"0s\"",
            "linger = \"900s\"\nmessage_timeout = \"1h\"",
            "batch_bytes = 1",
        ] {
            assert_eq!(errors_with("", ok), Vec::<String>::new(), "{ok}");
        }
        for bad in [
            "linger = \"901s\"\nmessage_timeout = \"1h\"",
            "linger = \"30s\"",
            "batch_bytes = 0",
            "batch_bytes = 2147483648",
            "queue_max_kbytes = 2147483648",
            "message_timeout = \"25d\"",
        ] {
            assert_eq!(errors_with("", bad).len(), 1, "{bad}");
        }
    }

    #[test]
    fn credentials_and_client_ids_are_checked() {
        let second = |host: &str, id: &str| {
            format!("client_id = \"x\"\n[[inputs]]\ntype = \"mqtt\"\nname = \"n\"\nhost = \"{host}\"\nclient_id = \"{id}\"\ntopics = [\"a/{{device}}\"]")
        };
        assert_eq!(errors_with(&second("H", "y"), ""), Vec::<String>::new());
        assert_eq!(errors_with(&second("other", "x"), ""), Vec::<String>::new());
        let e = errors_with(&second("H", "x"), "");
        assert!(
            e.len() == 1 && e[0].starts_with("inputs[1].client_id"),
            "{e:?}"
        );
        let e = errors_with("password = { env = \"P\" }", "");
        assert!(
            e.len() == 1 && e[0].contains("goes with a username"),
            "{e:?}"
        );
        let e = errors_with("", "[output.kafka.security]\npassword = {}");
        assert!(
            e.len() == 1 && e[0].starts_with("output.kafka.security.password"),
            "{e:?}"
        );
        let e = errors_with("", "[output.kafka.security]\nclient_key_file = \"k.pem\"");
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn a_wrong_type_in_an_input_names_the_field_and_its_place() {
        let text = "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp\"\n[[inputs]]\ntype = \"mqtt\"\nname = \"a\"\nhost = \"h\"\nqos = \"1\"\ntopics = [\"a/{device}\"]\n[inputs.json]\ntime = \"ts\"\n[output.kafka]\nbrokers = \"k:9092\"\n";
        let e = parse(text, None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("inputs[0].qos"), "{e}");
        assert_eq!(e.0[0].position, Some((8, 7)), "{e}");
        let fixed = text
            .replace("qos = \"1\"", "qos = 1")
            .replace("time = \"ts\"", "time = 5");
        let e = parse(&fixed, None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("inputs[0].json.time"), "{e}");
        assert_eq!(e.0[0].position, Some((11, 8)), "{e}");
        // A missing field belongs to the entry: its header.
        let no_host = text
            .replace("qos = \"1\"", "qos = 1")
            .replace("host = \"h\"\n", "");
        let e = parse(&no_host, None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("inputs[0]"), "{e}");
        assert_eq!(e.0[0].position, Some((4, 1)), "{e}");
        assert!(e.0[0].message.contains("host"), "{e}");
    }

    #[test]
    fn a_wrong_type_in_a_stage_names_the_field_and_its_place() {
        let text = "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp\"\n[[inputs]]\ntype = \"mqtt\"\nname = \"a\"\nhost = \"h\"\ntopics = [\"a/{device}\"]\n[[inputs.stages]]\ntype = \"throttle\"\ninterval = \"1s\"\n[[stages]]\ntype = \"tags\"\ntags = { a = \"b\" }\n[[stages]]\ntype = \"dedup\"\nmax_entries = \"many\"\n[output.kafka]\nbrokers = \"k:9092\"\n";
        let e = parse(text, None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("stages[1].max_entries"), "{e}");
        assert_eq!(e.0[0].position, Some((17, 15)), "{e}");
        let in_input = text
            .replace("max_entries = \"many\"", "max_entries = 5")
            .replace("interval = \"1s\"", "interval = 1");
        let e = parse(&in_input, None).unwrap_err();
        assert_eq!(
            e.0[0].path.as_deref(),
            Some("inputs[0].stages[0].interval"),
            "{e}"
        );
        assert_eq!(e.0[0].position, Some((11, 12)), "{e}");
        // In an array of tables inside a stage: the entry's index too.
        let rules = text.replace(
            "[[stages]]\ntype = \"dedup\"\nmax_entries = \"many\"\n",
            "[[stages]]\ntype = \"route\"\n[[stages.rules]]\ntopic = \"a\"\n[[stages.rules]]\ntopic = 5\n",
        );
        let e = parse(&rules, None).unwrap_err();
        assert_eq!(
            e.0[0].path.as_deref(),
            Some("stages[1].rules[1].topic"),
            "{e}"
        );
        assert_eq!(e.0[0].position, Some((20, 9)), "{e}");
    }

    #[test]
    fn log_filters() {
        for ok in [
            "info",
            "WARN",
            "info,librdkafka=warn",
            "gateway::router=debug, off",
        ] {
            assert!(valid_log_filter(ok), "{ok}");
        }
        for bad in ["", "loud", "info,=warn", "gateway=verbose", "info,"] {
            assert!(!valid_log_filter(bad), "{bad}");
        }
        assert_eq!(
            tidy_log_filter(" info , librdkafka = warn,gateway::router=debug"),
            "info,librdkafka=warn,gateway::router=debug"
        );
    }

    #[test]
    fn semantic_errors_are_all_listed_with_paths() {
        let text = r#"
[gateway]
id = "bad id"
state_dir = "/tmp"
[[inputs]]
type = "mqtt"
name = "a"
host = "h"
qos = 2
topics = ["a/{device"]
[output.kafka]
brokers = ""
"#;
        let e = parse(text, None).unwrap_err();
        let positions: Vec<_> = e.0.iter().map(|e| e.position).collect();
        // id = "bad id" is line 3; qos = 2 line 9; the topic line 10; brokers line 12.
        assert_eq!(
            positions,
            [Some((3, 6)), Some((9, 7)), Some((10, 11)), Some((12, 11))]
        );
        let paths: Vec<_> = e.0.iter().filter_map(|e| e.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "gateway.id",
                "inputs[0].qos",
                "inputs[0].topics[0]",
                "output.kafka.brokers"
            ]
        );
    }

    #[test]
    fn a_spool_reserve_is_none_or_large_enough() {
        let with = |reserve: u64| {
            format!(
                "[gateway]\nid = \"g\"\nstate_dir = \"/tmp\"\n[spool]\nreserve_bytes = {reserve}\n\
                 [output.kafka]\nbrokers = \"k:9092\"\n"
            )
        };
        assert!(parse(&with(0), None).is_ok());
        assert!(parse(&with(MIN_RESERVE_BYTES), None).is_ok());
        let e = parse(&with(MIN_RESERVE_BYTES - 1), None).unwrap_err();
        assert_eq!(e.0[0].path.as_deref(), Some("spool.reserve_bytes"));
        assert_eq!(e.0[0].position, Some((5, 17)));
    }

    #[test]
    fn stage_errors_name_the_stage_list_and_field() {
        let text = r#"
[gateway]
id = "gw"
state_dir = "/tmp"
[[inputs]]
type = "serial"
name = "gps"
path = "/dev/ttyUSB0"
[[inputs.stages]]
type = "throttle"
interval = "0s"
[[stages]]
type = "route"
[[stages.rules]]
topic = "bad topic/{device}"
[[stages]]
type = "geofence"
[[stages]]
type = "window"
size = "1m"
aggregates = []
[[stages]]
type = "window"
size = "1m"
idle_timeout = "0s"
[[stages]]
type = "window"
size = "1s"
allowed_lateness = "1h"
[[stages]]
type = "range"
reading = "t"
min = nan
[output.kafka]
brokers = "k:9092"
"#;
        let e = parse(text, None).unwrap_err();
        let paths: Vec<_> = e.0.iter().filter_map(|e| e.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "stages[0].rules[0].topic",
                "stages[1].file",
                "stages[2].aggregates",
                "stages[3].idle_timeout",
                "stages[4].allowed_lateness",
                "stages[5]",
                "inputs[0].stages[0].interval"
            ]
        );
    }

    #[test]
    fn durations_and_secrets() {
        let text = r#"
[gateway]
id = "g"
state_dir = "/tmp"
[spool]
commit_interval = "5ms"
[output.kafka]
brokers = "k:9092"
linger = "1s"
"#;
        let c = parse(text, None).expect("valid");
        assert_eq!(c.spool.commit_interval, Duration::from_millis(5));
        assert_eq!(c.output.kafka.linger, Duration::from_secs(1));
        let s = Secret {
            file: None,
            env: Some("GATEWAY_TEST_SECRET_UNSET".into()),
        };
        assert!(s.read().is_err());
    }
}
