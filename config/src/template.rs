//! MQTT topic templates: filters whose `{name}` levels capture a field.
//!
//! `sensors/{device}/{metric}` subscribes to `sensors/+/+` and, for the topic
//! `sensors/pump-7/temperature`, captures `device = "pump-7"`, `metric = "temperature"`.

use std::fmt;

use smallvec::SmallVec;

/// The `(name, value)` pairs a topic template captured: up to four without an allocation
/// (this runs once per MQTT message).
pub type Captures<'n, 't> = SmallVec<[(&'n str, &'t str); 4]>;

/// One level of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: any one level, not captured.
    Any,
    /// `{name}`: any one level, captured as `name`.
    Capture(String),
    /// `#`: the rest, last level only.
    Rest,
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    levels: Vec<Level>,
    filter: String,
}

/// Why a topic template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicTemplateError {
    /// The template is empty.
    #[error("the topic template is empty")]
    Empty,
    /// A `{` without its `}`, or a field inside other text.
    #[error("level {0:?}: a field must fill a whole level, like {{device}}")]
    BadField(String),
    /// `#` not at the end.
    #[error("'#' may only be the last level")]
    HashNotLast,
    /// The same field twice.
    #[error("field {{{0}}} appears twice")]
    Duplicate(String),
    /// `$share/` without a group name and a filter after it.
    #[error("{0:?}: a shared subscription is $share/GROUP/FILTER")]
    BadShare(String),
}

impl TopicTemplate {
    /// Parses a template. A shared subscription (`$share/GROUP/...`, MQTT 5 and
    /// Mosquitto's 3.1.1) subscribes with its prefix and matches topics without it (the
    /// broker sends the topic a message was published to).
    pub fn parse(text: &str) -> Result<Self, TopicTemplateError> {
        if text.is_empty() {
            return Err(TopicTemplateError::Empty);
        }
        let (share, text) = match text.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, rest))
                    if !group.is_empty()
                        && !group.contains(['{', '}', '+', '#'])
                        && !rest.is_empty() =>
                {
                    (Some(group), rest)
                }
                _ => return Err(TopicTemplateError::BadShare(text.to_string())),
            },
            None => (None, text),
        };
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut seen = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let level = if *p == "#" {
                if i + 1 != parts.len() {
                    return Err(TopicTemplateError::HashNotLast);
                }
                Level::Rest
            } else if *p == "+" {
                Level::Any
            } else if let Some(name) = p.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if name.is_empty() || name.contains(['{', '}', '+', '#']) {
                    return Err(TopicTemplateError::BadField((*p).to_string()));
                }
                if seen.contains(&name) {
                    return Err(TopicTemplateError::Duplicate(name.to_string()));
                }
                seen.push(name);
                Level::Capture(name.to_string())
            } else if p.contains(['{', '}', '+', '#']) {
                return Err(TopicTemplateError::BadField((*p).to_string()));
            } else {
                Level::Literal((*p).to_string())
            };
            levels.push(level);
        }
        let filter = levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Any | Level::Capture(_) => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/");
        let filter = match share {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter,
        };
        Ok(TopicTemplate { levels, filter })
    }

    /// The MQTT subscription filter.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Names of the captured fields.
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::Capture(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Matches a topic; on a match returns the captured `(name, value)` pairs.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<Captures<'_, 't>> {
        let mut out = Captures::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(out),
                _ => {
                    let part = parts.next()?;
                    match level {
                        Level::Literal(s) if s != part => return None,
                        Level::Capture(n) => out.push((n.as_str(), part)),
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none().then_some(out)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str, topic: &str, expected: Option<&[(&str, &str)]>) {
        let t = TopicTemplate::parse(template).expect("valid template");
        assert_eq!(
            t.matches(topic).as_deref(),
            expected,
            "{template} vs {topic}"
        );
    }

    #[test]
    fn matching() {
        check(
            "a/{device}/{metric}",
            "a/d1/temp",
            Some(&[("device", "d1"), ("metric", "temp")]),
        );
        check("a/{device}/{metric}", "a/d1", None);
        check("a/{device}/{metric}", "a/d1/t/x", None);
        check("a/{device}/#", "a/d1/t/x", Some(&[("device", "d1")]));
        check("a/+/x", "a/q/x", Some(&[]));
        check("a/+/x", "b/q/x", None);
        check("#", "anything/at/all", Some(&[]));
        // A shared subscription's messages come with the topic they were published to.
        check("$share/gw/a/{device}", "a/d1", Some(&[("device", "d1")]));
        check("$share/gw/a/{device}", "$share/gw/a/d1", None);
    }

    #[test]
    fn filters_and_errors() {
        let t = TopicTemplate::parse("s/{site}/{device}/#").expect("valid");
        assert_eq!(t.filter(), "s/+/+/#");
        assert_eq!(TopicTemplate::parse(""), Err(TopicTemplateError::Empty));
        assert_eq!(
            TopicTemplate::parse("a/#/b"),
            Err(TopicTemplateError::HashNotLast)
        );
        assert!(matches!(
            TopicTemplate::parse("a/x{d}"),
            Err(TopicTemplateError::BadField(_))
        ));
        assert!(matches!(
            TopicTemplate::parse("{d}/{d}"),
            Err(TopicTemplateError::Duplicate(_))
        ));
        let shared = TopicTemplate::parse("$share/gw/s/{device}/#").expect("valid");
        assert_eq!(shared.filter(), "$share/gw/s/+/#");
        for bad in [
            "$share/",
            "$share/gw",
            "$share//s/#",
            "$share/g+/s",
            "$share/gw/",
        ] {
            assert!(
                matches!(
                    TopicTemplate::parse(bad),
                    Err(TopicTemplateError::BadShare(_))
                ),
                "{bad}"
            );
        }
    }
}
