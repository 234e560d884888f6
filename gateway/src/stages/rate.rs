//! `throttle` (at most one event per device per interval) and `deadband` (only changes
//! larger than a threshold), both on event time, both per device with bounded state.

use std::collections::BTreeMap;
use std::sync::Mutex;

use gateway_config::{DeadbandStage, ThrottleStage};
use prometheus_client::metrics::counter::Counter;

use super::state::{Bounded, CLOCK_RESET_NS};
use super::{Stage, Verdict};
use crate::event::Event;

fn ns(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `throttle`.
pub struct Throttle {
    interval_ns: i64,
    last: Mutex<Bounded<i64>>,
}

impl Throttle {
    /// From its (validated) config.
    pub fn new(c: &ThrottleStage, evicted: Counter) -> Throttle {
        Throttle {
            interval_ns: ns(c.interval),
            last: Mutex::new(Bounded::new(c.max_devices, evicted)),
        }
    }
}

impl Stage for Throttle {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&e.device) {
            // The device's clock went back by more than an hour: start over.
            Some(t) if e.time_ns < t.saturating_sub(CLOCK_RESET_NS) => {
                *t = e.time_ns;
                Verdict::Keep
            }
            Some(t) if e.time_ns.saturating_sub(*t) < self.interval_ns => {
                Verdict::Drop("throttled")
            }
            Some(t) => {
                *t = e.time_ns;
                Verdict::Keep
            }
            None => {
                *last.entry(&e.device, || 0) = e.time_ns;
                Verdict::Keep
            }
        }
    }
}

/// Most reading names remembered per device (with `readings` empty every numeric reading
/// is watched, and a device sending ever new names would grow its entry for good).
const MAX_VALUES_PER_DEVICE: usize = 64;

/// What a device last sent on: the watched readings' values, and when.
struct Sent {
    values: BTreeMap<String, f64>,
    at_ns: i64,
}

/// `deadband`.
pub struct Deadband {
    readings: Vec<String>,
    threshold: f64,
    max_interval_ns: Option<i64>,
    last: Mutex<Bounded<Sent>>,
}

impl Deadband {
    /// From its (validated) config.
    pub fn new(c: &DeadbandStage, evicted: Counter) -> Deadband {
        Deadband {
            readings: c.readings.clone(),
            threshold: c.threshold,
            max_interval_ns: c.max_interval.map(ns),
            last: Mutex::new(Bounded::new(c.max_devices, evicted)),
        }
    }

    fn watched<'a>(&'a self, e: &'a Event) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        super::numeric(&self.readings, e)
    }
}

impl Stage for Deadband {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        if self.watched(e).next().is_none() {
            return Verdict::Keep; // nothing it watches: not its business
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let moved = match last.get_mut(&e.device) {
            None => true,
            Some(s) => {
                // The device's clock went back by more than an hour: start over, or
                // `max_interval` would wait until its clock catches up again.
                e.time_ns < s.at_ns.saturating_sub(CLOCK_RESET_NS)
                    || self
                        .max_interval_ns
                        .is_some_and(|m| e.time_ns.saturating_sub(s.at_ns) >= m)
                    || self.watched(e).any(|(k, v)| {
                        // A value that is not finite (a calibration that overflowed)
                        // always counts as moved: compared, it would never move again.
                        !v.is_finite()
                            || s.values
                                .get(k)
                                .is_none_or(|old| (v - old).abs() > self.threshold)
                    })
            }
        };
        if !moved {
            return Verdict::Drop("deadband");
        }
        let s = last.entry(&e.device, || Sent {
            values: BTreeMap::new(),
            at_ns: 0,
        });
        s.at_ns = e.time_ns;
        for (k, v) in self.watched(e).filter(|(_, v)| v.is_finite()) {
            if s.values.len() >= MAX_VALUES_PER_DEVICE && !s.values.contains_key(k) {
                s.values.clear();
            }
            s.values.insert(k.to_string(), v);
        }
        drop(last);
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;
    use proptest::prelude::*;

    fn at(device: &str, s: i64, temp: f64) -> Event {
        let mut e = event(device, "t", temp);
        e.time_ns = s * 1_000_000_000;
        e
    }

    fn kept(stage: &dyn Stage, e: Event) -> bool {
        matches!(stage.apply_owned(e, &mut Vec::new()), Applied::Keep(_))
    }

