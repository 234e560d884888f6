//! CEL expressions over events (`filter`, `route`), compiled once at config load.
//!
//! Names: `device`, `source`, `topic`, `id`, `time` (event time, float seconds since the
//! epoch), `clock`, `tags`, `readings`, `location` (`null` when the event has none), and
//! each reading by its own name. Only the names an expression uses are bound per event,
//! so a short expression costs only what it reads.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, Program, Value as Cel};

use crate::event::{Event, Value};

/// Names bound from the event itself; anything else is looked up as a reading.
const FIELDS: &[&str] = &[
    "device", "source", "topic", "id", "time", "clock", "tags", "readings", "location",
];

/// A compiled expression.
pub struct Expr {
    program: Program,
    /// The names the expression reads, bound per event.
    names: Vec<String>,
    /// CEL's standard functions and macros (`size`, `has`, `startsWith`, ...).
    root: Context<'static, 'static>,
}

impl Expr {
    /// Compiles `source`; the error gives the line and column.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = Program::compile(source).map_err(|errs| {
            errs.errors
                .iter()
                .map(|e| format!("line {} column {}: {}", e.pos.0, e.pos.1 + 1, e.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let mut names: Vec<String> = program
            .references()
            .variables()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        Ok(Expr {
            program,
            names,
            root: Context::default(),
        })
    }

    /// Evaluates to a boolean; a non-boolean result or a failure (a missing reading, a
    /// type mismatch) is an error with CEL's message.
    pub fn test(&self, e: &Event) -> Result<bool, String> {
        let mut ctx = self.root.new_inner_scope();
        for name in &self.names {
            if let Some(v) = bind(name, e) {
                ctx.add_variable_from_value(name.as_str(), v);
            }
        }
        match self.program.execute(&ctx) {
            Ok(Cel::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the expression gave {other:?}, not true or false")),
            Err(err) => Err(err.to_string()),
        }
    }
}

fn text(s: &str) -> Cel {
    Cel::String(Arc::new(s.to_string()))
}

fn value(v: &Value) -> Cel {
    match v {
        Value::Number(n) => Cel::Float(*n),
        Value::Text(t) => text(t),
        Value::Bool(b) => Cel::Bool(*b),
    }
}

fn map(entries: impl Iterator<Item = (String, Cel)>) -> Cel {
    let m: HashMap<Key, Cel> = entries
        .map(|(k, v)| (Key::String(Arc::new(k)), v))
        .collect();
    Cel::Map(Map { map: Arc::new(m) })
}

/// The value of `name` for `e`; `None` leaves it unbound (a reading the event lacks).
fn bind(name: &str, e: &Event) -> Option<Cel> {
    Some(match name {
        "device" => text(&e.device),
        "source" => text(&e.source),
        "topic" => text(&e.origin),
        "id" => text(&e.id),
        "time" => Cel::Float(e.time_ns as f64 / 1e9),
        "clock" => text(e.clock.as_str()),
        "tags" => map(e.tags.iter().map(|(k, v)| (k.clone(), text(v)))),
        "readings" => map(e.readings.iter().map(|(k, v)| (k.clone(), value(v)))),
        "location" => match &e.location {
            None => Cel::Null,
            Some(l) => map([
                Some(("lat".to_string(), Cel::Float(l.lat))),
                Some(("lon".to_string(), Cel::Float(l.lon))),
                l.alt.map(|a| ("alt".to_string(), Cel::Float(a))),
                l.accuracy.map(|a| ("accuracy".to_string(), Cel::Float(a))),
            ]
            .into_iter()
            .flatten()),
        },
        reading => {
            debug_assert!(!FIELDS.contains(&reading));
            value(e.readings.get(reading)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ClockQuality, Location};

    fn event() -> Event {
        Event {
            id: "pump-7:1".into(),
            device: "pump-7".into(),
            source: "site".into(),
            origin: "sensors/pump-7".into(),
            time_ns: 1_700_000_000_000_000_000,
            clock: ClockQuality::Device,
            received_ns: 0,
            location: Some(Location {
                lat: 52.5,
                lon: 13.4,
                alt: None,
                accuracy: None,
            }),
            readings: [
                ("temperature".to_string(), Value::Number(21.5)),
                ("state".to_string(), Value::Text("on".into())),
            ]
            .into(),
            tags: [("site".to_string(), "berlin".to_string())].into(),
            route: None,
        }
    }

    fn check(expr: &str, expected: Result<bool, &str>) {
        let got = Expr::compile(expr).and_then(|x| x.test(&event()));
        match (&got, expected) {
            (Ok(a), Ok(b)) => assert_eq!(*a, b, "{expr}"),
            (Err(a), Err(b)) => assert!(a.contains(b), "{expr}: {a}"),
            _ => panic!("{expr}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn names_of_the_event() {
        check(
            r#"temperature > -40 && temperature < 125 && device.startsWith("pump-")"#,
            Ok(true),
        );
        check(r#"tags.site == "berlin" && source == "site""#, Ok(true));
        check(
            r#"topic.startsWith("sensors/") && id == "pump-7:1""#,
            Ok(true),
        );
        check("location.lat > 52.0 && location.lon < 14.0", Ok(true));
        check(r#"readings.state == "on" && state == "on""#, Ok(true));
        check("has(readings.humidity)", Ok(false));
        check(r#"clock == "device" && time > 1.6e9"#, Ok(true));
        check(r#"device in ["pump-7", "pump-8"]"#, Ok(true));
        check("size(tags) == 1", Ok(true));
    }

    #[test]
    fn errors_name_the_column_or_the_cause() {
        check("temperature >", Err("line 1 column"));
        check("humidity > 3.0", Err("humidity"));
        check("temperature + 1.0", Err("not true or false"));
    }
}
