//! Stages: synchronous functions over events, run in order by a [`Chain`].
//!
//! A stage does no I/O and holds no runtime: it takes an event and keeps it (possibly
//! changed), drops it with a reason, or rejects it (dropped, and dead-lettered when the
//! output has a dead-letter topic). A stage may also make new events (window summaries,
//! geofence transitions): they go on from the next stage. Stages with timers (a window's
//! idle timeout) get [`Stage::tick`] from the pipeline's ticker. The chain counts, per
//! stage, events in, out, dropped by reason and made; stages with state keep it bounded
//! ([`state::Bounded`]) and count what they forget. Stages run in the input's task,
//! before the router.
//!
//! Layout: this file holds the trait, the chain, [`build`] and the small stages (`tags`,
//! `keep`/`drop`, `range`, `latest_location`); the others have a file each.

use gateway_config::{MatchSpec, RangeAction, Stage as StageConfig, TopicTemplate};
use prometheus_client::metrics::counter::Counter;

use std::sync::Mutex;

use crate::event::{Event, Location, Value};
use crate::metrics::Metrics;

mod enrich;
pub(crate) mod expr;
mod filter;
mod geofence;
mod gps;
mod rate;
pub mod state;
mod validate;
mod window;

pub use geofence::Geofence;

/// What a stage decided about the event it was given.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Pass the event on (as the stage left it).
    Keep,
    /// Drop it; the reason becomes the `reason` label.
    Drop(&'static str),
    /// Drop it for `reason`, and dead-letter it (with `detail`) when the output has a
    /// dead-letter topic.
    Reject {
        /// The `reason` label.
        reason: &'static str,
        /// What was wrong, for the dead letter.
        detail: String,
    },
}

/// Nanoseconds on the gateway's monotonic clock (since its first reading), the clock
/// [`Stage::tick`] is given: idle timers must not jump when NTP sets the wall clock (a
/// board without a real-time clock boots in the past).
pub fn mono_ns() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX)
}

/// One stage.
pub trait Stage: Send + Sync {
    /// Processes one event, changing it in place; events the stage makes go into `made`
    /// (they continue from the next stage, before this event does). The event is
    /// borrowed, not moved: an event is some 240 bytes, and a chain that moved it into
    /// and out of every stage copied it twice per stage.
    fn apply(&self, event: &mut Event, made: &mut Vec<Event>) -> Verdict;

    /// Called about once a second with the gateway's monotonic clock ([`mono_ns`]), for
    /// timers; `flush` asks for everything held to come out now (the pipeline is being
    /// replaced or the gateway stops).
    fn tick(&self, _now_ns: i64, _flush: bool, _made: &mut Vec<Event>) {}
}

/// The numeric readings of `e` named in `names` (all of them when `names` is empty): what
/// `deadband` and `window` watch.
pub(crate) fn numeric<'a>(
    names: &'a [String],
    e: &'a Event,
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    e.readings.iter().filter_map(move |(k, v)| match v {
        Value::Number(n) if names.is_empty() || names.iter().any(|x| x == k) => {
            Some((k.as_str(), *n))
        }
        _ => None,
    })
}

/// Adds static tags.
pub struct Tags(Vec<(String, String)>);

impl Stage for Tags {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        for (k, v) in &self.0 {
            if !e.tags.contains_key(k) {
                e.tags.insert(k.as_str().into(), v.as_str().into());
            }
        }
        Verdict::Keep
    }
}

/// `*` / `?` glob matching.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Event selection shared by keep and drop.
pub struct Matcher {
    devices: Vec<String>,
    topics: Vec<TopicTemplate>,
    sources: Vec<String>,
}

impl Matcher {
    fn new(m: &MatchSpec) -> Result<Self, String> {
        let topics = m
            .topics
            .iter()
            .map(|t| TopicTemplate::parse(t).map_err(|e| format!("topic {t:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Matcher {
            devices: m.devices.clone(),
            topics,
            sources: m.sources.clone(),
        })
    }

    /// True when every given criterion matches.
    pub fn matches(&self, e: &Event) -> bool {
        (self.devices.is_empty() || self.devices.iter().any(|p| glob(p, &e.device)))
            && (self.topics.is_empty()
                || self.topics.iter().any(|t| t.matches(&e.origin).is_some()))
            && (self.sources.is_empty() || self.sources.iter().any(|s| *s == e.source))
    }
}

/// Keeps matching events (`keep = true`) or drops them (`keep = false`).
pub struct Select {
    matcher: Matcher,
    keep: bool,
}

impl Stage for Select {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        if self.matcher.matches(e) == self.keep {
            Verdict::Keep
        } else {
            Verdict::Drop("filtered")
        }
    }
}

