//! Stages: synchronous functions over events, run in order by a [`Chain`].
//!
//! A stage does no I/O and holds no runtime: it takes an event and keeps it (possibly
//! changed) or drops it with a reason. The chain counts, per stage, events in, out and
//! dropped by reason. Stages run in the input's task, before the router.

use gateway_config::{MatchSpec, RangeAction, Stage as StageConfig, TopicTemplate};
use prometheus_client::metrics::counter::Counter;

use crate::event::{Event, Value};
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
pub fn build(c: &StageConfig) -> Result<Box<dyn Stage>, String> {
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
            let stage = build(c).map_err(|e| format!("stages[{i}] ({}): {e}", c.kind()))?;
            let (events_in, events_out) = match metrics {
                Some(m) => (m.stage_in(&label), m.stage_out(&label)),
                None => (Counter::default(), Counter::default()),
            };
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
