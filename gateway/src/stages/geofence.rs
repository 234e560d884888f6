//! `geofence`: zones from GeoJSON, an R-tree over their bounding boxes, exact
//! point-in-polygon tests on the few candidates, zone tags, and enter / exit events per
//! device with dwell-time hysteresis.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Mutex;

use gateway_config::GeofenceStage;
use geo::{BoundingRect, Intersects, MultiPolygon, Point};
use geojson::{GeoJson, GeometryValue};
use prometheus_client::metrics::counter::Counter;
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::RTree;

use super::state::Bounded;
use super::state::CLOCK_RESET_NS;
use super::{Stage, Verdict};
use crate::event::{Event, Fields};

/// A zone's bounding box in the R-tree, with the zone's index.
type Entry = GeomWithData<Rectangle<[f64; 2]>, usize>;

struct Zone {
    name: String,
    shape: MultiPolygon<f64>,
}

/// A device's zones: the ones it is in (confirmed), and changes waiting out the dwell
/// time (zone → (since, entering)).
#[derive(Default)]
struct Presence {
    inside: BTreeSet<usize>,
    pending: BTreeMap<usize, (i64, bool)>,
}

/// `geofence`.
pub struct Geofence {
    zones: Vec<Zone>,
    tree: RTree<Entry>,
    tag: String,
    transitions: bool,
    dwell_ns: i64,
    devices: Mutex<Bounded<Presence>>,
}

/// Reads zones from GeoJSON text: a FeatureCollection, a Feature or a bare geometry;
/// Polygon and MultiPolygon only.
fn zones(text: &str, name_property: &str) -> Result<Vec<Zone>, String> {
    let gj = GeoJson::from_str(text).map_err(|e| format!("not GeoJSON: {e}"))?;
    let features: Vec<(Option<String>, Option<geojson::Geometry>)> = match gj {
        GeoJson::FeatureCollection(fc) => fc
            .features
            .into_iter()
            .map(|f| {
                let name = f
                    .properties
                    .as_ref()
                    .and_then(|p| p.get(name_property))
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
                (name, f.geometry)
            })
            .collect(),
        GeoJson::Feature(f) => {
            let name = f
                .properties
                .as_ref()
                .and_then(|p| p.get(name_property))
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
            vec![(name, f.geometry)]
        }
        GeoJson::Geometry(g) => vec![(None, Some(g))],
    };
    let mut out = Vec::with_capacity(features.len());
    for (i, (name, geometry)) in features.into_iter().enumerate() {
        let name = name.unwrap_or_else(|| format!("zone-{i}"));
        let Some(g) = geometry else {
            return Err(format!("feature {i} ({name}) has no geometry"));
        };
        let shape: MultiPolygon<f64> = match &g.value {
            GeometryValue::Polygon { .. } => {
                MultiPolygon::new(vec![geo::Polygon::try_from(&g.value)
                    .map_err(|e| format!("feature {i} ({name}): {e}"))?])
            }
            GeometryValue::MultiPolygon { .. } => MultiPolygon::try_from(&g.value)
                .map_err(|e| format!("feature {i} ({name}): {e}"))?,
            other => {
                return Err(format!(
                    "feature {i} ({name}) is a {}; zones are Polygon or MultiPolygon",
                    other.type_name()
                ))
            }
        };
        if shape.bounding_rect().is_none() {
            return Err(format!("feature {i} ({name}) is empty"));
        }
        out.push(Zone { name, shape });
    }
    Ok(out)
}

