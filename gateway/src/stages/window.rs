//! `window`: tumbling windows of event time per device. Each window keeps, per reading,
//! count, min, max, sum, first and last; when it closes one summary event goes on.
//!
//! A window `[start, start + size)` closes when the device's newest event time passes
//! `start + size + allowed_lateness` (an event for it after that is `late`), when the
//! device was idle (the gateway's monotonic clock) for `idle_timeout`, when the device is evicted to keep
//! the state bounded, or when the pipeline is replaced or stops (`flush`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use gateway_config::{Aggregate, WindowStage};
use prometheus_client::metrics::counter::Counter;

use super::state::{Bounded, CLOCK_RESET_NS};
use super::{mono_ns, Stage, Verdict};
use crate::event::{now_ns, rfc3339, ClockQuality, Event, Fields, Location, Value};
use compact_str::{CompactString, ToCompactString};

fn ns(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// One reading's running aggregates.
#[derive(Debug, Clone)]
struct Agg {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    first: (i64, f64),
    last: (i64, f64),
}

impl Agg {
    fn new(t: i64, v: f64) -> Agg {
        Agg {
            count: 1,
            min: v,
            max: v,
            sum: v,
            first: (t, v),
            last: (t, v),
        }
    }

    fn add(&mut self, t: i64, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if t < self.first.0 {
            self.first = (t, v);
        }
        if t >= self.last.0 {
            self.last = (t, v);
        }
    }

    fn get(&self, a: Aggregate) -> f64 {
        match a {
            Aggregate::Count => self.count as f64,
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Mean => self.sum / self.count as f64,
            Aggregate::First => self.first.1,
            Aggregate::Last => self.last.1,
        }
    }
}

/// One open window of a device.
struct Open {
    readings: BTreeMap<String, Agg>,
    /// The latest location in it, by event time.
    location: Option<(i64, Location)>,
    events: u64,
}

/// A device's open windows.
struct Device {
    windows: BTreeMap<i64, Open>,
    newest_ns: i64,
    /// Every window ending at or before this was emitted: events for them are late.
    closed_until: i64,
    /// When the device last sent, on [`mono_ns`]'s clock.
    seen_ns: i64,
    source: CompactString,
    origin: CompactString,
    clock: ClockQuality,
    tags: Fields<CompactString>,
}

/// `window`.
pub struct Window {
    size_ns: i64,
    size_text: String,
    readings: Vec<String>,
    aggregates: Vec<Aggregate>,
    lateness_ns: i64,
    idle_ns: i64,
    keep_events: bool,
    devices: Mutex<Bounded<Device>>,
}

impl Window {
    /// From its (validated) config.
    pub fn new(c: &WindowStage, evicted: Counter) -> Window {
        let size_ns = ns(c.size).max(1);
        Window {
            size_ns,
            size_text: humantime::format_duration(c.size).to_string(),
            readings: c.readings.clone(),
            aggregates: c.aggregates.clone(),
            lateness_ns: ns(c.allowed_lateness),
            idle_ns: c.idle_timeout.map_or(size_ns.saturating_mul(2), ns),
            keep_events: c.keep_events,
            devices: Mutex::new(Bounded::new(c.max_devices, evicted)),
        }
    }

    fn watched<'a>(&'a self, e: &'a Event) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        super::numeric(&self.readings, e)
    }

    /// The summary event of one closed window.
    fn summary(&self, device: &str, d: &Device, start: i64, w: Open) -> Event {
        let mut readings = Fields::new();
        for (name, agg) in &w.readings {
            for a in &self.aggregates {
                readings.insert(
                    compact_str::format_compact!("{name}_{}", a.name()),
                    Value::Number(agg.get(*a)),
                );
            }
        }
        let mut tags = d.tags.clone();
        tags.insert("window".into(), self.size_text.as_str().into());
        tags.insert("window_start".into(), rfc3339(start).into());
        tags.insert(
            "window_end".into(),
            rfc3339(start.saturating_add(self.size_ns)).into(),
        );
        tags.insert("window_events".into(), w.events.to_compact_string());
        Event {
            id: compact_str::format_compact!("{device}:window:{start}"),
            device: device.into(),
            source: d.source.clone(),
            origin: d.origin.clone(),
            time_ns: start,
            clock: d.clock,
            received_ns: now_ns(),
            location: w.location.map(|(_, l)| l),
            readings,
            tags,
            route: None,
            redelivered: false,
        }
    }

    /// Emits the windows of `d` that end at or before `until` (all of them: `i64::MAX`).
    fn close(&self, device: &str, d: &mut Device, until: i64, made: &mut Vec<Event>) {
        while let Some(entry) = d.windows.first_entry() {
            let start = *entry.key();
            if start.saturating_add(self.size_ns) > until {
                break;
            }
            let w = entry.remove();
            d.closed_until = d.closed_until.max(start.saturating_add(self.size_ns));
            made.push(self.summary(device, d, start, w));
        }
    }
}

