//! The stage library's configuration: one [`Stage`] per `[[stages]]` table, by `type`.
//!
//! Stages run in order, globally (`stages`) and per input (`inputs[].stages`, before the
//! global ones). Each variant's fields are documented here; the stage reference with a
//! working example of each is `docs/stages.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

/// A stage: a synchronous function over events.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    /// Add static tags to every event (existing tags are kept).
    Tags {
        /// Tags to add.
        tags: BTreeMap<String, String>,
    },
    /// Keep only events that match (all given criteria must match).
    Keep(MatchSpec),
    /// Drop events that match (all given criteria must match).
    Drop(MatchSpec),
    /// Check a reading against a range.
    Range {
        /// Reading name.
        reading: String,
        /// Smallest accepted value.
        min: Option<f64>,
        /// Largest accepted value.
        max: Option<f64>,
        /// `drop` the event (default), or `tag` it with `out_of_range=<reading>`.
        #[serde(default)]
        action: RangeAction,
    },
    /// Share the latest known location: events with a location (from `sources`, e.g. a
    /// GPS receiver's input) remember it per key; later events of the same key without
    /// one get it (tag `location=latest`) if the fix is at most `max_age` older than they
    /// are (by event time).
    LatestLocation {
        /// Whose location: `device` (the default), or `tag.NAME` to share one fix among
        /// every device with the same tag value (`tag.site`: a site's GPS for all its
        /// sensors).
        #[serde(default = "default_location_key")]
        key: String,
        /// Inputs whose events set the location; empty: any event with a location.
        #[serde(default)]
        sources: Vec<String>,
        /// The oldest fix still attached.
        #[serde(default = "default_location_max_age", with = "duration")]
        max_age: Duration,
        /// Most keys remembered; beyond it the least recently seen are forgotten
        /// (counted in `gateway_stage_evictions_total`).
        #[serde(default = "default_location_max_keys")]
        max_keys: usize,
    },
    /// Keep or drop events by a CEL expression over the event (see [`FilterStage`]).
    Filter(FilterStage),
    /// Required fields, numeric ranges and timestamp sanity.
    Validate(ValidateStage),
    /// Drop events whose id was seen within a time window.
    Dedup(DedupStage),
    /// At most one event per device per interval.
    Throttle(ThrottleStage),
    /// Forward an event only when a reading moved by more than a threshold.
    Deadband(DeadbandStage),
    /// Tumbling windows per device: count, min, max, mean, first, last of each reading.
    Window(WindowStage),
    /// Tag the zones an event is in; emit enter and exit events.
    Geofence(GeofenceStage),
    /// Drop implausible GPS fixes; derive speed, heading and distance.
    GpsSanity(GpsSanityStage),
    /// Static tags and a lookup table keyed by device.
    Enrich(EnrichStage),
    /// Linear scale and offset per reading, and per device.
    Calibrate(CalibrateStage),
    /// Unit conversion of readings.
    Convert(ConvertStage),
    /// Choose the Kafka topic and key per event.
    Route(RouteStage),
    /// Rename readings and tags.
    Rename(RenameStage),
    /// Remove readings, tags or the location.
    Remove(RemoveStage),
}
fn default_location_key() -> String {
    "device".into()
}
fn default_location_max_age() -> Duration {
    Duration::from_secs(60)
}
fn default_location_max_keys() -> usize {
    10_000
}

impl Stage {
    /// The stage's kind, as written in config.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Tags { .. } => "tags",
            Stage::Keep(_) => "keep",
            Stage::Drop(_) => "drop",
            Stage::Range { .. } => "range",
            Stage::LatestLocation { .. } => "latest_location",
            Stage::Filter(_) => "filter",
            Stage::Validate(_) => "validate",
            Stage::Dedup(_) => "dedup",
            Stage::Throttle(_) => "throttle",
            Stage::Deadband(_) => "deadband",
            Stage::Window(_) => "window",
            Stage::Geofence(_) => "geofence",
            Stage::GpsSanity(_) => "gps_sanity",
            Stage::Enrich(_) => "enrich",
            Stage::Calibrate(_) => "calibrate",
            Stage::Convert(_) => "convert",
            Stage::Route(_) => "route",
            Stage::Rename(_) => "rename",
            Stage::Remove(_) => "remove",
        }
    }
}

