//! NMEA 0183 sentences from a GPS receiver into location events (the serial input's
//! `nmea` framing).
//!
//! GGA, RMC and GLL fixes become events of the configured device with the position, and
//! as readings what the sentence carries (satellites, HDOP, altitude; speed and course).
//! The parser (crate `nmea`) verifies each checksum. Sentences without a valid fix, with a
//! bad checksum, that do not parse, or of other types (GSV, GSA, VTG, ...) are dropped and
//! counted by reason: `no_fix`, `bad_checksum`, `malformed_nmea`, `unsupported_sentence`
//! (the first and the last are ordinary receiver traffic: counted, never dead-lettered).

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta};
use nmea::sentences::FixType;
use nmea::ParseResult;

use super::payload::{location, Malformed, Origin};
use crate::event::{content_id, ClockQuality, Event, Fields, Value};

fn bad(reason: &'static str, detail: impl Into<String>) -> Malformed {
    Malformed {
        reason,
        detail: detail.into(),
    }
}

/// Metres per second in a knot.
const KNOT: f64 = 0.514_444;

/// One sentence (without the line ending) into an event of `device`.
pub fn decode(origin: &Origin<'_>, device: &str, line: &str) -> Result<Event, Malformed> {
    let parsed = nmea::parse_str(line).map_err(|e| match e {
        nmea::Error::ChecksumMismatch { calculated, found } => bad(
            "bad_checksum",
            format!("checksum {found:02X}, the sentence sums to {calculated:02X}"),
        ),
        nmea::Error::Unsupported(t) => bad(
            "unsupported_sentence",
            format!("{t} carries no position fix"),
        ),
        nmea::Error::DisabledSentence => bad("unsupported_sentence", "carries no position fix"),
        nmea::Error::Unknown(t) => bad("unsupported_sentence", format!("unknown sentence {t}")),
        other => bad("malformed_nmea", format!("{other:?}")),
    })?;
    let no_fix = || bad("no_fix", "the receiver has no valid fix");
    let mut readings = Fields::new();
    // The parser reads `nan` and `inf` as numbers; a receiver that writes them has no
    // value there, and the sentence is refused rather than a `null` reaching Kafka.
    let number = |name: &str, v: f64| {
        if v.is_finite() {
            Ok(Value::Number(v))
        } else {
            Err(bad(
                "malformed_nmea",
                format!("{name} is {v}, not a number"),
            ))
        }
    };
    let (kind, lat, lon, alt, time) = match parsed {
        ParseResult::GGA(g) => {
            if !g.fix_type.is_some_and(FixType::is_valid) {
                return Err(no_fix());
            }
            if let Some(n) = g.fix_satellites {
                readings.insert("satellites".into(), Value::Number(f64::from(n)));
            }
            if let Some(h) = g.hdop {
                readings.insert("hdop".into(), number("hdop", f64::from(h))?);
            }
            if let Some(t) = g.fix_type {
                readings.insert(
                    "fix".into(),
                    Value::Text(format!("{t:?}").to_lowercase().into()),
                );
            }
            let time = g
                .fix_time
                .and_then(|t| on_nearest_day(t, origin.received_ns));
            (
                "GGA",
                g.latitude,
                g.longitude,
                g.altitude.map(f64::from),
                time,
            )
        }
        ParseResult::RMC(r) => {
            if r.status_of_fix == nmea::sentences::rmc::RmcStatusOfFix::Invalid {
                return Err(no_fix());
            }
            if let Some(s) = r.speed_over_ground {
                readings.insert("speed".into(), number("speed", f64::from(s) * KNOT)?);
            }
            if let Some(c) = r.true_course {
                readings.insert("course".into(), number("course", f64::from(c))?);
            }
            let time = match (r.fix_date, r.fix_time) {
                (Some(d), Some(t)) => at(d, t),
                (None, Some(t)) => on_nearest_day(t, origin.received_ns),
                _ => None,
            };
            ("RMC", r.lat, r.lon, None, time)
        }
        ParseResult::GLL(g) => {
            if !g.valid {
                return Err(no_fix());
            }
            let time = g
                .fix_time
                .and_then(|t| on_nearest_day(t, origin.received_ns));
            ("GLL", g.latitude, g.longitude, None, time)
        }
        _ => return Err(bad("unsupported_sentence", "not GGA, RMC or GLL")),
    };
    let loc = location(lat, lon, alt, None)?.ok_or_else(no_fix)?;
    let (time_ns, clock) = match time {
        Some(ns) => (ns, ClockQuality::Device),
        None => (origin.received_ns, ClockQuality::Gateway),
    };
    let mut tags = Fields::new();
    tags.insert("nmea".into(), kind.into());
    // The resolved time goes into the id: GGA and GLL repeat a line exactly when a
    // receiver stands still at the same second of another day.
    let mut keyed = line.as_bytes().to_vec();
    keyed.extend_from_slice(&time_ns.to_le_bytes());
    Ok(Event {
        id: content_id(origin.source, origin.topic, &keyed, 0).into(),
        device: device.into(),
        source: origin.source.into(),
        origin: origin.topic.into(),
        time_ns,
        clock,
        received_ns: origin.received_ns,
        location: Some(loc),
        readings,
        tags,
        route: None,
        redelivered: false,
    })
}