impl Stage for Window {
    fn apply(&self, e: &mut Event, made: &mut Vec<Event>) -> Verdict {
        if self.watched(e).next().is_none() {
            return Verdict::Keep; // nothing to summarise: not its business
        }
        // The window's start: the event time rounded down to a multiple of the size (no
        // overflow, whatever time a device sends).
        let start = e.time_ns.saturating_sub(e.time_ns.rem_euclid(self.size_ns));
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for (device, mut d) in devices.make_room(&e.device) {
            self.close(&device, &mut d, i64::MAX, made);
        }
        let d = devices.entry(&e.device, || Device {
            windows: BTreeMap::new(),
            newest_ns: i64::MIN,
            closed_until: i64::MIN,
            seen_ns: 0,
            source: e.source.clone(),
            origin: e.origin.clone(),
            clock: e.clock,
            tags: e.tags.clone(),
        });
        d.seen_ns = mono_ns();
        // A summary carries what its device's latest event said (a tag a stage before
        // set, say), not what its first one ever did.
        if d.tags != e.tags {
            d.tags = e.tags.clone();
        }
        if d.origin != e.origin {
            d.origin = e.origin.clone();
        }
        if d.source != e.source {
            d.source = e.source.clone();
        }
        d.clock = e.clock;
        if e.time_ns
            < d.newest_ns
                .saturating_sub(self.lateness_ns.saturating_add(CLOCK_RESET_NS))
        {
            // The device's clock went back by more than an hour (or an earlier event was
            // a glitch far ahead): emit what is open and start over.
            self.close(&e.device, d, i64::MAX, made);
            d.newest_ns = i64::MIN;
            d.closed_until = i64::MIN;
        }
        let watermark = d.newest_ns.saturating_sub(self.lateness_ns);
        if start.saturating_add(self.size_ns) <= watermark || start < d.closed_until {
            drop(devices);
            return if self.keep_events {
                Verdict::Keep
            } else {
                Verdict::Drop("late")
            };
        }
        let w = d.windows.entry(start).or_insert_with(|| Open {
            readings: BTreeMap::new(),
            location: None,
            events: 0,
        });
        w.events += 1;
        for (k, v) in self.watched(e) {
            match w.readings.get_mut(k) {
                Some(a) => a.add(e.time_ns, v),
                None => {
                    w.readings.insert(k.to_string(), Agg::new(e.time_ns, v));
                }
            }
        }
        if let Some(l) = e.location {
            if w.location.is_none_or(|(t, _)| e.time_ns >= t) {
                w.location = Some((e.time_ns, l));
            }
        }
        d.newest_ns = d.newest_ns.max(e.time_ns);
        let watermark = d.newest_ns.saturating_sub(self.lateness_ns);
        self.close(&e.device, d, watermark, made);
        drop(devices);
        if self.keep_events {
            Verdict::Keep
        } else {
            Verdict::Drop("windowed")
        }
    }

