//! Field housekeeping and enrichment: `enrich` (static tags, a lookup table by device),
//! `calibrate` (scale and offset), `convert` (units), `rename`, `remove`.

use std::collections::BTreeMap;
use std::path::Path;

use gateway_config::{CalibrateStage, ConvertStage, EnrichStage, Linear, RemoveStage, RenameStage};

use super::state::FastMap;
use super::{Stage, Verdict};
use crate::event::{Event, Fields, Value};

/// `enrich`.
pub struct Enrich {
    tags: Vec<(String, String)>,
    table: FastMap<String, Vec<(String, String)>>,
    overwrite: bool,
}

/// Reads a lookup table: CSV with a header row, or TOML with a table per device.
fn load_table(
    path: &Path,
    key_column: &str,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let at = |e: &dyn std::fmt::Display| format!("table {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
    let mut out = BTreeMap::new();
    if path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("toml"))
    {
        let t: BTreeMap<String, BTreeMap<String, toml::Value>> =
            toml::from_str(&text).map_err(|e| at(&e))?;
        for (device, cols) in t {
            let tags = cols
                .into_iter()
                .map(|(k, v)| match v {
                    toml::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect();
            out.insert(device, tags);
        }
        return Ok(out);
    }
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = r.headers().map_err(|e| at(&e))?.clone();
    let key = headers
        .iter()
        .position(|h| h == key_column)
        .ok_or_else(|| {
            at(&format!(
                "no column {key_column:?} (key_column) in the header"
            ))
        })?;
    for (line, row) in r.records().enumerate() {
        let row = row.map_err(|e| at(&e))?;
        let device = row
            .get(key)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| at(&format!("row {} has no {key_column}", line + 2)))?;
        let tags = headers
            .iter()
            .zip(row.iter())
            .enumerate()
            .filter(|(i, (_, v))| *i != key && !v.is_empty())
            .map(|(_, (h, v))| (h.to_string(), v.to_string()))
            .collect();
        out.insert(device.to_string(), tags);
    }
    Ok(out)
}

impl Enrich {
    /// Loads the table, if any.
    pub fn new(c: &EnrichStage) -> Result<Enrich, String> {
        let mut rows = match &c.table {
            Some(path) => load_table(path, &c.key_column)?,
            None => BTreeMap::new(),
        };
        for (device, tags) in &c.devices {
            rows.entry(device.clone())
                .or_default()
                .extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Ok(Enrich {
            tags: c.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            table: rows
                .into_iter()
                .map(|(d, t)| (d, t.into_iter().collect()))
                .collect(),
            overwrite: c.overwrite,
        })
    }

    fn set(&self, e: &mut Event, k: &str, v: &str) {
        if self.overwrite || !e.tags.contains_key(k) {
            e.tags.insert(k.into(), v.into());
        }
    }
}

impl Stage for Enrich {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        if let Some(row) = self.table.get(e.device.as_str()) {
            for (k, v) in row {
                self.set(e, k, v);
            }
        }
        for (k, v) in &self.tags {
            self.set(e, k, v);
        }
        Verdict::Keep
    }
}

/// `calibrate`.
pub struct Calibrate {
    all: FastMap<String, Linear>,
    devices: FastMap<String, FastMap<String, Linear>>,
}

impl Calibrate {
    /// From its config.
    pub fn new(c: &CalibrateStage) -> Calibrate {
        Calibrate {
            all: c.readings.clone().into_iter().collect(),
            devices: c
                .devices
                .iter()
                .map(|(d, r)| (d.clone(), r.clone().into_iter().collect()))
                .collect(),
        }
    }
}

impl Stage for Calibrate {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        let own = self.devices.get(e.device.as_str());
        for (name, v) in e.readings.iter_mut() {
            let Value::Number(n) = v else { continue };
            if let Some(l) = own
                .and_then(|o| o.get(name.as_str()))
                .or_else(|| self.all.get(name.as_str()))
            {
                *n = *n * l.scale + l.offset;
            }
        }
        Verdict::Keep
    }
}

