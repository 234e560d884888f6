//! `gps_sanity`: implausible fixes dropped; speed, heading and distance derived from a
//! device's consecutive fixes (haversine, from geo).

use std::sync::Mutex;

use gateway_config::GpsSanityStage;
use geo::{Bearing, Distance, Haversine, Point};
use prometheus_client::metrics::counter::Counter;

use super::state::{Bounded, CLOCK_RESET_NS};
use super::{Stage, Verdict};
use crate::event::{Event, Value};

/// A device's last accepted fix: (lon, lat, event time ns), and how many fixes in a row
/// were refused as impossible since.
type Fix = (f64, f64, i64, u8);

/// Implausible fixes in a row after which the newest becomes the device's position: a
/// wrong fix accepted first (nothing to compare it with) does not block the right ones.
const REANCHOR_AFTER: u8 = 3;

/// `gps_sanity`.
pub struct GpsSanity {
    max_speed: f64,
    max_accuracy: Option<f64>,
    derive: bool,
    last: Mutex<Bounded<Fix>>,
}

impl GpsSanity {
    /// From its (validated) config.
    pub fn new(c: &GpsSanityStage, evicted: Counter) -> GpsSanity {
        GpsSanity {
            max_speed: c.max_speed,
            max_accuracy: c.max_accuracy,
            derive: c.derive,
            last: Mutex::new(Bounded::new(c.max_devices, evicted)),
        }
    }
}