/// Range check of one reading.
pub struct Range {
    reading: String,
    min: f64,
    max: f64,
    action: RangeAction,
}

impl Stage for Range {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let Some(Value::Number(v)) = e.readings.get(self.reading.as_str()) else {
            return Verdict::Keep;
        };
        if (self.min..=self.max).contains(v) {
            return Verdict::Keep;
        }
        match self.action {
            RangeAction::Drop => Verdict::Drop("out_of_range"),
            RangeAction::Tag => {
                e.tags
                    .insert("out_of_range".into(), self.reading.as_str().into());
                Verdict::Keep
            }
        }
    }
}

/// Whose location [`LatestLocation`] keeps.
enum LocationKey {
    Device,
    Tag(String),
}

/// Remembers the latest location per device (or tag value) and attaches it to events that
/// have none. Bounded: beyond `max_keys` the least recently seen keys are forgotten.
pub struct LatestLocation {
    key: LocationKey,
    sources: Vec<String>,
    max_age_ns: i64,
    /// Per key: the fix, its event time, and when it arrived (the gateway's clock).
    fixes: Mutex<state::Bounded<(Location, i64, i64)>>,
}

impl LatestLocation {
    fn key_of(&self, e: &Event) -> Option<String> {
        match &self.key {
            LocationKey::Device => Some(e.device.to_string()),
            LocationKey::Tag(t) => e.tags.get(t.as_str()).map(|v| v.to_string()),
        }
    }
}

impl Stage for LatestLocation {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let Some(key) = self.key_of(e) else {
            return Verdict::Keep;
        };
        let mut fixes = self.fixes.lock().unwrap_or_else(|p| p.into_inner());
        match &e.location {
            Some(loc) => {
                if self.sources.is_empty() || self.sources.iter().any(|s| *s == e.source) {
                    // A fix older than the one kept (a resend, a slow input, a backlog)
                    // does not win, unless the kept one is stale: dated more than an hour
                    // ahead of its arrival (a glitch), or arrived more than an hour ago
                    // (the device's clock went back). Either would win for good.
                    let hour = state::CLOCK_RESET_NS;
                    let newer = fixes.peek(&key).is_none_or(|(_, t, arrived)| {
                        e.time_ns >= *t
                            || *t > arrived.saturating_add(hour)
                            || e.received_ns > arrived.saturating_add(hour)
                    });
                    let fix = (*loc, e.time_ns, e.received_ns);
                    let kept = fixes.entry(&key, || fix);
                    if newer {
                        *kept = fix;
                    }
                }
            }
            None => {
                if let Some((loc, t, _)) = fixes.get_mut(&key) {
                    if e.time_ns.abs_diff(*t) <= self.max_age_ns.unsigned_abs() {
                        e.location = Some(*loc);
                        e.tags.insert("location".into(), "latest".into());
                    }
                }
            }
        }
        drop(fixes);
        Verdict::Keep
    }
}