/// What a range stage does with an out-of-range reading.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RangeAction {
    /// Drop the event (counted, `reason="out_of_range"`).
    #[default]
    Drop,
    /// Keep it, tagged `out_of_range=<reading>`.
    Tag,
}

/// Event selection for `keep` / `drop`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Device id globs (`*` and `?`). Empty: any device.
    #[serde(default)]
    pub devices: Vec<String>,
    /// MQTT topic filters (`+`, `#`). Empty: any topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Input names. Empty: any input.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// What a stage does with an event it rejects.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RejectAction {
    /// Drop it, counted by reason.
    #[default]
    Drop,
    /// Drop it, counted, and send it (as JSON, with the reason) to the dead-letter topic
    /// when one is configured.
    DeadLetter,
}

/// `filter`: a [CEL](https://cel.dev) expression over the event, compiled at config load.
///
/// Names in the expression: `device`, `source` (the input), `topic` (MQTT topic or serial
/// port), `id`, `time` (event time, seconds since the epoch, a float), `clock`, `tags`
/// (map), `readings` (map), `location` (map with `lat`, `lon`, `alt`, `accuracy`; `null`
/// when the event has none), and every reading by its own name (`temperature`). A
/// reading the event does not have is an evaluation error: guard it with
/// `has(readings.name)`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterStage {
    /// The condition, e.g. `temperature > -40.0 && device.startsWith("pump-")`.
    pub expr: String,
    /// `keep` (default): keep events for which it is true; `drop`: drop them.
    #[serde(default)]
    pub mode: FilterMode,
    /// An expression that cannot be evaluated for an event (a missing reading, a type
    /// mismatch): `drop` (default, reason `filter_error`) or `keep`.
    #[serde(default)]
    pub on_error: FilterOnError,
}

/// Whether a true `filter` keeps or drops.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    /// Keep events for which the expression is true.
    #[default]
    Keep,
    /// Drop events for which the expression is true.
    Drop,
}

/// What a `filter` does when its expression fails for an event.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterOnError {
    /// Drop the event (reason `filter_error`).
    #[default]
    Drop,
    /// Keep it.
    Keep,
}

/// `validate`: required fields, numeric ranges, timestamp sanity.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidateStage {
    /// Fields an event must have: `location`, `readings.NAME`, `tags.NAME`.
    #[serde(default)]
    pub required: Vec<String>,
    /// Accepted range per reading (a reading that is absent is not checked; make it
    /// `required` too).
    #[serde(default)]
    pub ranges: BTreeMap<String, Bounds>,
    /// Largest accepted event time ahead of the gateway's clock. Default 5 minutes.
    #[serde(default = "default_max_future", with = "duration")]
    pub max_future: Duration,
    /// Largest accepted event age. Default 7 days.
    #[serde(default = "default_max_past", with = "duration")]
    pub max_past: Duration,
    /// `drop` (default) or `dead_letter`.
    #[serde(default)]
    pub action: RejectAction,
}

/// A numeric range; either end may be left open.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Smallest accepted value.
    pub min: Option<f64>,
    /// Largest accepted value.
    pub max: Option<f64>,
}

fn default_max_future() -> Duration {
    Duration::from_secs(300)
}
fn default_max_past() -> Duration {
    Duration::from_secs(7 * 86_400)
}

/// `dedup`: drops an event whose id was already seen within `window` (by the gateway's
/// clock), e.g. the redeliveries at-least-once inputs allow.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupStage {
    /// How long an id is remembered. Default 10 minutes.
    #[serde(default = "default_dedup_window", with = "duration")]
    pub window: Duration,
    /// Most ids remembered; beyond it the oldest are forgotten (counted as evictions).
    #[serde(default = "default_dedup_entries")]
    pub max_entries: usize,
}