/// A unit: its dimension and how to get to the dimension's base unit
/// (`base = value * scale + offset`).
fn unit(name: &str) -> Option<(&'static str, f64, f64)> {
    Some(match name {
        "K" => ("temperature", 1.0, 0.0),
        "degC" | "°C" | "C" => ("temperature", 1.0, 273.15),
        "degF" | "°F" | "F" => ("temperature", 5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0),
        "m" => ("length", 1.0, 0.0),
        "km" => ("length", 1000.0, 0.0),
        "cm" => ("length", 0.01, 0.0),
        "mm" => ("length", 0.001, 0.0),
        "ft" => ("length", 0.3048, 0.0),
        "in" => ("length", 0.0254, 0.0),
        "mi" => ("length", 1609.344, 0.0),
        "m/s" => ("speed", 1.0, 0.0),
        "km/h" => ("speed", 1.0 / 3.6, 0.0),
        "mph" => ("speed", 0.44704, 0.0),
        "kn" => ("speed", 1852.0 / 3600.0, 0.0),
        "Pa" => ("pressure", 1.0, 0.0),
        "hPa" | "mbar" => ("pressure", 100.0, 0.0),
        "kPa" => ("pressure", 1000.0, 0.0),
        "bar" => ("pressure", 100_000.0, 0.0),
        "psi" => ("pressure", 6_894.757_293_168, 0.0),
        "inHg" => ("pressure", 3386.389, 0.0),
        "kg" => ("mass", 1.0, 0.0),
        "g" => ("mass", 0.001, 0.0),
        "lb" => ("mass", 0.453_592_37, 0.0),
        "J" => ("energy", 1.0, 0.0),
        "Wh" => ("energy", 3600.0, 0.0),
        "kWh" => ("energy", 3_600_000.0, 0.0),
        "W" => ("power", 1.0, 0.0),
        "kW" => ("power", 1000.0, 0.0),
        _ => return None,
    })
}

/// `convert`: per reading, `out = value * scale + offset` and where to put it.
pub struct Convert {
    readings: Vec<(String, f64, f64, Option<String>)>,
}

impl Convert {
    /// Checks the units (known, same dimension).
    pub fn new(c: &ConvertStage) -> Result<Convert, String> {
        let mut readings = Vec::new();
        for (name, conv) in &c.readings {
            let from = unit(&conv.from)
                .ok_or_else(|| format!("readings.{name}.from: unknown unit {:?}", conv.from))?;
            let to = unit(&conv.to)
                .ok_or_else(|| format!("readings.{name}.to: unknown unit {:?}", conv.to))?;
            if from.0 != to.0 {
                return Err(format!(
                    "readings.{name}: cannot convert {} ({}) to {} ({})",
                    conv.from, from.0, conv.to, to.0
                ));
            }
            // base = v * f1 + o1; out = (base - o2) / f2
            let scale = from.1 / to.1;
            let offset = (from.2 - to.2) / to.1;
            readings.push((name.clone(), scale, offset, conv.into.clone()));
        }
        Ok(Convert { readings })
    }
}

impl Stage for Convert {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        for (name, scale, offset, into) in &self.readings {
            let Some(Value::Number(v)) = e.readings.get(name.as_str()) else {
                continue;
            };
            let out = Value::Number(v * scale + offset);
            match into {
                Some(other) => e.readings.insert(other.as_str().into(), out),
                None => e.readings.insert(name.as_str().into(), out),
            };
        }
        Verdict::Keep
    }
}

/// `rename`.
pub struct Rename {
    readings: Vec<(String, String)>,
    tags: Vec<(String, String)>,
}

impl Rename {
    /// From its config.
    pub fn new(c: &RenameStage) -> Rename {
        Rename {
            readings: c.readings.clone().into_iter().collect(),
            tags: c.tags.clone().into_iter().collect(),
        }
    }
}

/// Renames in `fields` by `pairs` (from, to), all at once: every source is taken out
/// before any is put back, so a swap (`a = "b"`, `b = "a"`) swaps, and a chain does not
/// move a value twice. A renamed value replaces one already under its new name.
fn rename_all<V>(fields: &mut Fields<V>, pairs: &[(String, String)]) {
    let mut moved: Vec<(&str, V)> = Vec::new();
    for (from, to) in pairs {
        if let Some(v) = fields.remove(from.as_str()) {
            moved.push((to, v));
        }
    }
    for (to, v) in moved {
        fields.insert(to.into(), v);
    }
}

impl Stage for Rename {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        rename_all(&mut e.readings, &self.readings);
        rename_all(&mut e.tags, &self.tags);
        Verdict::Keep
    }
}

/// `remove`.
pub struct Remove {
    readings: Vec<String>,
    tags: Vec<String>,
    location: bool,
}

impl Remove {
    /// From its config.
    pub fn new(c: &RemoveStage) -> Remove {
        Remove {
            readings: c.readings.clone(),
            tags: c.tags.clone(),
            location: c.location,
        }
    }
}

impl Stage for Remove {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        for r in &self.readings {
            e.readings.remove(r.as_str());
        }
        for t in &self.tags {
            e.tags.remove(t.as_str());
        }
        if self.location {
            e.location = None;
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, parse, Applied, ApplyOwned};
    use super::*;