/// Builds one stage; `evicted` counts what a stage with bounded state forgets.
pub fn build(c: &StageConfig, evicted: Counter) -> Result<Box<dyn Stage>, String> {
    Ok(match c {
        StageConfig::Tags { tags } => Box::new(Tags(tags.clone().into_iter().collect())),
        StageConfig::Keep(m) => Box::new(Select {
            matcher: Matcher::new(m)?,
            keep: true,
        }),
        StageConfig::Drop(m) => Box::new(Select {
            matcher: Matcher::new(m)?,
            keep: false,
        }),
        StageConfig::Range {
            reading,
            min,
            max,
            action,
        } => Box::new(Range {
            reading: reading.clone(),
            min: min.unwrap_or(f64::NEG_INFINITY),
            max: max.unwrap_or(f64::INFINITY),
            action: *action,
        }),
        StageConfig::LatestLocation {
            key,
            sources,
            max_age,
            max_keys,
        } => Box::new(LatestLocation {
            key: match key.strip_prefix("tag.") {
                Some(t) => LocationKey::Tag(t.to_string()),
                None => LocationKey::Device,
            },
            sources: sources.clone(),
            max_age_ns: i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX),
            fixes: Mutex::new(state::Bounded::new(*max_keys, evicted)),
        }),
        StageConfig::Filter(f) => Box::new(filter::Filter::new(f)?),
        StageConfig::Route(r) => Box::new(filter::Router::new(r)?),
        StageConfig::Validate(v) => Box::new(validate::Validate::new(v)),
        StageConfig::Dedup(d) => Box::new(validate::Dedup::new(d, evicted)),
        StageConfig::Throttle(t) => Box::new(rate::Throttle::new(t, evicted)),
        StageConfig::Deadband(d) => Box::new(rate::Deadband::new(d, evicted)),
        StageConfig::Window(w) => Box::new(window::Window::new(w, evicted)),
        StageConfig::Geofence(g) => Box::new(Geofence::new(g, evicted)?),
        StageConfig::GpsSanity(g) => Box::new(gps::GpsSanity::new(g, evicted)),
        StageConfig::Enrich(e) => Box::new(enrich::Enrich::new(e)?),
        StageConfig::Calibrate(c) => Box::new(enrich::Calibrate::new(c)),
        StageConfig::Convert(c) => Box::new(enrich::Convert::new(c)?),
        StageConfig::Rename(r) => Box::new(enrich::Rename::new(r)),
        StageConfig::Remove(r) => Box::new(enrich::Remove::new(r)),
    })
}

struct Slot {
    stage: Box<dyn Stage>,
    label: String,
    events_in: Counter,
    events_out: Counter,
}

/// The ordered stages of a pipeline, with their counters.
pub struct Chain {
    slots: Vec<Slot>,
    metrics: Option<Metrics>,
}

/// Why the chain dropped an event: the stage label and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    /// `<index>-<kind>`, e.g. `1-range` (`<input>/<index>-<kind>` for an input's own).
    pub stage: String,
    /// The reason label.
    pub reason: &'static str,
    /// For an event a stage made: its source input (it is accounted there).
    pub made_by: Option<String>,
}

/// What came out of the chain for one event (or one tick).
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// An event to send on; `made` when a stage made it (not received from an input).
    Event {
        /// The event.
        event: Event,
        /// Made by a stage.
        made: bool,
    },
    /// Dropped.
    Dropped(Dropped),
    /// Dropped and, where the output has a dead-letter topic, dead-lettered.
    Rejected {
        /// Which stage and why.
        dropped: Dropped,
        /// What was wrong.
        detail: String,
        /// The event as it reached the stage.
        event: Box<Event>,
    },
}