impl Stage for GpsSanity {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let Some(loc) = e.location else {
            return Verdict::Keep;
        };
        let (lat, lon) = (loc.lat, loc.lon);
        if !(lat.is_finite() && lon.is_finite()) || lat.abs() > 90.0 || lon.abs() > 180.0 {
            return Verdict::Drop("bad_fix");
        }
        if lat == 0.0 && lon == 0.0 {
            return Verdict::Drop("null_island");
        }
        if let (Some(max), Some(acc)) = (self.max_accuracy, loc.accuracy) {
            if acc > max {
                return Verdict::Drop("inaccurate_fix");
            }
        }
        let here = Point::new(lon, lat);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let previous = last.get_mut(&e.device).map(|f| *f);
        let mut derived = None;
        if let Some((plon, plat, pt, refused)) = previous {
            let metres = Haversine.distance(Point::new(plon, plat), here);
            let gap = e.time_ns.saturating_sub(pt);
            let secs = gap as f64 / 1e9;
            let impossible = if secs > 0.0 {
                let speed = metres / secs;
                let heading = Haversine.bearing(Point::new(plon, plat), here);
                derived = Some((speed, heading, metres));
                speed > self.max_speed
            } else {
                secs == 0.0 && metres > 0.0 // two places at once
            };
            if impossible {
                if refused + 1 < REANCHOR_AFTER {
                    if let Some(f) = last.get_mut(&e.device) {
                        f.3 = refused + 1;
                    }
                    return Verdict::Drop("impossible_speed");
                }
                derived = None; // re-anchored here: nothing to derive from
            } else if (-CLOCK_RESET_NS..0).contains(&gap) {
                // An older fix arriving late: kept, compared with nothing.
                drop(last);
                return Verdict::Keep;
            }
            // (More than an hour back: the clock was reset; start over from this fix.)
        }
        *last.entry(&e.device, || (lon, lat, e.time_ns, 0)) = (lon, lat, e.time_ns, 0);
        drop(last);
        if self.derive {
            if let Some((speed, heading, metres)) = derived {
                e.readings.insert("speed_mps".into(), Value::Number(speed));
                e.readings
                    .insert("distance_m".into(), Value::Number(metres));
                if metres > 0.0 {
                    e.readings
                        .insert("heading_deg".into(), Value::Number(heading));
                }
            }
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;
    use crate::event::Location;

    fn stage() -> GpsSanity {
        let gateway_config::Stage::GpsSanity(c) =
            parse("type='gps_sanity'\nmax_speed=50.0\nmax_accuracy=30.0")
        else {
            panic!()
        };
        GpsSanity::new(&c, Counter::default())
    }

    fn fix(lat: f64, lon: f64, s: i64, accuracy: Option<f64>) -> Event {
        let mut e = event("truck", "t", 1.0);
        e.time_ns = s * 1_000_000_000;
        e.location = Some(Location {
            lat,
            lon,
            alt: None,
            accuracy,
        });
        e
    }

    fn reading(v: &Applied, name: &str) -> Option<f64> {
        match v {
            Applied::Keep(e) => match e.readings.get(name) {
                Some(Value::Number(n)) => Some(*n),
                _ => None,
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn implausible_fixes_are_dropped_by_reason() {
        let g = stage();
        let mut m = Vec::new();
        assert_eq!(
            g.apply_owned(fix(0.0, 0.0, 0, None), &mut m),
            Applied::Drop("null_island")
        );
        assert_eq!(
            g.apply_owned(fix(91.0, 0.0, 0, None), &mut m),
            Applied::Drop("bad_fix")
        );
        assert_eq!(
            g.apply_owned(fix(52.0, 13.0, 0, Some(80.0)), &mut m),
            Applied::Drop("inaccurate_fix")
        );
        assert!(matches!(
            g.apply_owned(fix(52.0, 13.0, 0, None), &mut m),
            Applied::Keep(_)
        ));
        // 0.01 degrees of latitude is about 1.1 km: in 10 s that is 111 m/s.
        assert_eq!(
            g.apply_owned(fix(52.01, 13.0, 10, None), &mut m),
            Applied::Drop("impossible_speed")
        );
        // The first fix was the wrong one: after three refusals in a row the device's
        // position moves to where its fixes agree.
        assert_eq!(
            g.apply_owned(fix(52.01, 13.0, 11, None), &mut m),
            Applied::Drop("impossible_speed")
        );
        assert!(matches!(
            g.apply_owned(fix(52.01, 13.0, 12, None), &mut m),
            Applied::Keep(_)
        ));
        assert!(matches!(
            g.apply_owned(fix(52.0101, 13.0, 22, None), &mut m),
            Applied::Keep(_)
        ));
    }

    proptest::proptest! {
        /// Whatever fixes arrive, every fix that goes on is in range, not (0, 0), and (when
        /// it follows another by time) reports a speed no faster than the limit; unless
        /// three refusals in a row re-anchored the device there.
        #[test]
        fn what_goes_on_is_plausible(
            fixes in proptest::collection::vec((-91.0f64..91.0, -181.0f64..181.0, 0i64..30), 1..100)
        ) {
            let g = stage();
            let mut t = 0;
            for (lat, lon, step) in fixes {
                t += step;
                if let Applied::Keep(e) = g.apply_owned(fix(lat, lon, t, None), &mut Vec::new()) {
                    proptest::prop_assert!(lat.abs() <= 90.0 && lon.abs() <= 180.0);
                    proptest::prop_assert!(lat != 0.0 || lon != 0.0);
                    if let Some(Value::Number(speed)) = e.readings.get("speed_mps") {
                        proptest::prop_assert!(*speed <= 50.0, "{speed}");
                    }
                }
            }
        }
    }

    #[test]
    fn speed_heading_and_distance_are_derived() {
        let g = stage();
        let mut m = Vec::new();
        let first = g.apply_owned(fix(52.0, 13.0, 0, None), &mut m);
        assert_eq!(
            reading(&first, "speed_mps"),
            None,
            "nothing to compare with"
        );
        // Due north, 0.001 degrees (111 m) in 10 s.
        let v = g.apply_owned(fix(52.001, 13.0, 10, None), &mut m);
        let metres = reading(&v, "distance_m").expect("distance");
        assert!((metres - 111.2).abs() < 0.5, "{metres}");
        let speed = reading(&v, "speed_mps").expect("speed");
        assert!((speed - 11.12).abs() < 0.05, "{speed}");
        let heading = reading(&v, "heading_deg").expect("heading");
        assert!(
            heading.abs() < 0.01 || (heading - 360.0).abs() < 0.01,
            "{heading}"
        );
    }
}
