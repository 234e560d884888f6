//! `validate` (required fields, ranges, timestamp sanity) and `dedup` (event ids seen
//! within a window).

use std::collections::VecDeque;
use std::sync::Mutex;

use gateway_config::{Bounds, DedupStage, RejectAction, ValidateStage};
use prometheus_client::metrics::counter::Counter;

use super::state::FastMap;
use super::{Stage, Verdict};
use crate::event::{now_ns, Event, Value};

enum Field {
    Location,
    Reading(String),
    Tag(String),
}

/// `validate`.
pub struct Validate {
    required: Vec<(Field, String)>,
    ranges: Vec<(String, Bounds)>,
    max_future_ns: i64,
    max_past_ns: i64,
    action: RejectAction,
    now: fn() -> i64,
}

fn ns(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Validate {
    /// From its (validated) config.
    pub fn new(c: &ValidateStage) -> Validate {
        let required = c
            .required
            .iter()
            .map(|r| {
                let field = match (r.strip_prefix("readings."), r.strip_prefix("tags.")) {
                    (Some(n), _) => Field::Reading(n.to_string()),
                    (_, Some(n)) => Field::Tag(n.to_string()),
                    _ => Field::Location,
                };
                (field, r.clone())
            })
            .collect();
        Validate {
            required,
            ranges: c.ranges.iter().map(|(k, b)| (k.clone(), *b)).collect(),
            max_future_ns: ns(c.max_future),
            max_past_ns: ns(c.max_past),
            action: c.action,
            now: now_ns,
        }
    }

    fn check(&self, e: &Event) -> Result<(), (&'static str, String)> {
        for (field, name) in &self.required {
            let present = match field {
                Field::Location => e.location.is_some(),
                Field::Reading(r) => e.readings.contains_key(r.as_str()),
                Field::Tag(t) => e.tags.contains_key(t.as_str()),
            };
            if !present {
                return Err(("missing_field", format!("{name} is missing")));
            }
        }
        for (reading, b) in &self.ranges {
            if let Some(Value::Number(v)) = e.readings.get(reading.as_str()) {
                if b.min.is_some_and(|m| *v < m) || b.max.is_some_and(|m| *v > m) || v.is_nan() {
                    return Err((
                        "out_of_range",
                        format!("{reading} = {v} is outside {:?}..{:?}", b.min, b.max),
                    ));
                }
            }
        }
        let now = (self.now)();
        if e.time_ns > now.saturating_add(self.max_future_ns) {
            let ahead = (e.time_ns - now) as f64 / 1e9;
            return Err((
                "time_in_future",
                format!("event time {ahead:.0} s ahead of the gateway's clock"),
            ));
        }
        if e.time_ns < now.saturating_sub(self.max_past_ns) {
            let behind = now.saturating_sub(e.time_ns) as f64 / 1e9;
            return Err(("time_too_old", format!("event time {behind:.0} s old")));
        }
        Ok(())
    }
}

impl Stage for Validate {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        match self.check(e) {
            Ok(()) => Verdict::Keep,
            Err((reason, _)) if self.action == RejectAction::Drop => Verdict::Drop(reason),
            Err((reason, detail)) => Verdict::Reject { reason, detail },
        }
    }
}

/// Ids seen, oldest first (by the gateway's receive time), as 64-bit hashes.
struct Seen {
    at: FastMap<u64, i64>,
    order: VecDeque<(i64, u64)>,
}

/// `dedup`.
pub struct Dedup {
    window_ns: i64,
    max: usize,
    seen: Mutex<Seen>,
    evicted: Counter,
}

impl Dedup {
    /// From its (validated) config.
    pub fn new(c: &DedupStage, evicted: Counter) -> Dedup {
        Dedup {
            window_ns: ns(c.window),
            max: c.max_entries.max(1),
            seen: Mutex::new(Seen {
                at: FastMap::default(),
                order: VecDeque::new(),
            }),
            evicted,
        }
    }
}

impl Stage for Dedup {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let h = xxhash_rust::xxh3::xxh3_64(e.id.as_bytes());
        let now = e.received_ns;
        let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let Seen { at, order } = &mut *s;
        // Forget what left the window (not an eviction: it expired).
        while let Some(&(t, old)) = order.front() {
            if t >= now.saturating_sub(self.window_ns) {
                break;
            }
            order.pop_front();
            if at.get(&old) == Some(&t) {
                at.remove(&old);
            }
        }
        // A redelivery is passed on (see `Event::redelivered`); consumers drop it by id.
        if !e.redelivered
            && at
                .get(&h)
                .is_some_and(|&t| now.saturating_sub(t) <= self.window_ns)
        {
            return Verdict::Drop("dedup");
        }
        while at.len() >= self.max {
            let Some((t, old)) = order.pop_front() else {
                break;
            };
            if at.get(&old) == Some(&t) {
                at.remove(&old);
                self.evicted.inc();
            }
        }
        at.insert(h, now);
        order.push_back((now, h));
        // An id taken again (a redelivery) leaves its older entry behind in `order`, and
        // a clock that went back stalls the expiry at the front: keep `order` within
        // twice the bound by dropping the entries `at` no longer points to.
        if order.len() > 2 * self.max {
            order.retain(|(t, old)| at.get(old) == Some(t));
        }
        drop(s);
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;
    use proptest::prelude::*;

    fn validate(toml: &str, now: i64) -> Validate {
        let gateway_config::Stage::Validate(c) = parse(toml) else {
            panic!("not a validate stage")
        };
        let mut v = Validate::new(&c);
        v.now = if now == 0 { || 0 } else { now_ns };
        v
    }