impl Chain {
    /// Builds a chain; errors name the stage (`stages[1] (filter): ...`). `prefix` labels
    /// an input's own stages in metrics (`site/0-filter`); empty for the global ones.
    pub fn build(
        configs: &[StageConfig],
        metrics: Option<&Metrics>,
        prefix: &str,
    ) -> Result<Chain, String> {
        let mut slots = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let label = if prefix.is_empty() {
                format!("{i}-{}", c.kind())
            } else {
                format!("{prefix}/{i}-{}", c.kind())
            };
            let (events_in, events_out, evicted) = match metrics {
                Some(m) => (
                    m.stage_in(&label),
                    m.stage_out(&label),
                    m.stage_evicted(&label),
                ),
                None => Default::default(),
            };
            let stage =
                build(c, evicted).map_err(|e| format!("stages[{i}] ({}): {e}", c.kind()))?;
            slots.push(Slot {
                stage,
                label,
                events_in,
                events_out,
            });
        }
        Ok(Chain {
            slots,
            metrics: metrics.cloned(),
        })
    }

    /// No stages.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Runs an event through every stage; what comes out (the event or why it stopped,
    /// and any events the stages made) is appended to `out`.
    pub fn run(&self, e: Event, out: &mut Vec<Outcome>) {
        self.run_from(0, e, false, out);
    }

    /// Runs the stages' timers (see [`Stage::tick`]); what they release goes on through
    /// the rest of the chain into `out`.
    pub fn tick(&self, now_ns: i64, flush: bool, out: &mut Vec<Outcome>) {
        let mut made = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            s.stage.tick(now_ns, flush, &mut made);
            for e in std::mem::take(&mut made) {
                self.run_from(i + 1, e, true, out);
            }
        }
    }

    fn run_from(&self, first: usize, mut e: Event, made_here: bool, out: &mut Vec<Outcome>) {
        let mut made = Vec::new();
        // A made event dropped later is accounted on its own input.
        let made_by = made_here.then(|| e.source.to_string());
        for (i, s) in self.slots.iter().enumerate().skip(first) {
            s.events_in.inc();
            let verdict = s.stage.apply(&mut e, &mut made);
            for m in std::mem::take(&mut made) {
                self.run_from(i + 1, m, true, out);
            }
            match verdict {
                Verdict::Keep => {
                    s.events_out.inc();
                }
                Verdict::Drop(reason) => {
                    let mut d = self.dropped(s, reason);
                    d.made_by = made_by;
                    out.push(Outcome::Dropped(d));
                    return;
                }
                Verdict::Reject { reason, detail } => {
                    let mut d = self.dropped(s, reason);
                    d.made_by = made_by;
                    out.push(Outcome::Rejected {
                        dropped: d,
                        detail,
                        event: Box::new(e),
                    });
                    return;
                }
            }
        }
        out.push(Outcome::Event {
            event: e,
            made: made_here,
        });
    }

    fn dropped(&self, s: &Slot, reason: &'static str) -> Dropped {
        if let Some(m) = &self.metrics {
            m.stage_dropped(&s.label, reason);
        }
        Dropped {
            stage: s.label.clone(),
            reason,
            made_by: None,
        }
    }
}

/// The stages an input's events pass: the input's own, then the global ones (shared by
/// every input, so that state such as `latest_location` spans inputs).
pub struct InputStages {
    /// The input's own stages (`inputs[].stages`).
    pub local: Option<Chain>,
    /// The global stages (`stages`).
    pub global: std::sync::Arc<Chain>,
}

impl InputStages {
    /// No stages at all: an event goes on as it came.
    pub fn is_empty(&self) -> bool {
        self.local.as_ref().is_none_or(Chain::is_empty) && self.global.is_empty()
    }

    /// Runs an event through the input's stages, then the global ones.
    pub fn run(&self, e: Event, out: &mut Vec<Outcome>) {
        match &self.local {
            None => self.global.run(e, out),
            Some(local) => {
                let mut first = Vec::new();
                local.run(e, &mut first);
                self.then_global(first, out);
            }
        }
    }

    /// The input's own stages' timers (the global chain is ticked once, by the pipeline).
    pub fn tick(&self, now_ns: i64, flush: bool, out: &mut Vec<Outcome>) {
        if let Some(local) = &self.local {
            let mut first = Vec::new();
            local.tick(now_ns, flush, &mut first);
            self.then_global(first, out);
        }
    }

    fn then_global(&self, first: Vec<Outcome>, out: &mut Vec<Outcome>) {
        for o in first {
            match o {
                Outcome::Event { event, made } => {
                    let source = made.then(|| event.source.to_string());
                    let from = out.len();
                    self.global.run(event, out);
                    // What became of an event the input's stages made is accounted as
                    // made, whatever the global stages did with it.
                    if let Some(source) = source {
                        for o in &mut out[from..] {
                            match o {
                                Outcome::Event { made, .. } => *made = true,
                                Outcome::Dropped(d) | Outcome::Rejected { dropped: d, .. } => {
                                    d.made_by.get_or_insert_with(|| source.clone());
                                }
                            }
                        }
                    }
                }
                other => out.push(other),
            }
        }
    }
}