fn default_dedup_window() -> Duration {
    Duration::from_secs(600)
}
fn default_dedup_entries() -> usize {
    100_000
}

/// `throttle`: per device, at most one event per `interval` of event time.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThrottleStage {
    /// The shortest gap between two events of a device that are both kept.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Most devices tracked (least recently seen forgotten first).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

/// `deadband`: per device, an event goes on only when one of `readings` moved by more than
/// `threshold` since the last event that went on (or `max_interval` passed).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadbandStage {
    /// Readings watched. Empty: every numeric reading.
    #[serde(default)]
    pub readings: Vec<String>,
    /// The smallest change that counts (absolute, in the reading's unit).
    pub threshold: f64,
    /// Forward anyway once this much event time passed (a heartbeat). Unset: never.
    #[serde(default, with = "duration::option")]
    pub max_interval: Option<Duration>,
    /// Most devices tracked.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

fn default_max_devices() -> usize {
    10_000
}

/// `window`: tumbling windows of event time per device. When a window closes, one event
/// goes on with `<reading>_<aggregate>` readings; the events it summarises stop here
/// (counted as `windowed`). State is in memory: a crash loses windows still open.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowStage {
    /// Window length, aligned to the epoch (`1m`: windows start on the minute).
    #[serde(with = "duration")]
    pub size: Duration,
    /// Readings summarised. Empty: every numeric reading.
    #[serde(default)]
    pub readings: Vec<String>,
    /// Aggregates: `count`, `min`, `max`, `mean`, `first`, `last`. Default all.
    #[serde(default = "default_aggregates")]
    pub aggregates: Vec<Aggregate>,
    /// How far behind the newest event time of a device an event may arrive and still
    /// count in its window; a window closes once the device's event time passes its end
    /// plus this. Later events are dropped (`late`).
    #[serde(default, with = "duration")]
    pub allowed_lateness: Duration,
    /// A window also closes when its device sent nothing for this long (gateway clock).
    /// Default: twice `size`.
    #[serde(default, with = "duration::option")]
    pub idle_timeout: Option<Duration>,
    /// Also pass every event on, unchanged (the summary comes in addition).
    #[serde(default)]
    pub keep_events: bool,
    /// Most devices with open windows; beyond it the least recently seen one's windows
    /// are closed early (and emitted).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

/// One window aggregate.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// How many values.
    Count,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// The arithmetic mean.
    Mean,
    /// The earliest by event time.
    First,
    /// The latest by event time.
    Last,
}

impl Aggregate {
    /// The suffix of the reading it produces.
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Mean => "mean",
            Aggregate::First => "first",
            Aggregate::Last => "last",
        }
    }
}

fn default_aggregates() -> Vec<Aggregate> {
    vec![
        Aggregate::Count,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Mean,
        Aggregate::First,
        Aggregate::Last,
    ]
}

/// `geofence`: zones from GeoJSON (Polygon and MultiPolygon features), indexed in an
/// R-tree. Tags each event with a location by the zones it is in, and emits an event
/// when a device enters or leaves a zone, once the change held for `dwell`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GeofenceStage {
    /// A GeoJSON file (FeatureCollection, Feature or geometry).
    pub file: Option<PathBuf>,
    /// GeoJSON text inline, instead of `file`.
    pub geojson: Option<String>,
    /// The feature property that names a zone. Default `name`; a feature without it is
    /// named by its index (`zone-3`).
    #[serde(default = "default_zone_property")]
    pub name_property: String,
    /// The tag listing the zones an event is in (comma-separated, sorted); absent when
    /// it is in none.
    #[serde(default = "default_zone_tag")]
    pub tag: String,
    /// Emit `enter` / `exit` events (tags `geofence`, `zone`).
    #[serde(default = "default_true")]
    pub transitions: bool,
    /// Hysteresis: a device's move into or out of a zone counts only once its fixes
    /// agreed on it for this long (event time), so a device on a border does not flap.
    #[serde(default, with = "duration")]
    pub dwell: Duration,
    /// Most devices tracked for transitions.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

