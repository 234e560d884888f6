//! Stages: synchronous functions over events, run in order by a [`Chain`].
//!
//! A stage does no I/O and holds no runtime: it takes an event and keeps it (possibly
//! changed) or drops it with a reason. The chain counts, per stage, events in, out and
//! dropped by reason. Stages run in the input's task, before the router.

use gateway_config::{MatchSpec, RangeAction, Stage as StageConfig, TopicTemplate};
use prometheus_client::metrics::counter::Counter;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::event::{Event, Location, Value};
use crate::metrics::Metrics;

/// What a stage decided.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Pass the event on.
    Keep(Event),
    /// Drop it; the reason becomes the `reason` label.
    Drop(&'static str),
}

/// One stage.
pub trait Stage: Send + Sync {
    /// Processes one event.
    fn apply(&self, event: Event) -> Verdict;
}

/// Adds static tags.
pub struct Tags(Vec<(String, String)>);

impl Stage for Tags {
    fn apply(&self, mut e: Event) -> Verdict {
        for (k, v) in &self.0 {
            e.tags.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Verdict::Keep(e)
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
            && (self.sources.is_empty() || self.sources.contains(&e.source))
    }
}

/// Keeps matching events (`keep = true`) or drops them (`keep = false`).
pub struct Select {
    matcher: Matcher,
    keep: bool,
}

impl Stage for Select {
    fn apply(&self, e: Event) -> Verdict {
        if self.matcher.matches(&e) == self.keep {
            Verdict::Keep(e)
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
    fn apply(&self, mut e: Event) -> Verdict {
        let Some(Value::Number(v)) = e.readings.get(&self.reading) else {
            return Verdict::Keep(e);
        };
        if (self.min..=self.max).contains(v) {
            return Verdict::Keep(e);
        }
        match self.action {
            RangeAction::Drop => Verdict::Drop("out_of_range"),
            RangeAction::Tag => {
                e.tags.insert("out_of_range".into(), self.reading.clone());
                Verdict::Keep(e)
            }
        }
    }
}

/// Builds one stage from its config.
/// Whose location [`LatestLocation`] keeps.
enum LocationKey {
    Device,
    Tag(String),
}

/// Remembers the latest location per device (or tag value) and attaches it to events that
/// have none. Bounded: beyond `max_keys` the key with the oldest fix is forgotten.
pub struct LatestLocation {
    key: LocationKey,
    sources: Vec<String>,
    max_age_ns: i64,
    max_keys: usize,
    /// Key to (location, fix time in ns).
    fixes: Mutex<HashMap<String, (Location, i64)>>,
    evicted: Counter,
}

impl LatestLocation {
    fn key_of(&self, e: &Event) -> Option<String> {
        match &self.key {
            LocationKey::Device => Some(e.device.clone()),
            LocationKey::Tag(t) => e.tags.get(t).cloned(),
        }
    }
}

impl Stage for LatestLocation {
    fn apply(&self, mut e: Event) -> Verdict {
        let Some(key) = self.key_of(&e) else {
            return Verdict::Keep(e);
        };
        let mut fixes = self.fixes.lock().unwrap_or_else(|p| p.into_inner());
        match &e.location {
            Some(loc) => {
                if self.sources.is_empty() || self.sources.contains(&e.source) {
                    // A fix older than the one kept (a resend, a slow input) does not win.
                    let newer = fixes.get(&key).is_none_or(|(_, t)| e.time_ns >= *t);
                    if newer {
                        fixes.insert(key, (*loc, e.time_ns));
                    }
                    while fixes.len() > self.max_keys {
                        let oldest = fixes
                            .iter()
                            .min_by_key(|(_, (_, t))| *t)
                            .map(|(k, _)| k.clone());
                        let Some(oldest) = oldest else { break };
                        fixes.remove(&oldest);
                        self.evicted.inc();
                    }
                }
            }
            None => {
                if let Some((loc, t)) = fixes.get(&key) {
                    if e.time_ns.abs_diff(*t) <= self.max_age_ns.unsigned_abs() {
                        e.location = Some(*loc);
                        e.tags.insert("location".into(), "latest".into());
                    }
                }
            }
        }
        drop(fixes);
        Verdict::Keep(e)
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
            max_keys: *max_keys,
            fixes: Mutex::new(HashMap::new()),
            evicted,
        }),
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
    /// `<index>-<kind>`, e.g. `1-range`.
    pub stage: String,
    /// The reason label.
    pub reason: &'static str,
}

impl Chain {
    /// Builds a chain; errors name the stage.
    pub fn build(configs: &[StageConfig], metrics: Option<&Metrics>) -> Result<Chain, String> {
        let mut slots = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let label = format!("{i}-{}", c.kind());
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

    /// Runs an event through every stage.
    pub fn run(&self, mut e: Event) -> Result<Event, Dropped> {
        for s in &self.slots {
            s.events_in.inc();
            match s.stage.apply(e) {
                Verdict::Keep(next) => {
                    s.events_out.inc();
                    e = next;
                }
                Verdict::Drop(reason) => {
                    if let Some(m) = &self.metrics {
                        m.stage_dropped(&s.label, reason);
                    }
                    return Err(Dropped {
                        stage: s.label.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ClockQuality, Event};

    fn event(device: &str, topic: &str, temp: f64) -> Event {
        Event {
            id: "x".into(),
            device: device.into(),
            source: "in".into(),
            origin: topic.into(),
            time_ns: 0,
            clock: ClockQuality::Device,
            received_ns: 0,
            location: None,
            readings: [("temperature".to_string(), Value::Number(temp))].into(),
            tags: Default::default(),
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
        let chain = Chain::build(&list, None).expect("builds");
        match (chain.run(input), expected) {
            (Ok(e), Ok(tags)) => {
                for (k, v) in tags {
                    assert_eq!(e.tags.get(*k).map(String::as_str), Some(*v));
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
        Chain::build(&list, None).expect("builds")
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
        c.run(e).expect("kept").location.map(|l| l.lat)
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
        let e = c
            .run(located("pump-1", "serial", "a", 120, None))
            .expect("kept");
        assert_eq!(e.location.map(|l| l.lat), Some(52.5));
        assert_eq!(e.tags.get("location").map(String::as_str), Some("latest"));
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
            stage.apply(located(d, "gps", "s", i as i64, Some(i as f64)));
        }
        assert_eq!(evicted.get(), 1, "the oldest fix (a) was forgotten");
        let got = |d: &str| match stage.apply(located(d, "x", "s", 5, None)) {
            Verdict::Keep(e) => e.location.map(|l| l.lat),
            Verdict::Drop(r) => panic!("dropped: {r}"),
        };
        assert_eq!((got("a"), got("b"), got("c")), (None, Some(1.0), Some(2.0)));
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