    fn num(e: &Event, name: &str) -> f64 {
        match e.readings.get(name) {
            Some(Value::Number(n)) => *n,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn kept(v: Applied) -> Event {
        match v {
            Applied::Keep(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn enrich_from_csv_toml_and_inline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("devices.csv");
        std::fs::write(
            &csv,
            "device,owner,site\npump-1,ops,\"plant, north\"\npump-2,lab,\n",
        )
        .expect("write");
        let toml = dir.path().join("devices.toml");
        std::fs::write(&toml, "[pump-3]\nowner = \"ops\"\nrack = 4\n").expect("write");
        for (path, device, want) in [
            (
                &csv,
                "pump-1",
                vec![("owner", "ops"), ("site", "plant, north"), ("fleet", "a")],
            ),
            (&csv, "pump-2", vec![("owner", "lab"), ("fleet", "a")]),
            (
                &toml,
                "pump-3",
                vec![("owner", "ops"), ("rack", "4"), ("fleet", "a")],
            ),
        ] {
            let gateway_config::Stage::Enrich(c) = parse(&format!(
                "type='enrich'\ntable='{}'\ntags={{fleet='a'}}",
                path.display()
            )) else {
                panic!()
            };
            let e = kept(
                Enrich::new(&c)
                    .expect("loads")
                    .apply_owned(event(device, "t", 1.0), &mut Vec::new()),
            );
            for (k, v) in want {
                assert_eq!(e.tags.get(k).map(|v| v.as_str()), Some(v), "{device} {k}");
            }
            assert!(!e.tags.contains_key("site") || device == "pump-1");
        }
        let missing = parse("type='enrich'\ntable='/nonexistent.csv'");
        let gateway_config::Stage::Enrich(c) = missing else {
            panic!()
        };
        assert!(Enrich::new(&c)
            .err()
            .expect("refused")
            .contains("/nonexistent.csv"));
    }

    #[test]
    fn calibrate_per_device_over_default() {
        let gateway_config::Stage::Calibrate(c) = parse(
            "type='calibrate'\nreadings.temperature={scale=2.0,offset=1.0}\ndevices.d2.temperature={offset=-0.5}",
        ) else {
            panic!()
        };
        let s = Calibrate::new(&c);
        assert_eq!(
            num(
                &kept(s.apply_owned(event("d1", "t", 10.0), &mut Vec::new())),
                "temperature"
            ),
            21.0
        );
        assert_eq!(
            num(
                &kept(s.apply_owned(event("d2", "t", 10.0), &mut Vec::new())),
                "temperature"
            ),
            9.5
        );
    }

    #[test]
    fn convert_units() {
        let gateway_config::Stage::Convert(c) = parse(
            "type='convert'\nreadings.temperature={from='degF',to='degC',into='temperature_c'}",
        ) else {
            panic!()
        };
        let e = kept(
            Convert::new(&c)
                .expect("units")
                .apply_owned(event("d", "t", 212.0), &mut Vec::new()),
        );
        assert!((num(&e, "temperature_c") - 100.0).abs() < 1e-9);
        assert_eq!(num(&e, "temperature"), 212.0);
        for (from, to, v, want) in [
            ("km/h", "m/s", 36.0, 10.0),
            ("bar", "psi", 1.0, 14.5038),
            ("K", "degC", 0.0, -273.15),
        ] {
            let gateway_config::Stage::Convert(c) = parse(&format!(
                "type='convert'\nreadings.temperature={{from='{from}',to='{to}'}}"
            )) else {
                panic!()
            };
            let e = kept(
                Convert::new(&c)
                    .expect("units")
                    .apply_owned(event("d", "t", v), &mut Vec::new()),
            );
            assert!((num(&e, "temperature") - want).abs() < 1e-3, "{from}->{to}");
        }
        let gateway_config::Stage::Convert(c) =
            parse("type='convert'\nreadings.temperature={from='degC',to='psi'}")
        else {
            panic!()
        };
        assert!(Convert::new(&c)
            .err()
            .expect("refused")
            .contains("cannot convert"));
    }

    #[test]
    fn rename_and_remove() {
        let gateway_config::Stage::Rename(c) =
            parse("type='rename'\nreadings={temperature='temp'}\ntags={a='b'}")
        else {
            panic!()
        };
        let mut e = event("d", "t", 1.0);
        e.tags.insert("a".into(), "x".into());
        let e = kept(Rename::new(&c).apply_owned(e, &mut Vec::new()));
        assert_eq!(num(&e, "temp"), 1.0);
        assert_eq!(e.tags["b"], "x");
        let gateway_config::Stage::Remove(c) =
            parse("type='remove'\nreadings=['temp']\ntags=['b']\nlocation=true")
        else {
            panic!()
        };
        let e = kept(Remove::new(&c).apply_owned(e, &mut Vec::new()));
        assert!(e.readings.is_empty() && e.tags.is_empty() && e.location.is_none());
    }

    #[test]
    fn a_rename_swap_swaps() {
        let gateway_config::Stage::Rename(c) = parse("type='rename'\nreadings={a='b',b='a'}")
        else {
            panic!()
        };
        let mut e = event("d", "t", 0.0);
        e.readings.insert("a".into(), Value::Number(1.0));
        e.readings.insert("b".into(), Value::Number(2.0));
        let e = kept(Rename::new(&c).apply_owned(e, &mut Vec::new()));
        assert_eq!((num(&e, "a"), num(&e, "b")), (2.0, 1.0));
    }
}
