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

/// The stack of the thread an expression is compiled on: CEL's parser recurses per
/// level of the text, more deeply still when it recovers from an error (a parenthesis
/// left open), and [`MAX_EXPR_LEN`] bytes of the worst kind fit it in a debug build,
/// on aarch64 too (the test below; 16 MiB did not there). Reserved address space,
/// touched only as used; if the system refuses so large a mapping (strict overcommit
/// on a small board), [`COMPILE_STACK_SMALL`] is tried, ample for a release build.
const COMPILE_STACK: usize = 64 << 20;

/// The fallback of [`COMPILE_STACK`].
const COMPILE_STACK_SMALL: usize = 16 << 20;

/// The stack the threads that run stages get (the runtime's workers, `cli.rs`): the
/// deepest expression [`MAX_EXPR_DEPTH`] lets through is evaluated and dropped
/// recursively, and fits half of it in a debug build (the test below). Reserved address
/// space, touched only as used.
pub const EVAL_STACK: usize = 16 << 20;

/// The deepest expression tree accepted. A filter or route condition is a few levels
/// deep (`&&` and `||` chains are balanced trees); a chain of `+`, `.field` or `in` is
/// as deep as it is long, and evaluating it recurses that deep.
pub const MAX_EXPR_DEPTH: usize = 100;

/// The depth of an expression tree, walked without recursion.
fn depth(root: &cel::common::ast::IdedExpr) -> usize {
    use cel::common::ast::{EntryExpr, Expr as E};
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        let mut children: Vec<&cel::common::ast::IdedExpr> = Vec::new();
        match &e.expr {
            E::Call(c) => {
                children.extend(c.target.as_deref());
                children.extend(&c.args);
            }
            E::Comprehension(c) => children.extend([
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]),
            E::List(l) => children.extend(&l.elements),
            E::Map(m) => {
                for en in &m.entries {
                    match &en.expr {
                        EntryExpr::MapEntry(me) => children.extend([&me.key, &me.value]),
                        EntryExpr::StructField(f) => children.push(&f.value),
                    }
                }
            }
            E::Struct(st) => {
                for en in &st.entries {
                    match &en.expr {
                        EntryExpr::MapEntry(me) => children.extend([&me.key, &me.value]),
                        EntryExpr::StructField(f) => children.push(&f.value),
                    }
                }
            }
            E::Select(sel) => children.push(&sel.operand),
            E::Unspecified | E::Ident(_) | E::Literal(_) => {}
        }
        stack.extend(children.into_iter().map(|c| (c, d + 1)));
    }
    deepest
}

/// Compiles `source` on a thread with room for the parser's recursion, and measures the
/// tree there (a tree too deep is dropped there too: dropping recurses as deep).
fn compile_on_a_large_stack(source: &str) -> Result<Result<Program, String>, String> {
    let job = |source: String| {
        move || {
            let program = Program::compile(&source).map_err(|errs| {
                errs.errors
                    .iter()
                    .map(|e| format!("line {} column {}: {}", e.pos.0, e.pos.1 + 1, e.msg))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            let d = depth(program.expression());
            if d > MAX_EXPR_DEPTH {
                return Err(format!(
                    "{d} levels deep; an expression may be at most {MAX_EXPR_DEPTH} (split it over stages)"
                ));
            }
            Ok(program)
        }
    };
    let spawn = |stack: usize| {
        std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(stack)
            .spawn(job(source.to_string()))
    };
    let handle = spawn(COMPILE_STACK)
        .or_else(|_| spawn(COMPILE_STACK_SMALL))
        .map_err(|e| format!("cannot start the compiler's thread: {e}"))?;
    handle
        .join()
        .map_err(|_| "the expression compiler failed".to_string())
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
        // which the parser, the evaluation and the drop all walk recursively: a few
        // hundred levels overflowed a 2 MiB worker stack. The text is bounded for the
        // parser, the tree's depth for the rest.
        if source.len() > MAX_EXPR_LEN {
            return Err(format!(
                "{} bytes; an expression may have at most {MAX_EXPR_LEN}",
                source.len()
            ));
        }
        let program = compile_on_a_large_stack(source)??;
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

    /// Expressions of the longest length, of every deep kind, compile (on the
    /// compiler's thread) and, when the depth limit lets them through, run and drop on
    /// half the stack of a worker thread ([`EVAL_STACK`]), in a debug build (larger
    /// frames than a release one).
    #[test]
    fn the_longest_expressions_fit_the_stacks() {
        let fill = |head: &str, step: &str, tail: &str| {
            let n = (MAX_EXPR_LEN - head.len() - tail.len()) / step.len();
            format!("{head}{}{tail}", step.repeat(n))
        };
        let chain = |step: &str, levels: usize| format!("temperature{} > 0.0", step.repeat(levels));
        let cases = [
            // Too deep: refused at compile.
            fill("temperature", " + temperature", " > 0.0"),
            fill("temperature", "+1.0", " > 0.0"),
            fill("tags", ".a", " == \"x\""),
            fill("device", " in [\"a\"]", ""),
            fill("", "(", "true"),
            fill("", "[", "1"),
            fill("", "!", "true"),
            fill("", "-", "temperature > 0.0"),
            // Balanced: long but shallow.
            fill("temperature > 0.0", " && true", ""),
            // As deep as accepted.
            chain(" + 1.0", MAX_EXPR_DEPTH - 3),
        ];
        for expr in cases {
            assert!(expr.len() <= MAX_EXPR_LEN);
            let ran = std::thread::Builder::new()
                .stack_size(EVAL_STACK / 2)
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
        let too_deep = chain(" + 1.0", MAX_EXPR_DEPTH);
        assert!(Expr::compile(&too_deep).is_err_and(|e| e.contains("levels deep")));
        assert!(Expr::compile(&chain(" + 1.0", MAX_EXPR_DEPTH - 3)).is_ok());
        // A long ordinary condition is fine: only depth counts.
        let long = (0..20)
            .map(|i| format!("(has(tags.site) && temperature > {i}.5)"))
            .collect::<Vec<_>>()
            .join(" || ");
        assert!(long.len() < MAX_EXPR_LEN, "{}", long.len());
        assert!(Expr::compile(&long).is_ok());
    }
}