fn default_zone_property() -> String {
    "name".into()
}
fn default_zone_tag() -> String {
    "zones".into()
}
fn default_true() -> bool {
    true
}

/// `gps_sanity`: drops fixes at (0, 0), out of range, less accurate than `max_accuracy`,
/// or implying a speed above `max_speed` from the device's previous fix; adds
/// `speed_mps`, `heading_deg` and `distance_m` (from the previous fix) readings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpsSanityStage {
    /// The fastest plausible speed, m/s. Default 100 (360 km/h).
    #[serde(default = "default_max_speed")]
    pub max_speed: f64,
    /// Drop fixes whose accuracy (metres) is worse than this. Unset: keep them.
    pub max_accuracy: Option<f64>,
    /// Add the derived readings.
    #[serde(default = "default_true")]
    pub derive: bool,
    /// Most devices tracked.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

fn default_max_speed() -> f64 {
    100.0
}

/// `enrich`: static tags, and tags from a lookup table keyed by device.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EnrichStage {
    /// Tags added to every event (an event's own tags win).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// A lookup table: `.csv` (a header row; the `key_column` names the device, every
    /// other column becomes a tag) or `.toml` (one table per device of tag = value).
    pub table: Option<PathBuf>,
    /// The CSV column holding the device id. Default `device`.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    /// Table rows inline, device → tags (instead of, or on top of, `table`).
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Overwrite tags the event already has (default: keep the event's).
    #[serde(default)]
    pub overwrite: bool,
}

fn default_key_column() -> String {
    "device".into()
}

/// `calibrate`: `value * scale + offset` per reading; per-device entries replace the
/// defaults for that device.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CalibrateStage {
    /// Reading → correction, for every device.
    #[serde(default)]
    pub readings: BTreeMap<String, Linear>,
    /// Device → reading → correction.
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, Linear>>,
}

/// A linear correction.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    /// Multiplier. Default 1.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added after scaling. Default 0.
    #[serde(default)]
    pub offset: f64,
}

fn default_scale() -> f64 {
    1.0
}

/// `convert`: unit conversion of readings, e.g. `temperature = { from = "degF", to =
/// "degC" }`. Units: temperature `degC` `degF` `K`; length `m` `km` `cm` `mm` `ft` `in`
/// `mi`; speed `m/s` `km/h` `mph` `kn`; pressure `Pa` `hPa` `kPa` `bar` `mbar` `psi`
/// `inHg`; mass `kg` `g` `lb`; energy `J` `kWh` `Wh`; power `W` `kW`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ConvertStage {
    /// Reading → conversion.
    pub readings: BTreeMap<String, Conversion>,
}

/// One unit conversion.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    /// The unit the reading is in.
    pub from: String,
    /// The unit wanted.
    pub to: String,
    /// Store the result under this name (the original stays). Default: in place.
    pub into: Option<String>,
}

/// `route`: the first rule whose `when` holds sets the event's Kafka topic and key
/// (templates as in `output.kafka`: `{device}`, `{source}`, `{tag.NAME}`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteStage {
    /// Rules, tried in order.
    pub rules: Vec<RouteRule>,
}

/// One `route` rule.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// A CEL condition (names as in `filter`). Unset: always.
    pub when: Option<String>,
    /// Topic template. Unset: the output's topic.
    pub topic: Option<String>,
    /// Key template. Unset: the output's key.
    pub key: Option<String>,
}

/// `rename`: old name → new name, for readings and tags.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RenameStage {
    /// Reading renames.
    #[serde(default)]
    pub readings: BTreeMap<String, String>,
    /// Tag renames.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `remove`: readings and tags removed by name, and optionally the location.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RemoveStage {
    /// Readings to remove.
    #[serde(default)]
    pub readings: Vec<String>,
    /// Tags to remove.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Remove the location.
    #[serde(default)]
    pub location: bool,
}
