//! CEL expressions over events (`filter`, `route`), compiled once at config load.
//!
//! Names: `device`, `source`, `topic`, `id`, `time` (event time, float seconds since the
//! epoch), `clock`, `tags`, `readings`, `location` (`null` when the event has none), and
//! each reading by its own name. Names are looked up only when the expression reads them,
//! borrowing from the event, so a short expression costs only what it reads.

use std::collections::HashMap;

use cel::common::types::{CelBool, CelDouble, CelMap, CelMapKey, CelNull, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Program, Value as Cel};

use crate::event::{Event, Value};

/// The longest expression accepted (bytes). A filter or route condition is a line or
/// two; see [`Expr::compile`] for why there is a limit.
pub const MAX_EXPR_LEN: usize = 1024;

/// The stack of the thread an expression is compiled on.
const COMPILE_STACK: usize = 256 << 20;

/// The stack the threads that run stages need for the deepest expression
/// [`MAX_EXPR_OPS`] lets through (evaluated and dropped recursively), with room to
/// spare: the runtime's worker threads get it (`cli.rs`). Reserved address space,
/// touched only as used.
pub const EVAL_STACK: usize = 16 << 20;

/// The most operators (`+`, `&&`, `!`, `.`, `[`, ...) an expression may have outside its
/// string literals: each can be a level of the tree (see [`Expr::compile`]).
pub const MAX_EXPR_OPS: usize = 100;

/// Operator characters outside string literals (a two-character operator counts twice,
/// which errs on the safe side).
fn operators(source: &str) -> usize {
    let mut n = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                '+' | '-' | '*' | '/' | '%' | '!' | '<' | '>' | '=' | '&' | '|' | '.' | '['
                | '?' | '(' => n += 1,
                _ => {}
            },
        }
    }
    n
}

/// A compiled expression.
pub struct Expr {
    program: Program,
    /// CEL's standard functions and macros (`size`, `has`, `startsWith`, ...).
    root: Context<'static, 'static>,
}