/// Runs one event through a chain and returns the single event that came out, or why it
/// did not: for tests and benchmarks of chains that make no events.
pub fn run_one(chain: &Chain, e: Event) -> Result<Event, Dropped> {
    let mut out = Vec::with_capacity(1);
    chain.run(e, &mut out);
    match out.pop() {
        Some(Outcome::Event { event, .. }) => Ok(event),
        Some(Outcome::Dropped(d)) | Some(Outcome::Rejected { dropped: d, .. }) => Err(d),
        None => Err(Dropped {
            stage: String::new(),
            reason: "nothing",
            made_by: None,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{ClockQuality, Event};

    /// What a stage did with an event, with the event as the stage left it: the
    /// [`Verdict`] and the event in one value, for tests.
    #[derive(Debug, PartialEq)]
    pub(crate) enum Applied {
        Keep(Event),
        Drop(&'static str),
        Reject {
            reason: &'static str,
            detail: String,
            event: Box<Event>,
        },
    }

    /// [`Stage::apply`] on an event the test hands over.
    pub(crate) trait ApplyOwned {
        fn apply_owned(&self, e: Event, made: &mut Vec<Event>) -> Applied;
    }

    impl<S: Stage + ?Sized> ApplyOwned for S {
        fn apply_owned(&self, mut e: Event, made: &mut Vec<Event>) -> Applied {
            match self.apply(&mut e, made) {
                Verdict::Keep => Applied::Keep(e),
                Verdict::Drop(reason) => Applied::Drop(reason),
                Verdict::Reject { reason, detail } => Applied::Reject {
                    reason,
                    detail,
                    event: Box::new(e),
                },
            }
        }
    }

    /// One stage's config from TOML (the body of a `[[stages]]` table).
    pub(crate) fn parse(toml: &str) -> StageConfig {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"))
    }

    pub(crate) fn event(device: &str, topic: &str, temp: f64) -> Event {
        Event {
            id: "x".into(),
            device: device.into(),
            source: "in".into(),
            origin: topic.into(),
            time_ns: 0,
            clock: ClockQuality::Device,
            received_ns: 0,
            location: None,
            readings: [("temperature".into(), Value::Number(temp))].into(),
            tags: Default::default(),
            route: None,
            redelivered: false,
        }
    }

    fn check(stages: &str, input: Event, expected: Result<&[(&str, &str)], &str>) {
        let cfg: toml::Value = toml::from_str(stages).expect("toml");
        let list: Vec<StageConfig> = cfg
            .get("stages")
            .cloned()
            .expect("stages")
            .try_into()
            .expect("stage configs");
        let chain = Chain::build(&list, None, "").expect("builds");
        match (run_one(&chain, input), expected) {
            (Ok(e), Ok(tags)) => {
                for (k, v) in tags {
                    assert_eq!(e.tags.get(k).map(|v| v.as_str()), Some(*v));
                }
            }
            (Err(d), Err(reason)) => assert_eq!(d.reason, reason),
            (got, exp) => panic!("got {got:?}, expected {exp:?}"),
        }
    }

    #[test]
    fn tags_keep_drop_range() {
        let tags = "[[stages]]\ntype='tags'\ntags={site='b'}";
        check(tags, event("d", "t", 1.0), Ok(&[("site", "b")]));
        let keep = "[[stages]]\ntype='keep'\ndevices=['pump-*']";
        check(keep, event("pump-7", "t", 1.0), Ok(&[]));
        check(keep, event("fan-1", "t", 1.0), Err("filtered"));
        let drop = "[[stages]]\ntype='drop'\ntopics=['test/#']";
        check(drop, event("d", "test/a/b", 1.0), Err("filtered"));
        check(drop, event("d", "prod/a", 1.0), Ok(&[]));
        let range = "[[stages]]\ntype='range'\nreading='temperature'\nmin=-40.0\nmax=125.0";
        check(range, event("d", "t", 200.0), Err("out_of_range"));
        check(range, event("d", "t", 20.0), Ok(&[]));
        let tag = "[[stages]]\ntype='range'\nreading='temperature'\nmax=0.0\naction='tag'";
        check(
            tag,
            event("d", "t", 20.0),
            Ok(&[("out_of_range", "temperature")]),
        );
    }

    fn chain(stages: &str) -> Chain {
        let cfg: toml::Value = toml::from_str(stages).expect("toml");
        let list: Vec<StageConfig> = cfg["stages"].clone().try_into().expect("stage configs");
        Chain::build(&list, None, "").expect("builds")
    }

    fn located(device: &str, source: &str, site: &str, time_s: i64, fix: Option<f64>) -> Event {
        let mut e = event(device, "t", 1.0);
        e.source = source.into();
        e.time_ns = time_s * 1_000_000_000;
        e.tags.insert("site".into(), site.into());
        e.location = fix.map(|lat| Location {
            lat,
            lon: 13.4,
            alt: None,
            accuracy: None,
        });
        e
    }

    fn lat(c: &Chain, e: Event) -> Option<f64> {
        run_one(c, e).expect("kept").location.map(|l| l.lat)
    }

    #[test]
    fn latest_location_is_shared_by_site_within_its_age() {
        let c = chain(
            "[[stages]]\ntype='latest_location'\nkey='tag.site'\nsources=['gps']\nmax_age='30s'",
        );
        // No fix yet: nothing to attach.
        assert_eq!(lat(&c, located("pump-1", "serial", "a", 100, None)), None);
        // The site's GPS receiver reports; the pump of the same site gets its fix.
        assert_eq!(
            lat(&c, located("gps-1", "gps", "a", 100, Some(52.5))),
            Some(52.5)
        );
        let e = run_one(&c, located("pump-1", "serial", "a", 120, None)).expect("kept");
        assert_eq!(e.location.map(|l| l.lat), Some(52.5));
        assert_eq!(e.tags.get("location").map(|v| v.as_str()), Some("latest"));
        // Too old, another site, or a location from an input that does not set it.
        assert_eq!(lat(&c, located("pump-1", "serial", "a", 131, None)), None);
        assert_eq!(lat(&c, located("pump-2", "serial", "b", 110, None)), None);
        assert_eq!(
            lat(&c, located("pump-3", "phone", "a", 125, Some(10.0))),
            Some(10.0)
        );
        assert_eq!(
            lat(&c, located("pump-1", "serial", "a", 126, None)),
            Some(52.5)
        );
        // An older fix arriving late does not replace a newer one.
        lat(&c, located("gps-1", "gps", "a", 90, Some(1.0)));
        assert_eq!(
            lat(&c, located("pump-1", "serial", "a", 101, None)),
            Some(52.5)
        );
        // An event's own location is left alone.
        assert_eq!(
            lat(&c, located("pump-1", "serial", "a", 101, Some(3.0))),
            Some(3.0)
        );
        // A fix dated far ahead of its arrival (a glitch) gives way to the next one.
        lat(&c, located("gps-1", "gps", "a", 100_000, Some(9.0)));
        lat(&c, located("gps-1", "gps", "a", 140, Some(4.0)));
        assert_eq!(
            lat(&c, located("pump-1", "serial", "a", 150, None)),
            Some(4.0)
        );
        // A device whose clock went back: an hour after the kept fix arrived, an
        // older-dated one wins again.
        let mut back = located("gps-1", "gps", "a", 100, Some(7.0));
        back.received_ns = 7_200_000_000_000;
        lat(&c, back);
        assert_eq!(
            lat(&c, located("pump-1", "serial", "a", 110, None)),
            Some(7.0)
        );
    }

    proptest::proptest! {
        /// An event without a location gets the newest fix (by event time) of its device
        /// when that fix is at most `max_age` away from it, and nothing otherwise.
        #[test]
        fn latest_location_matches_a_model(
            steps in proptest::collection::vec((0u8..3, 0i64..100, proptest::bool::ANY), 1..200)
        ) {
            let c = chain("[[stages]]\ntype='latest_location'\nmax_age='30s'");
            let mut newest: std::collections::HashMap<u8, (f64, i64)> = Default::default();
            for (i, (dev, t, fix)) in steps.into_iter().enumerate() {
                let device = format!("d{dev}");
                let lat_in = fix.then_some(i as f64);
                let got = lat(&c, located(&device, "gps", "s", t, lat_in));
                match lat_in {
                    Some(l) => {
                        proptest::prop_assert_eq!(got, Some(l));
                        if newest.get(&dev).is_none_or(|(_, ft)| t >= *ft) {
                            newest.insert(dev, (l, t));
                        }
                    }
                    None => {
                        let want = newest
                            .get(&dev)
                            .filter(|(_, ft)| (t - ft).abs() <= 30)
                            .map(|(l, _)| *l);
                        proptest::prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }

    #[test]
    fn latest_location_keeps_a_bounded_number_of_keys() {
        let mut list: Vec<StageConfig> = toml::from_str::<toml::Value>(
            "[[stages]]\ntype='latest_location'\nmax_keys=2\nmax_age='1h'",
        )
        .expect("toml")["stages"]
            .clone()
            .try_into()
            .expect("stages");
        let evicted = Counter::default();
        let stage = build(&list.remove(0), evicted.clone()).expect("builds");
        for (i, d) in ["a", "b", "c"].into_iter().enumerate() {
            stage.apply_owned(
                located(d, "gps", "s", i as i64, Some(i as f64)),
                &mut Vec::new(),
            );
        }
        assert_eq!(evicted.get(), 1, "the oldest fix (a) was forgotten");
        let got = |d: &str| match stage.apply_owned(located(d, "x", "s", 5, None), &mut Vec::new())
        {
            Applied::Keep(e) => e.location.map(|l| l.lat),
            v => panic!("not kept: {v:?}"),
        };
        assert_eq!((got("a"), got("b"), got("c")), (None, Some(1.0), Some(2.0)));
    }

    /// An event a stage made and a later stage dropped is marked, so that the input
    /// counts it as made as well as dropped (received + generated = delivered + dropped).
    #[test]
    fn a_made_event_dropped_later_is_marked() {
        let c = chain(
            "[[stages]]\ntype='window'\nsize='1s'\n[[stages]]\ntype='filter'\nexpr='has(readings.nothing)'",
        );
        let mut out = Vec::new();
        let mut at = |s: i64| {
            let mut e = event("d", "t", 1.0);
            e.time_ns = s * 1_000_000_000;
            c.run(e, &mut out);
        };
        at(0);
        at(2);
        let marks: Vec<(&str, Option<&str>)> = out
            .iter()
            .map(|o| match o {
                Outcome::Dropped(d) => (d.reason, d.made_by.as_deref()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            marks,
            [
                ("windowed", None),
                ("filtered", Some("in")),
                ("windowed", None)
            ]
        );
    }

    /// Every `toml` block of docs/stages.md loads and builds, and every stage type has an
    /// example there.
    #[test]
    fn docs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("docs/stages.md")).expect("docs/stages.md");
        let examples = root.join("docs/examples/");
        let mut kinds = std::collections::BTreeSet::new();
        let mut blocks = 0;
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```toml\n") {
            let body = &rest[start + 8..];
            let end = body.find("```").expect("closed block");
            let block = body[..end].replace("/etc/edge-gateway/", &examples.display().to_string());
            rest = &body[end + 3..];
            let cfg: toml::Value =
                toml::from_str(&block).unwrap_or_else(|e| panic!("{block}\n{e}"));
            let list: Vec<StageConfig> = cfg["stages"]
                .clone()
                .try_into()
                .unwrap_or_else(|e| panic!("{block}\n{e}"));
            let chain = Chain::build(&list, None, "").unwrap_or_else(|e| panic!("{block}\n{e}"));
            let mut out = Vec::new();
            chain.run(event("pump-1", "sensors/pump-1", 20.0), &mut out);
            chain.tick(0, true, &mut out);
            kinds.extend(list.iter().map(StageConfig::kind));
            blocks += 1;
        }
        let all = [
            "tags",
            "keep",
            "drop",
            "range",
            "latest_location",
            "filter",
            "validate",
            "dedup",
            "throttle",
            "deadband",
            "window",
            "geofence",
            "gps_sanity",
            "enrich",
            "calibrate",
            "convert",
            "route",
            "rename",
            "remove",
        ];
        let missing: Vec<_> = all.iter().filter(|k| !kinds.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "stage types without an example: {missing:?}"
        );
        assert!(blocks >= 12, "{blocks} examples");
    }

    #[test]
    fn globs() {
        assert!(glob("pump-*", "pump-1"));
        assert!(glob("*-1", "pump-1"));
        assert!(glob("p?mp*", "pump"));
        assert!(!glob("pump-?", "pump-12"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "acd"));
    }
}
