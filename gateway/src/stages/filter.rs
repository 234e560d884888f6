//! `filter` (keep or drop by a CEL expression) and `route` (topic and key by the first
//! rule that holds).

use gateway_config::{FilterMode, FilterOnError, FilterStage, RouteStage};

use super::expr::Expr;
use super::{Stage, Verdict};
use crate::event::{Event, Route};
use crate::sinks::kafka::{render, render_raw};

/// `filter`.
pub struct Filter {
    expr: Expr,
    keep_if: bool,
    on_error: FilterOnError,
}

impl Filter {
    /// Compiles the expression.
    pub fn new(c: &FilterStage) -> Result<Filter, String> {
        Ok(Filter {
            expr: Expr::compile(&c.expr).map_err(|e| format!("expr: {e}"))?,
            keep_if: c.mode == FilterMode::Keep,
            on_error: c.on_error,
        })
    }
}

impl Stage for Filter {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        match self.expr.test(e) {
            Ok(t) if t == self.keep_if => Verdict::Keep,
            Ok(_) => Verdict::Drop("filtered"),
            Err(_) if self.on_error == FilterOnError::Keep => Verdict::Keep,
            Err(_) => Verdict::Drop("filter_error"),
        }
    }
}

struct Rule {
    when: Option<Expr>,
    topic: Option<String>,
    key: Option<String>,
}

/// `route`.
pub struct Router {
    rules: Vec<Rule>,
}

impl Router {
    /// Compiles every rule's condition.
    pub fn new(c: &RouteStage) -> Result<Router, String> {
        let rules = c
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let when = r
                    .when
                    .as_deref()
                    .map(Expr::compile)
                    .transpose()
                    .map_err(|e| format!("rules[{i}].when: {e}"))?;
                Ok(Rule {
                    when,
                    topic: r.topic.clone(),
                    key: r.key.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Router { rules })
    }
}

impl Stage for Router {
    fn apply(&self, e: &mut Event, _made: &mut Vec<Event>) -> Verdict {
        // A condition that cannot be evaluated for this event does not hold.
        let rule = self
            .rules
            .iter()
            .find(|r| r.when.as_ref().is_none_or(|w| w.test(e) == Ok(true)));
        if let Some(r) = rule {
            let topic = r.topic.as_deref().map(|t| render(t, e));
            let key = r.key.as_deref().map(|k| render_raw(k, e));
            e.route = Some(Box::new(Route { topic, key }));
        }
        Verdict::Keep
    }
}
