//! Serde support for human durations (`"50ms"`, `"30s"`, `"5m"`) in config files.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// The longest duration a config may hold. Anything longer means "never" in practice,
/// and far longer ones (humantime reads up to 2^64 seconds) would overflow a clock
/// reading they are added to.
pub const MAX: Duration = Duration::from_secs(100 * 366 * 86_400);

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let d = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like \"250ms\", \"30s\" or \"5m\""
        ))
    })?;
    if d > MAX {
        return Err(serde::de::Error::custom(format!(
            "duration {text:?} is too long: at most 100 years"
        )));
    }
    Ok(d)
}

/// The same for `Option<Duration>` (absent: `None`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[derive(serde::Deserialize, Debug)]
    struct T {
        #[serde(with = "super")]
        d: Duration,
    }

    fn parse(text: &str) -> Result<Duration, String> {
        toml::from_str::<T>(&format!("d = \"{text}\""))
            .map(|t| t.d)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations_read_up_to_100_years() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("100y").map(|d| d <= super::MAX), Ok(true));
        // Added to a clock reading, this would overflow it (a panic).
        let e = parse("500000000000y").expect_err("too long");
        assert!(e.contains("at most 100 years"), "{e}");
        assert!(parse("101y").is_err());
    }
}