    #[test]
    fn required_fields_ranges_and_time() {
        let v = validate(
            "type='validate'\nrequired=['location','readings.temperature','tags.site']\nranges={temperature={min=-40.0,max=125.0}}\nmax_future='1m'\nmax_past='1h'",
            0,
        );
        let mut e = event("d", "t", 20.0);
        let reason = |v: &Validate, e: &Event| v.check(e).err().map(|(r, _)| r);
        assert_eq!(reason(&v, &e), Some("missing_field"));
        e.location = Some(crate::event::Location {
            lat: 1.0,
            lon: 2.0,
            alt: None,
            accuracy: None,
        });
        e.tags.insert("site".into(), "a".into());
        assert_eq!(reason(&v, &e), None);
        e.readings
            .insert("temperature".into(), Value::Number(130.0));
        assert_eq!(reason(&v, &e), Some("out_of_range"));
        e.readings
            .insert("temperature".into(), Value::Number(f64::NAN));
        assert_eq!(reason(&v, &e), Some("out_of_range"));
        e.readings.insert("temperature".into(), Value::Number(10.0));
        e.time_ns = 61_000_000_000;
        assert_eq!(reason(&v, &e), Some("time_in_future"));
        e.time_ns = -3_601_000_000_000;
        assert_eq!(reason(&v, &e), Some("time_too_old"));
        e.time_ns = -3_599_000_000_000;
        assert_eq!(reason(&v, &e), None);
    }

    #[test]
    fn dead_letter_keeps_the_event_and_the_reason() {
        let v = validate(
            "type='validate'\nrequired=['tags.site']\naction='dead_letter'",
            1,
        );
        let mut e = event("d", "t", 20.0);
        e.time_ns = now_ns();
        match v.apply_owned(e, &mut Vec::new()) {
            Applied::Reject { reason, detail, .. } => {
                assert_eq!(reason, "missing_field");
                assert!(detail.contains("tags.site"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn dedup(window: &str, max: usize) -> (Dedup, Counter) {
        let gateway_config::Stage::Dedup(c) = parse(&format!(
            "type='dedup'\nwindow='{window}'\nmax_entries={max}"
        )) else {
            panic!()
        };
        let evicted = Counter::default();
        (Dedup::new(&c, evicted.clone()), evicted)
    }

    fn seen(d: &Dedup, id: &str, at_s: i64) -> bool {
        let mut e = event("d", "t", 1.0);
        e.id = id.into();
        e.received_ns = at_s * 1_000_000_000;
        matches!(d.apply_owned(e, &mut Vec::new()), Applied::Drop("dedup"))
    }

    #[test]
    fn duplicates_within_the_window_are_dropped() {
        let (d, _) = dedup("10s", 100);
        assert!(!seen(&d, "a", 100));
        assert!(seen(&d, "a", 105));
        assert!(!seen(&d, "b", 105));
        assert!(seen(&d, "a", 110));
        assert!(!seen(&d, "a", 111), "the window ran out");
    }

    /// A broker's redelivery (MQTT DUP) is passed on: the first copy may still be on its
    /// way to the spool or Kafka, and a drop would release the redelivery's ack.
    #[test]
    fn a_redelivery_is_passed_on() {
        let (d, _) = dedup("10s", 100);
        assert!(!seen(&d, "a", 100));
        let mut again = event("d", "t", 1.0);
        again.id = "a".into();
        again.received_ns = 101 * 1_000_000_000;
        again.redelivered = true;
        assert!(matches!(
            d.apply_owned(again, &mut Vec::new()),
            Applied::Keep(_)
        ));
        assert!(seen(&d, "a", 102), "a plain repeat still is dropped");
    }

    /// Redeliveries of one id, and a clock gone back, do not grow the expiry queue past
    /// twice the bound.
    #[test]
    fn the_expiry_queue_stays_bounded() {
        let (d, _) = dedup("1h", 10);
        let mut again = event("d", "t", 1.0);
        again.id = "a".into();
        again.redelivered = true;
        for i in 0..1000 {
            // The clock goes back by a second each time: nothing expires.
            again.received_ns = (5000 - i) * 1_000_000_000;
            d.apply_owned(again.clone(), &mut Vec::new());
        }
        let s = d.seen.lock().expect("lock");
        assert!(s.order.len() <= 20, "{} entries", s.order.len());
        assert_eq!(s.at.len(), 1);
    }

    proptest! {
        /// Within its bound, dedup drops exactly the repeats inside the window; it never
        /// holds more than `max_entries` ids.
        #[test]
        fn matches_a_model(ids in proptest::collection::vec((0u8..20, 0i64..3), 1..300)) {
            let (d, evicted) = dedup("5s", 1000);
            let mut model: std::collections::HashMap<u8, i64> = Default::default();
            let mut t = 0;
            for (id, step) in ids {
                t += step;
                let dup = model.get(&id).is_some_and(|&s| t - s <= 5);
                if !dup {
                    model.insert(id, t);
                }
                prop_assert_eq!(seen(&d, &id.to_string(), t), dup);
            }
            prop_assert_eq!(evicted.get(), 0);
            let (small, evicted) = dedup("1h", 4);
            for i in 0..50 {
                seen(&small, &i.to_string(), i);
                prop_assert!(small.seen.lock().map(|s| s.at.len()).unwrap_or(0) <= 4);
            }
            prop_assert_eq!(evicted.get(), 46);
        }
    }
}