    #[test]
    fn throttle_keeps_one_per_interval_per_device() {
        let gateway_config::Stage::Throttle(c) = parse("type='throttle'\ninterval='10s'") else {
            panic!()
        };
        let t = Throttle::new(&c, Counter::default());
        assert!(kept(&t, at("a", 100, 1.0)));
        assert!(!kept(&t, at("a", 105, 1.0)));
        assert!(kept(&t, at("b", 105, 1.0)), "per device");
        assert!(kept(&t, at("a", 110, 1.0)));
        assert!(!kept(&t, at("a", 90, 1.0)), "late events do not reset it");
        // A glitch far ahead does not silence the device for good.
        assert!(kept(&t, at("c", 1_000_000, 1.0)));
        assert!(
            kept(&t, at("c", 100, 1.0)),
            "an hour back: its clock was reset"
        );
        assert!(!kept(&t, at("c", 105, 1.0)));
    }

    #[test]
    fn deadband_forwards_changes_and_heartbeats() {
        let gateway_config::Stage::Deadband(c) =
            parse("type='deadband'\nreadings=['temperature']\nthreshold=0.5\nmax_interval='1m'")
        else {
            panic!()
        };
        let d = Deadband::new(&c, Counter::default());
        assert!(kept(&d, at("a", 0, 20.0)));
        assert!(!kept(&d, at("a", 1, 20.4)));
        assert!(
            !kept(&d, at("a", 2, 19.6)),
            "compared with the last sent, 20.0"
        );
        assert!(kept(&d, at("a", 3, 20.6)));
        assert!(!kept(&d, at("a", 4, 20.9)));
        assert!(kept(&d, at("a", 63, 20.9)), "max_interval passed");
        let mut other = at("a", 64, 20.9);
        other.readings.clear();
        assert!(kept(&d, other), "no watched reading: passed on");
        // A glitch far ahead does not hold the heartbeat back until the clock gets there.
        assert!(kept(&d, at("b", 1_000_000, 20.0)));
        assert!(
            kept(&d, at("b", 100, 20.0)),
            "an hour back: its clock was reset"
        );
    }

    #[test]
    fn deadband_remembers_a_bounded_number_of_readings_per_device() {
        let gateway_config::Stage::Deadband(c) = parse("type='deadband'\nthreshold=0.5") else {
            panic!()
        };
        let d = Deadband::new(&c, Counter::default());
        for i in 0..10_000 {
            let mut e = at("a", i, 0.0);
            e.readings.clear();
            e.readings
                .insert(format!("r{i}").into(), crate::event::Value::Number(1.0));
            assert!(kept(&d, e), "a new name goes on");
        }
        let last = d.last.lock().expect("lock");
        let n = last.peek("a").map_or(0, |s| s.values.len());
        assert!(n <= MAX_VALUES_PER_DEVICE, "{n} names remembered");
    }

    proptest! {
        /// Throttle keeps exactly the events a model keeps: per device, the first one,
        /// then each one at least `interval` after the last one kept.
        #[test]
        fn throttle_matches_a_model(steps in proptest::collection::vec((0u8..4, 0i64..7), 1..300)) {
            let gateway_config::Stage::Throttle(c) = parse("type='throttle'\ninterval='5s'") else {
                panic!()
            };
            let t = Throttle::new(&c, Counter::default());
            let mut last: std::collections::HashMap<u8, i64> = Default::default();
            let mut now = 0;
            for (device, step) in steps {
                now += step;
                let expect = last.get(&device).is_none_or(|l| now - l >= 5);
                if expect {
                    last.insert(device, now);
                }
                prop_assert_eq!(kept(&t, at(&device.to_string(), now, 1.0)), expect);
            }
        }

        /// Every value that goes on differs from the previous one that went on by more
        /// than the threshold (no heartbeat configured), and every dropped one does not.
        #[test]
        fn deadband_matches_a_model(values in proptest::collection::vec(-10.0f64..10.0, 1..200)) {
            let gateway_config::Stage::Deadband(c) = parse("type='deadband'\nthreshold=1.0") else {
                panic!()
            };
            let d = Deadband::new(&c, Counter::default());
            let mut sent: Option<f64> = None;
            for (i, v) in values.into_iter().enumerate() {
                let expect = sent.is_none_or(|s| (v - s).abs() > 1.0);
                prop_assert_eq!(kept(&d, at("a", i as i64, v)), expect);
                if expect {
                    sent = Some(v);
                }
            }
        }
    }
}