impl Geofence {
    /// Loads and indexes the zones.
    pub fn new(c: &GeofenceStage, evicted: Counter) -> Result<Geofence, String> {
        let text = match (&c.file, &c.geojson) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| format!("file {}: {e}", path.display()))?,
            (None, Some(inline)) => inline.clone(),
            (None, None) => return Err("give file or geojson".into()),
        };
        let zones = zones(&text, &c.name_property)?;
        let entries = zones
            .iter()
            .enumerate()
            .filter_map(|(i, z)| {
                let r = z.shape.bounding_rect()?;
                Some(GeomWithData::new(
                    Rectangle::from_corners([r.min().x, r.min().y], [r.max().x, r.max().y]),
                    i,
                ))
            })
            .collect();
        Ok(Geofence {
            zones,
            tree: RTree::bulk_load(entries),
            tag: c.tag.clone(),
            transitions: c.transitions,
            dwell_ns: i64::try_from(c.dwell.as_nanos()).unwrap_or(i64::MAX),
            devices: Mutex::new(Bounded::new(c.max_devices, evicted)),
        })
    }

    /// The zones (indices, sorted) that contain `lon`, `lat` (the border counts as in).
    pub fn locate(&self, lon: f64, lat: f64) -> Vec<usize> {
        let p = Point::new(lon, lat);
        let mut hits: Vec<usize> = self
            .tree
            .locate_all_at_point(&[lon, lat])
            .map(|entry| entry.data)
            .filter(|&i| self.zones[i].shape.intersects(&p))
            .collect();
        hits.sort_unstable();
        hits
    }

    fn transition(&self, e: &Event, zone: usize, enter: bool) -> Event {
        let name = &self.zones[zone].name;
        let what = if enter { "enter" } else { "exit" };
        let mut tags = e.tags.clone();
        tags.insert("geofence".into(), what.into());
        tags.insert("zone".into(), name.as_str().into());
        Event {
            id: compact_str::format_compact!("{}:{what}:{name}", e.id),
            device: e.device.clone(),
            source: e.source.clone(),
            origin: e.origin.clone(),
            time_ns: e.time_ns,
            clock: e.clock,
            received_ns: e.received_ns,
            location: e.location,
            readings: Fields::new(),
            tags,
            route: None,
            redelivered: false,
        }
    }

    /// Updates the device's presence with the zones it is in now, emitting confirmed
    /// changes.
    fn track(&self, e: &Event, now_in: &[usize], made: &mut Vec<Event>) {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let p = devices.entry(&e.device, Presence::default);
        if p.pending.is_empty() && p.inside.iter().eq(now_in.iter()) {
            return; // where it was: nothing to do (the common case)
        }
        let t = e.time_ns;
        // Changes that reverted before their dwell ran out: the device stayed.
        p.pending
            .retain(|z, (_, entering)| now_in.contains(z) == *entering);
        let entering = now_in.iter().filter(|z| !p.inside.contains(z));
        let leaving = p.inside.iter().filter(|z| !now_in.contains(z));
        let changes: Vec<(usize, bool)> = entering
            .map(|z| (*z, true))
            .chain(leaving.map(|z| (*z, false)))
            .collect();
        for (z, enter) in changes {
            let pending = p.pending.entry(z).or_insert((t, enter));
            // The device's clock went back by more than an hour: the dwell starts over,
            // or it would wait until the clock caught up again.
            if t < pending.0.saturating_sub(CLOCK_RESET_NS) {
                pending.0 = t;
            }
            let since = pending.0;
            if t.saturating_sub(since) >= self.dwell_ns {
                p.pending.remove(&z);
                if enter {
                    p.inside.insert(z);
                } else {
                    p.inside.remove(&z);
                }
                made.push(self.transition(e, z, enter));
            }
        }
    }
}

impl Stage for Geofence {
    fn apply(&self, e: &mut Event, made: &mut Vec<Event>) -> Verdict {
        let Some(loc) = e.location else {
            return Verdict::Keep;
        };
        let hits = self.locate(loc.lon, loc.lat);
        if !hits.is_empty() {
            let mut names: Vec<&str> = hits.iter().map(|&i| self.zones[i].name.as_str()).collect();
            names.sort_unstable();
            e.tags
                .insert(self.tag.as_str().into(), names.join(",").into());
        }
        if self.transitions {
            self.track(e, &hits, made);
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;
    use crate::event::Location;

    const ZONES: &str = r#"{"type":"FeatureCollection","features":[
        {"type":"Feature","properties":{"name":"yard"},
         "geometry":{"type":"Polygon","coordinates":[[[0,0],[10,0],[10,10],[0,10],[0,0]]]}},
        {"type":"Feature","properties":{"name":"gate"},
         "geometry":{"type":"MultiPolygon","coordinates":[[[[8,8],[12,8],[12,12],[8,12],[8,8]]],
                                                           [[[20,20],[21,20],[21,21],[20,21],[20,20]]]]}}]}"#;

    fn fence(extra: &str) -> Geofence {
        let toml = format!("type='geofence'\ngeojson='''{ZONES}'''\n{extra}");
        let gateway_config::Stage::Geofence(c) = parse(&toml) else {
            panic!()
        };
        Geofence::new(&c, Counter::default()).expect("builds")
    }

    fn at(lon: f64, lat: f64, s: i64) -> Event {
        let mut e = event("truck-1", "t", 1.0);
        e.id = compact_str::format_compact!("truck-1:{s}");
        e.time_ns = s * 1_000_000_000;
        e.location = Some(Location {
            lat,
            lon,
            alt: None,
            accuracy: None,
        });
        e
    }