/// UTC `date` + `time` in ns since the epoch.
fn at(date: NaiveDate, time: NaiveTime) -> Option<i64> {
    date.and_time(time).and_utc().timestamp_nanos_opt()
}

/// A time of day (GGA and GLL carry no date) on the day that puts it nearest to
/// `received_ns`, so a fix just before midnight read just after it is not a day off.
fn on_nearest_day(time: NaiveTime, received_ns: i64) -> Option<i64> {
    let now = DateTime::from_timestamp(
        received_ns.div_euclid(1_000_000_000),
        u32::try_from(received_ns.rem_euclid(1_000_000_000)).ok()?,
    )?;
    let today = now.date_naive();
    [TimeDelta::days(-1), TimeDelta::zero(), TimeDelta::days(1)]
        .into_iter()
        .filter_map(|d| at(today.checked_add_signed(d)?, time))
        .min_by_key(|t| (t - received_ns).unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_490_958_000_000_000_000; // 2017-03-31T11:00:00Z

    fn check(line: &str, expected: Result<(&str, f64, f64, Option<i64>), &str>) {
        let origin = Origin {
            source: "gps",
            topic: "/dev/ttyUSB0",
            captures: &[],
            received_ns: NOW,
        };
        match (decode(&origin, "gps-1", line), expected) {
            (Ok(e), Ok((kind, lat, lon, time))) => {
                let l = e.location.expect("location");
                assert_eq!(e.tags["nmea"], kind, "{line}");
                assert!(
                    (l.lat - lat).abs() < 1e-6 && (l.lon - lon).abs() < 1e-6,
                    "{l:?}"
                );
                assert_eq!(time, (e.clock == ClockQuality::Device).then_some(e.time_ns));
                assert_eq!(e.device, "gps-1");
            }
            (Err(bad), Err(reason)) => assert_eq!(bad.reason, reason, "{line}: {}", bad.detail),
            (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn position_sentences_and_rejects() {
        // From a real receiver (the nmea crate's test log).
        check(
            "$GPRMC,110124,A,5505.330990,N,03858.587325,E,152.6,86.2,310317,8.9,E,D*2E",
            Ok((
                "RMC",
                55.088_849_8,
                38.976_455_4,
                Some(1_490_958_084_000_000_000),
            )),
        );
        check(
            "$GPGGA,110124,5505.330990,N,03858.587325,E,2,09,0.9,2177.0,M,14.0,M,,*7D",
            Ok((
                "GGA",
                55.088_849_8,
                38.976_455_4,
                Some(1_490_958_084_000_000_000),
            )),
        );
        check(
            "$GPGLL,5505.330990,N,03858.587325,E,110124,A,D*48",
            Ok((
                "GLL",
                55.088_849_8,
                38.976_455_4,
                Some(1_490_958_084_000_000_000),
            )),
        );
        check("$GPRMC,,V,,,,,,,,,,N,V*29", Err("no_fix"));
        check("$GPGGA,,,,,,0,,,,,,,,*66", Err("no_fix"));
        check(
            "$GPGGA,110124,5505.330990,N,03858.587325,E,2,09,0.9,2177.0,M,14.0,M,,*7E",
            Err("bad_checksum"),
        );
        check(
            "$GPGSA,A,3,05,07,08,10,15,17,18,19,30,,,,1.2,0.9,0.8*3B",
            Err("unsupported_sentence"),
        );
        check("$GPGGA,garbage*00", Err("bad_checksum"));
        // `nan` and `inf` parse as numbers; they never reach Kafka as null.
        check(
            "$GPGGA,110124,5505.330990,N,03858.587325,E,2,09,nan,2177.0,M,14.0,M,,*3B",
            Err("malformed_nmea"),
        );
        check(
            "$GPGGA,110124,5505.330990,N,03858.587325,E,2,09,0.9,inf,M,14.0,M,,*01",
            Err("bad_location"),
        );
        check("not nmea at all", Err("malformed_nmea"));
    }

    #[test]
    fn a_time_of_day_lands_on_the_nearest_day() {
        let t = |s| NaiveTime::parse_from_str(s, "%H:%M:%S").expect("time");
        let midnight = 1_490_918_400_000_000_000; // 2017-03-31T00:00:00Z
                                                  // 23:59:59 read 2 s after midnight: yesterday.
        assert_eq!(
            on_nearest_day(t("23:59:59"), midnight + 2_000_000_000),
            Some(midnight - 1_000_000_000)
        );
        assert_eq!(
            on_nearest_day(t("00:00:01"), midnight - 1_000_000_000),
            Some(midnight + 1_000_000_000)
        );
    }
}