impl Expr {
    /// Compiles `source`; the error gives the line and column.
    pub fn compile(source: &str) -> Result<Expr, String> {
        // CEL's parser counts only bracketed nesting against its depth limit: a long
        // chain (`a + a + a ...`, `a.b.b.b...`) builds a tree as deep as it is long,
        // which the parser, the evaluation and the drop all walk recursively: past some
        // thousand levels that overflows a worker thread's stack.
        if source.len() > MAX_EXPR_LEN {
            return Err(format!(
                "{} bytes; an expression may have at most {MAX_EXPR_LEN}",
                source.len()
            ));
        }
        let ops = operators(source);
        if ops > MAX_EXPR_OPS {
            return Err(format!(
                "{ops} operators; an expression may have at most {MAX_EXPR_OPS} (split it over stages)"
            ));
        }
        // The parser recurses deeply even within these limits (a parenthesis left open
        // sends its error recovery down the whole rest): it runs on a thread of its own
        // with room for that. The stack is reserved address space, touched only as used.
        let parsed = std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn({
                let source = source.to_string();
                move || Program::compile(&source)
            })
            .map_err(|e| format!("cannot start the compiler's thread: {e}"))?
            .join()
            .map_err(|_| "the expression compiler failed".to_string())?;
        let program = parsed.map_err(|errs| {
            errs.errors
                .iter()
                .map(|e| format!("line {} column {}: {}", e.pos.0, e.pos.1 + 1, e.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Expr {
            program,
            root: Context::default(),
        })
    }

    /// Evaluates to a boolean; a non-boolean result or a failure (a missing reading, a
    /// type mismatch) is an error with CEL's message.
    pub fn test(&self, e: &Event) -> Result<bool, String> {
        let vars = Vars(e);
        let mut ctx: Context<'_, '_> = self.root.new_inner_scope();
        ctx.set_variable_resolver(&vars);
        match self.program.execute(&ctx) {
            Ok(Cel::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the expression gave {other:?}, not true or false")),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// The event's names for CEL, looked up when the expression reads them: scalars and
/// `tags.NAME` / `readings.NAME` / `location.FIELD` borrow from the event; a whole map
/// (`tags`, `has(tags.x)`) is built only when asked for.
struct Vars<'e>(&'e Event);

fn boxed<'b, 'v, T: Val + 'v>(v: T) -> Option<CowVal<'b, 'v>> {
    Some(CowVal::Owned(Box::new(v)))
}

fn reading<'b, 'v>(v: &'v Value) -> Option<CowVal<'b, 'v>> {
    match v {
        Value::Number(n) => boxed(CelDouble::from(*n)),
        Value::Text(t) => boxed(CelString::from(t.as_str())),
        Value::Bool(b) => boxed(CelBool::from(*b)),
    }
}

fn map<'b, 'v>(
    entries: impl Iterator<Item = (&'v str, Box<dyn Val + 'v>)>,
) -> Option<CowVal<'b, 'v>> {
    let m: HashMap<CelMapKey<'v>, Box<dyn Val + 'v>> =
        entries.map(|(k, v)| (CelMapKey::from(k), v)).collect();
    boxed(CelMap::from(m))
}

fn value_box(v: &Value) -> Box<dyn Val + '_> {
    match v {
        Value::Number(n) => Box::new(CelDouble::from(*n)),
        Value::Text(t) => Box::new(CelString::from(t.as_str())),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
    }
}

impl VariableResolver for Vars<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let e: &'b Event = self.0;
        match name {
            "device" => boxed(CelString::from(e.device.as_str())),
            "source" => boxed(CelString::from(e.source.as_str())),
            "topic" => boxed(CelString::from(e.origin.as_str())),
            "id" => boxed(CelString::from(e.id.as_str())),
            "time" => boxed(CelDouble::from(e.time_ns as f64 / 1e9)),
            "clock" => boxed(CelString::from(e.clock.as_str())),
            "tags" => map(e.tags.iter().map(|(k, v)| {
                (
                    k.as_str(),
                    Box::new(CelString::from(v.as_str())) as Box<dyn Val>,
                )
            })),
            "readings" => map(e.readings.iter().map(|(k, v)| (k.as_str(), value_box(v)))),
            "location" => match &e.location {
                None => boxed(CelNull),
                Some(l) => map([
                    Some(("lat", l.lat)),
                    Some(("lon", l.lon)),
                    l.alt.map(|a| ("alt", a)),
                    l.accuracy.map(|a| ("accuracy", a)),
                ]
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, Box::new(CelDouble::from(v)) as Box<dyn Val>))),
            },
            other => {
                if let Some(t) = other.strip_prefix("tags.") {
                    return boxed(CelString::from(e.tags.get(t)?.as_str()));
                }
                if let Some(r) = other.strip_prefix("readings.") {
                    return reading(e.readings.get(r)?);
                }
                if let Some(f) = other.strip_prefix("location.") {
                    let l = e.location.as_ref()?;
                    let v = match f {
                        "lat" => l.lat,
                        "lon" => l.lon,
                        "alt" => l.alt?,
                        "accuracy" => l.accuracy?,
                        _ => return None,
                    };
                    return boxed(CelDouble::from(v));
                }
                // Any other name is a reading of the event (`temperature`).
                reading(e.readings.get(other)?)
            }
        }
    }
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
                ("temperature".into(), Value::Number(21.5)),
                ("state".into(), Value::Text("on".into())),
            ]
            .into(),
            tags: [("site".into(), "berlin".into())].into(),
            route: None,
            redelivered: false,
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

    /// The longest chains the limits let through compile, run and drop on a stack the
    /// size of a worker thread's ([`EVAL_STACK`]), in a debug build (larger frames than
    /// a release one).
    #[test]
    fn the_longest_expressions_fit_a_worker_threads_stack() {
        // As many steps as the limits let through.
        let fill = |head: &str, step: &str, tail: &str| {
            let mut n = (MAX_EXPR_LEN - head.len() - tail.len()) / step.len();
            while operators(&format!("{head}{}{tail}", step.repeat(n))) > MAX_EXPR_OPS {
                n -= 1;
            }
            format!("{head}{}{tail}", step.repeat(n))
        };
        let cases = [
            fill("temperature", " + temperature", " > 0.0"),
            fill("temperature", "+1.0", " > 0.0"),
            fill("tags", ".a", " == \"x\""),
            fill("temperature > 0.0", " && true", ""),
            fill("", "!", "true"),
            fill("", "-", "temperature > 0.0"),
            fill("", "(", "true"),
            fill("", "[", "1"),
        ];
        for expr in cases {
            assert!(expr.len() <= MAX_EXPR_LEN);
            let ran = std::thread::Builder::new()
                .stack_size(EVAL_STACK)
                .spawn(move || {
                    let compiled = Expr::compile(&expr);
                    if let Ok(x) = &compiled {
                        let _ = x.test(&event());
                    }
                    drop(compiled);
                })
                .expect("thread")
                .join();
            assert!(ran.is_ok());
        }
        let too_long = "true || ".repeat(MAX_EXPR_LEN / 8) + "true";
        assert!(Expr::compile(&too_long).is_err_and(|e| e.contains("bytes")));
        let too_deep = "!".repeat(MAX_EXPR_OPS + 1) + "true";
        assert!(Expr::compile(&too_deep).is_err_and(|e| e.contains("operators")));
        // Operators inside strings do not count.
        let quoted = format!("device == \"{}\"", "+".repeat(500));
        assert!(Expr::compile(&quoted).is_ok());
    }
}