    fn run(g: &Geofence, e: Event) -> (Option<String>, Vec<String>) {
        let mut made = Vec::new();
        let Applied::Keep(e) = g.apply_owned(e, &mut made) else {
            panic!("kept")
        };
        let made = made
            .iter()
            .map(|m| format!("{}:{}", m.tags["geofence"], m.tags["zone"]))
            .collect();
        (e.tags.get("zones").map(|z| z.to_string()), made)
    }

    #[test]
    fn tags_zones_including_multipolygons_and_borders() {
        let g = fence("transitions=false");
        assert_eq!(run(&g, at(5.0, 5.0, 0)).0.as_deref(), Some("yard"));
        assert_eq!(run(&g, at(9.0, 9.0, 0)).0.as_deref(), Some("gate,yard"));
        assert_eq!(run(&g, at(20.5, 20.5, 0)).0.as_deref(), Some("gate"));
        assert_eq!(
            run(&g, at(10.0, 5.0, 0)).0.as_deref(),
            Some("yard"),
            "border"
        );
        assert_eq!(run(&g, at(15.0, 15.0, 0)).0, None);
    }

    #[test]
    fn enter_and_exit_wait_out_the_dwell() {
        let g = fence("dwell='10s'");
        assert!(
            run(&g, at(5.0, 5.0, 0)).1.is_empty(),
            "in the yard, dwell running"
        );
        assert_eq!(run(&g, at(5.0, 5.0, 10)).1, ["enter:yard"]);
        // On the border, out and back in again within the dwell: no flapping.
        assert!(run(&g, at(10.5, 5.0, 11)).1.is_empty());
        assert!(run(&g, at(9.5, 5.0, 12)).1.is_empty());
        assert!(run(&g, at(10.5, 5.0, 13)).1.is_empty());
        assert!(run(&g, at(10.5, 5.0, 20)).1.is_empty(), "7 s out");
        assert_eq!(run(&g, at(10.5, 5.0, 23)).1, ["exit:yard"]);
        // Back in, the first fix dated far ahead (a glitch), then the clock is right
        // again: the dwell counts from the right time, not from the glitch.
        assert!(run(&g, at(5.0, 5.0, 1_000_000)).1.is_empty());
        assert!(run(&g, at(5.0, 5.0, 30)).1.is_empty(), "dwell starts over");
        assert_eq!(run(&g, at(5.0, 5.0, 40)).1, ["enter:yard"]);
    }

    #[test]
    fn without_dwell_every_change_counts_at_once() {
        let g = fence("");
        assert_eq!(run(&g, at(9.0, 9.0, 0)).1, ["enter:yard", "enter:gate"]);
        assert_eq!(run(&g, at(11.0, 11.0, 1)).1, ["exit:yard"]);
    }

    proptest::proptest! {
        /// Whatever path a device takes across the yard's border, its transitions
        /// alternate (enter, exit, enter, ...), each one confirms a side the device had
        /// kept for the whole dwell, and a stay shorter than the dwell emits nothing.
        #[test]
        fn transitions_alternate_and_respect_the_dwell(
            path in proptest::collection::vec((proptest::bool::ANY, 1i64..4), 1..200)
        ) {
            let g = fence("dwell='5s'");
            let mut t = 0;
            let mut inside_since: Option<(bool, i64)> = None;
            let mut last: Option<String> = None;
            for (inside, step) in path {
                t += step;
                let lon = if inside { 5.0 } else { 15.0 };
                if inside_since.is_none_or(|(side, _)| side != inside) {
                    inside_since = Some((inside, t));
                }
                for m in run(&g, at(lon, 5.0, t)).1.into_iter().filter(|m| m.ends_with(":yard")) {
                    let enter = m.starts_with("enter");
                    proptest::prop_assert_eq!(enter, inside, "a transition confirms where it is");
                    let (_, since) = inside_since.unwrap_or((inside, t));
                    proptest::prop_assert!(t - since >= 5, "held {} s", t - since);
                    proptest::prop_assert_ne!(last.as_deref(), Some(m.as_str()), "alternates");
                    last = Some(m);
                }
            }
        }
    }

    #[test]
    fn bad_zones_are_refused_with_the_feature() {
        let point = r#"{"type":"Feature","properties":{"name":"p"},"geometry":{"type":"Point","coordinates":[1,2]}}"#;
        let toml = format!("type='geofence'\ngeojson='''{point}'''");
        let gateway_config::Stage::Geofence(c) = parse(&toml) else {
            panic!()
        };
        let err = Geofence::new(&c, Counter::default())
            .err()
            .expect("refused");
        assert!(err.contains("feature 0 (p) is a Point"), "{err}");
    }
}