    fn tick(&self, now_ns: i64, flush: bool, made: &mut Vec<Event>) {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices.retain(|device, d| {
            let idle = now_ns.saturating_sub(d.seen_ns);
            if flush || idle >= self.idle_ns {
                self.close(device, d, i64::MAX, made);
            }
            // An idle device is remembered (so that a straggler for a window already
            // emitted is late, not a second summary) for ten idle timeouts.
            let forgotten = d.windows.is_empty() && idle >= self.idle_ns.saturating_mul(10);
            !(flush || forgotten)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;
    use proptest::prelude::*;

    fn window(toml: &str) -> (Window, Counter) {
        let gateway_config::Stage::Window(c) = parse(toml) else {
            panic!()
        };
        let evicted = Counter::default();
        (Window::new(&c, evicted.clone()), evicted)
    }

    fn at(device: &str, ms: i64, temp: f64) -> Event {
        let mut e = event(device, "t", temp);
        e.time_ns = ms * 1_000_000;
        e
    }

    fn feed(w: &Window, e: Event) -> Vec<Event> {
        let mut made = Vec::new();
        let _ = w.apply_owned(e, &mut made);
        made
    }

    fn reading(e: &Event, name: &str) -> f64 {
        match e.readings.get(name) {
            Some(Value::Number(n)) => *n,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn a_window_closes_with_its_aggregates_once_event_time_passes_it() {
        let (w, _) = window("type='window'\nsize='10s'\nallowed_lateness='2s'");
        assert!(feed(&w, at("a", 1_000, 4.0)).is_empty());
        assert!(feed(&w, at("a", 9_000, 8.0)).is_empty());
        assert!(
            feed(&w, at("a", 3_000, 6.0)).is_empty(),
            "out of order, same window"
        );
        assert!(
            feed(&w, at("a", 11_000, 1.0)).is_empty(),
            "within the lateness"
        );
        assert!(feed(&w, at("a", 5_000, 2.0)).is_empty(), "late but allowed");
        let out = feed(&w, at("a", 12_500, 1.0));
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.id, "a:window:0");
        assert_eq!(s.time_ns, 0);
        assert_eq!(reading(s, "temperature_count"), 4.0);
        assert_eq!(reading(s, "temperature_min"), 2.0);
        assert_eq!(reading(s, "temperature_max"), 8.0);
        assert_eq!(reading(s, "temperature_mean"), 5.0);
        assert_eq!(reading(s, "temperature_first"), 4.0);
        assert_eq!(reading(s, "temperature_last"), 8.0);
        assert_eq!(s.tags["window"], "10s");
        assert_eq!(
            w.apply_owned(at("a", 4_000, 1.0), &mut Vec::new()),
            Applied::Drop("late")
        );
    }

    #[test]
    fn idle_devices_and_flush_release_their_windows() {
        let (w, _) = window("type='window'\nsize='1m'\nidle_timeout='5s'\naggregates=['count']");
        feed(&w, at("a", 1_000, 1.0));
        feed(&w, at("b", 1_000, 1.0));
        let mut made = Vec::new();
        w.tick(mono_ns(), false, &mut made);
        assert!(made.is_empty(), "not idle yet");
        w.tick(mono_ns() + 6_000_000_000, false, &mut made);
        assert_eq!(made.len(), 2);
        assert_eq!(
            w.apply_owned(at("a", 2_000, 1.0), &mut Vec::new()),
            Applied::Drop("late"),
            "its window was emitted already"
        );
        feed(&w, at("a", 61_000, 1.0));
        made.clear();
        w.tick(mono_ns(), true, &mut made);
        assert_eq!(made.len(), 1, "flush");
        assert_eq!(made[0].id, "a:window:60000000000");
        assert_eq!(made[0].readings.len(), 1, "only count");
    }

    #[test]
    fn a_summary_carries_the_latest_events_tags() {
        let (w, _) = window("type='window'\nsize='1m'\naggregates=['count']");
        let mut first = at("a", 1_000, 1.0);
        first
            .tags
            .insert("out_of_range".into(), "temperature".into());
        feed(&w, first);
        feed(&w, at("a", 2_000, 1.0));
        let mut made = Vec::new();
        w.tick(mono_ns(), true, &mut made);
        assert_eq!(made.len(), 1);
        assert!(
            !made[0].tags.contains_key("out_of_range"),
            "{:?}",
            made[0].tags
        );
    }

    #[test]
    fn an_evicted_device_has_its_windows_emitted() {
        let (w, evicted) = window("type='window'\nsize='1m'\nmax_devices=2");
        feed(&w, at("a", 1_000, 1.0));
        feed(&w, at("b", 1_000, 1.0));
        let out = feed(&w, at("c", 1_000, 1.0));
        assert_eq!(evicted.get(), 1);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].device, "a");
    }

    proptest! {
        /// Whatever the order of events within the lateness, every event lands in exactly
        /// one summary, and the counts add up.
        #[test]
        fn every_event_is_counted_once(times in proptest::collection::vec(0i64..100_000, 1..200)) {
            let (w, _) = window("type='window'\nsize='7s'\nallowed_lateness='200s'\naggregates=['count','min','max']");
            let mut made = Vec::new();
            for (i, t) in times.iter().enumerate() {
                let _ = w.apply_owned(at("a", *t, i as f64), &mut made);
            }
            w.tick(0, true, &mut made);
            let total: f64 = made.iter().map(|s| reading(s, "temperature_count")).sum();
            prop_assert_eq!(total as usize, times.len());
            for s in &made {
                prop_assert!(reading(s, "temperature_min") <= reading(s, "temperature_max"));
                prop_assert_eq!(s.time_ns.rem_euclid(7_000_000_000), 0);
            }
        }
    }
}
