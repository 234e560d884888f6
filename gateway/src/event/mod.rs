//! The one event model every input is turned into, and the records that travel through
//! the spool to Kafka.
//!
//! A [`Record`] is what the router moves: an [`Event`] or a [`DeadLetter`] (a payload that
//! could not be decoded). Records are stored in the spool as postcard bytes
//! ([`Record::encode`] / [`Record::decode`]); the encoding is versioned by the spool schema.

mod fields;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

pub use fields::Fields;

/// How far the event time can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockQuality {
    /// The device stamped the event with its own (set) clock.
    Device,
    /// The device sent no usable time; the gateway stamped it on receipt.
    Gateway,
    /// Time source unknown (e.g. uptime-based).
    Unknown,
}

impl ClockQuality {
    /// The name used in the JSON value schema.
    pub fn as_str(self) -> &'static str {
        match self {
            ClockQuality::Device => "device",
            ClockQuality::Gateway => "gateway",
            ClockQuality::Unknown => "unknown",
        }
    }
}

/// A geo-location fix (WGS 84).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude in degrees, -90..=90.
    pub lat: f64,
    /// Longitude in degrees, -180..=180.
    pub lon: f64,
    /// Altitude in metres.
    pub alt: Option<f64>,
    /// Horizontal accuracy in metres.
    pub accuracy: Option<f64>,
}

/// A reading's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// A number.
    Number(f64),
    /// Text.
    Text(CompactString),
    /// A boolean.
    Bool(bool),
}

/// One sensor event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id: `<device>:<seq>` where the source has a sequence, else a content hash.
    /// Redeliveries of the same input give the same id, so consumers can drop duplicates.
    pub id: CompactString,
    /// Device id.
    pub device: CompactString,
    /// Name of the input the event came from.
    pub source: CompactString,
    /// Where in that input: the MQTT topic, the serial port.
    pub origin: CompactString,
    /// Event time, ns since the Unix epoch (UTC).
    pub time_ns: i64,
    /// How far `time_ns` can be trusted.
    pub clock: ClockQuality,
    /// When the gateway received it, ns since the Unix epoch (UTC).
    pub received_ns: i64,
    /// Location, if the event has one.
    pub location: Option<Location>,
    /// Readings by name.
    pub readings: Fields<Value>,
    /// Tags by name.
    pub tags: Fields<CompactString>,
    /// The Kafka topic and key a `route` stage chose; `None`: the output's templates.
    /// Not part of the event's value: it travels beside it (see [`Record::encode`]).
    #[serde(skip)]
    pub route: Option<Box<Route>>,
    /// The source says this may repeat an event it gave before whose ack it never saw
    /// (MQTT's DUP flag on a redelivery): the `dedup` stage passes it on, since the first
    /// copy may not be safe yet and dropping this one would release its ack. Only stages
    /// read it; it is neither spooled nor sent.
    #[serde(skip)]
    pub redelivered: bool,
}

/// Where a `route` stage sent an event: rendered topic and key (each `None`: the output's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The Kafka topic.
    pub topic: Option<String>,
    /// The record key.
    pub key: Option<String>,
}

/// A payload that could not be decoded, kept with the reason for a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Name of the input.
    pub source: String,
    /// Topic or port it came from.
    pub origin: String,
    /// Why it was rejected (a `dropped` reason label, e.g. `malformed_json`).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// When it was received, ns since the Unix epoch.
    pub received_ns: i64,
    /// The raw payload.
    pub payload: Vec<u8>,
}

/// What the router moves, spools and sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A decoded event.
    Event(Event),
    /// A rejected payload bound for the dead-letter topic.
    DeadLetter(DeadLetter),
}

/// A record that cannot be read back from the spool.
#[derive(Debug, thiserror::Error)]
#[error("undecodable spool record: {0}")]
pub struct DecodeError(#[from] postcard::Error);

/// The spool's encoding of a record. The first two variants are [`Record`]'s own, so rows
/// written before routes existed read back unchanged; a routed event is the third.
#[derive(Serialize)]
enum Stored<'a> {
    Event(&'a Event),
    DeadLetter(&'a DeadLetter),
    Routed(&'a Event, &'a Route),
}

/// [`Stored`], read back.
#[derive(Deserialize)]
enum Loaded {
    Event(Event),
    DeadLetter(DeadLetter),
    Routed(Event, Route),
}

impl Record {
    /// Whether spool bytes hold a dead letter, from their first byte (the variant index,
    /// a one-byte varint): without decoding the row.
    pub fn is_dead_letter(stored: &[u8]) -> bool {
        stored.first() == Some(&1)
    }

    /// postcard bytes, as stored in the spool (with the event's route, if any).
    pub fn encode(&self) -> Vec<u8> {
        let stored = match self {
            Record::Event(e) => match &e.route {
                Some(r) => Stored::Routed(e, r),
                None => Stored::Event(e),
            },
            Record::DeadLetter(d) => Stored::DeadLetter(d),
        };
        // A typical event is written into a stack buffer and copied out in one exact
        // allocation (`to_allocvec` grows its Vec from 8 bytes, about five reallocations
        // per event); a larger one is serialised into a growing Vec. Serialising plain
        // data into a Vec cannot fail.
        let mut buf = [0u8; 512];
        match postcard::to_slice(&stored, &mut buf) {
            Ok(bytes) => bytes.to_vec(),
            Err(_) => postcard::to_allocvec(&stored).unwrap_or_default(),
        }
    }

    /// Reads [`Record::encode`] bytes back.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        Ok(match postcard::from_bytes(bytes)? {
            Loaded::Event(e) => Record::Event(e),
            Loaded::DeadLetter(d) => Record::DeadLetter(d),
            Loaded::Routed(mut e, r) => {
                e.route = Some(Box::new(r));
                Record::Event(e)
            }
        })
    }

    /// postcard bytes of the record alone (the Kafka value with `value_format =
    /// "postcard"`): no route, which is the record's topic and key, not its content.
    pub fn value_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// The input the record came from.
    pub fn source(&self) -> &str {
        match self {
            Record::Event(e) => &e.source,
            Record::DeadLetter(d) => &d.source,
        }
    }
}

/// Now, in ns since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A content-hash event id: the same input bytes always give the same id.
pub fn content_id(source: &str, origin: &str, payload: &[u8], index: usize) -> String {
    stamped_content_id(source, origin, payload, index, None)
}

/// [`content_id`] of an event whose payload does not carry its time: `stamp` is the time
/// the gateway gave it. Without it two readings of the same value (a bare `21.5` every
/// minute) would share an id, and consumers (and the `dedup` stage) dropping duplicates
/// by id would drop real readings; with it a redelivery of such a payload cannot be told
/// from a new reading, which is the lesser harm (README "Duplicates").
pub fn stamped_content_id(
    source: &str,
    origin: &str,
    payload: &[u8],
    index: usize,
    stamp: Option<i64>,
) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(source.as_bytes());
    h.update(&[0]);
    h.update(origin.as_bytes());
    h.update(&[0]);
    h.update(payload);
    h.update(&(index as u64).to_le_bytes());
    if let Some(t) = stamp {
        h.update(&t.to_le_bytes());
    }
    format!("h{:032x}", h.digest128())
}

/// The id of an event from a source with sequence numbers: `<device>:<seq>`. Written
/// without `format!` (this runs per event), inline for ids up to 24 bytes.
pub fn sequence_id(device: &str, seq: u64) -> CompactString {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = seq;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut id = CompactString::with_capacity(device.len() + 1 + digits.len() - i);
    id.push_str(device);
    id.push(':');
    // ASCII digits: always UTF-8. One `push_str`, not a `push` (with its capacity check)
    // per digit.
    id.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
    id
}

/// RFC 3339 text (UTC, nanoseconds trimmed) for ns since the epoch.
pub fn rfc3339(ns: i64) -> String {
    let mut out = Vec::with_capacity(30);
    write_rfc3339(ns, &mut out);
    // Only ASCII digits and punctuation were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the RFC 3339 text of `ns` since the epoch: `2023-11-14T22:13:20.123Z`, UTC,
/// the fraction's trailing zeros trimmed and no fraction at all for whole seconds (as the
/// `time` crate writes it; a property test compares the two). Every `i64` is a year
/// between 1677 and 2262, so the year always has four digits.
///
/// The router writes two timestamps per event, the event time and the receipt time: the
/// date text is kept per thread for the last two days written (a device clock may be on
/// another day than the gateway's), and the digits go out in pairs.
pub fn write_rfc3339(ns: i64, out: &mut Vec<u8>) {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400) as u32;
    let date = DATES.with(|dates| {
        let [newer, older] = dates.get();
        if newer.0 == days {
            return newer.1;
        }
        if older.0 == days {
            dates.set([older, newer]);
            return older.1;
        }
        let text = civil_date(days);
        dates.set([(days, text), newer]);
        text
    });
    let [h1, h2] = pair(of_day / 3600);
    let [mi1, mi2] = pair(of_day / 60 % 60);
    let [s1, s2] = pair(of_day % 60);
    out.extend_from_slice(&date);
    out.extend_from_slice(&[b'T', h1, h2, b':', mi1, mi2, b':', s1, s2]);
    if nanos != 0 {
        // Nine digits as one and four pairs, then the trailing zeros trimmed.
        let rest = nanos % 100_000_000;
        let [a1, a2] = pair(rest / 1_000_000);
        let [b1, b2] = pair(rest / 10_000 % 100);
        let [c1, c2] = pair(rest / 100 % 100);
        let [d1, d2] = pair(rest % 100);
        let frac = [
            b'.',
            b'0' + (nanos / 100_000_000) as u8,
            a1,
            a2,
            b1,
            b2,
            c1,
            c2,
            d1,
            d2,
        ];
        let used = 10 - frac.iter().rev().take_while(|&&d| d == b'0').count();
        out.extend_from_slice(&frac[..used]);
    }
    out.push(b'Z');
}

thread_local! {
    /// The last two days (since the epoch) [`write_rfc3339`] wrote on this thread, the
    /// latest first, each with its `YYYY-MM-DD`.
    static DATES: std::cell::Cell<[(i64, [u8; 10]); 2]> =
        const { std::cell::Cell::new([(i64::MIN, [0; 10]); 2]) };
}

/// The two ASCII digits of `v` (below 100).
fn pair(v: u32) -> [u8; 2] {
    [b'0' + (v / 10) as u8, b'0' + (v % 10) as u8]
}

/// `YYYY-MM-DD` of `days` since the epoch (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> [u8; 10] {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    let [y1, y2] = pair(year / 100);
    let [y3, y4] = pair(year % 100);
    let [mo1, mo2] = pair(month);
    let [d1, d2] = pair(day);
    [y1, y2, y3, y4, b'-', mo1, mo2, b'-', d1, d2]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Event {
        Event {
            id: "pump-1:7".into(),
            device: "pump-1".into(),
            source: "site".into(),
            origin: "sensors/pump-1/telemetry".into(),
            time_ns: 1_700_000_000_123_000_000,
            clock: ClockQuality::Device,
            received_ns: 1_700_000_000_200_000_000,
            location: Some(Location {
                lat: 52.5,
                lon: 13.4,
                alt: Some(34.0),
                accuracy: None,
            }),
            readings: [("temperature".into(), Value::Number(21.5))].into(),
            tags: [("site".into(), "berlin".into())].into(),
            route: None,
            redelivered: false,
        }
    }

    /// Spool rows written before the event's strings and maps became `CompactString` and
    /// [`Fields`] read the same: the bytes are those of `String`s and `BTreeMap`s.
    #[test]
    fn spool_bytes_are_those_of_strings_and_btreemaps() {
        use std::collections::BTreeMap;
        #[derive(Serialize)]
        enum OldValue {
            Number(f64),
            #[allow(dead_code)]
            Text(String),
        }
        #[derive(Serialize)]
        struct OldEvent {
            id: String,
            device: String,
            source: String,
            origin: String,
            time_ns: i64,
            clock: ClockQuality,
            received_ns: i64,
            location: Option<Location>,
            readings: BTreeMap<String, OldValue>,
            tags: BTreeMap<String, String>,
        }
        #[derive(Serialize)]
        enum OldStored {
            Event(OldEvent),
        }
        let mut e = sample();
        e.readings.insert("a_text".into(), Value::Text("ok".into()));
        let old = OldStored::Event(OldEvent {
            id: e.id.to_string(),
            device: e.device.to_string(),
            source: e.source.to_string(),
            origin: e.origin.to_string(),
            time_ns: e.time_ns,
            clock: e.clock,
            received_ns: e.received_ns,
            location: e.location,
            readings: [
                ("temperature".to_string(), OldValue::Number(21.5)),
                ("a_text".to_string(), OldValue::Text("ok".into())),
            ]
            .into(),
            tags: [("site".to_string(), "berlin".to_string())].into(),
        });
        let old_bytes = postcard::to_allocvec(&old).expect("encode");
        assert_eq!(Record::Event(e.clone()).encode(), old_bytes);
        assert_eq!(
            Record::decode(&old_bytes).expect("decodes"),
            Record::Event(e)
        );
    }

    /// Spool rows as they are on disk, fixed: a change to any type a row holds (a
    /// variant or field moved, a type changed) fails here, not in a spool in the field.
    #[test]
    fn spool_rows_are_pinned_by_golden_bytes() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut e = Event {
            id: "d:1".into(),
            device: "d".into(),
            source: "s".into(),
            origin: "o".into(),
            time_ns: -1,
            clock: ClockQuality::Unknown,
            received_ns: 2,
            location: Some(Location {
                lat: 1.5,
                lon: -2.0,
                alt: Some(3.0),
                accuracy: None,
            }),
            readings: [
                ("b".into(), Value::Bool(true)),
                ("n".into(), Value::Number(-0.5)),
                ("t".into(), Value::Text("x".into())),
            ]
            .into(),
            tags: [("k".into(), "v".into())].into(),
            route: None,
            redelivered: true,
        };
        let cases: Vec<(Record, &str)> = vec![
            (Record::Event(e.clone()), "0003643a3101640173016f01020401000000000000f83f00000000000000c0010000000000000840000301620201016e00000000000000e0bf017401017801016b0176"),
            (
                Record::Event(Event {
                    clock: ClockQuality::Gateway,
                    location: None,
                    ..e.clone()
                }),
                "0003643a3101640173016f010104000301620201016e00000000000000e0bf017401017801016b0176",
            ),
            (
                Record::DeadLetter(DeadLetter {
                    source: "s".into(),
                    origin: "o".into(),
                    reason: "malformed_json".into(),
                    detail: "d".into(),
                    received_ns: 3,
                    payload: vec![0, 255],
                }),
                "010173016f0e6d616c666f726d65645f6a736f6e0164060200ff",
            ),
        ];
        e.route = Some(Box::new(Route {
            topic: Some("t".into()),
            key: None,
        }));
        let routed = Record::Event(e);
        let mut all = cases;
        all.push((routed, "0203643a3101640173016f01020401000000000000f83f00000000000000c0010000000000000840000301620201016e00000000000000e0bf017401017801016b017601017400"));
        for (record, want) in all {
            let bytes = record.encode();
            assert_eq!(hex(&bytes), want);
            let mut back = Record::decode(&bytes).expect("decodes");
            // Not spooled: the flag is the input's, for the stages.
            if let (Record::Event(b), Record::Event(r)) = (&mut back, &record) {
                b.redelivered = r.redelivered;
            }
            assert_eq!(back, record);
        }
    }

    #[test]
    fn postcard_round_trip_and_size() {
        let r = Record::Event(sample());
        let bytes = r.encode();
        assert!(bytes.len() < 140, "compact: {} bytes", bytes.len());
        assert!(!Record::is_dead_letter(&bytes));
        assert_eq!(Record::decode(&bytes).expect("decodes"), r);
        assert!(Record::decode(&bytes[..bytes.len() / 2]).is_err());
        // Larger than the stack buffer: the same bytes as a growing Vec gives.
        for n in [400, 511, 512, 513, 5000] {
            let d = DeadLetter {
                source: "site".into(),
                origin: "t".into(),
                reason: "malformed_json".into(),
                detail: "x".into(),
                received_ns: 1,
                payload: vec![7; n],
            };
            let want = postcard::to_allocvec(&Stored::DeadLetter(&d)).expect("encode");
            let big = Record::DeadLetter(d);
            let bytes = big.encode();
            assert_eq!(bytes, want, "{n}-byte payload");
            assert!(Record::is_dead_letter(&bytes));
            assert_eq!(Record::decode(&bytes).expect("decodes"), big);
        }
    }

    #[test]
    fn a_route_travels_through_the_spool_but_not_in_the_value() {
        let mut e = sample();
        let plain = Record::Event(e.clone()).encode();
        e.route = Some(Box::new(Route {
            topic: Some("yard.pump-1".into()),
            key: None,
        }));
        let routed = Record::Event(e.clone());
        assert_eq!(Record::decode(&routed.encode()).expect("decodes"), routed);
        // The value is the event alone, as before routes existed: the same bytes as the
        // spool row of the unrouted event.
        assert_eq!(routed.value_bytes(), plain);
    }

    #[test]
    fn sequence_ids() {
        assert_eq!(sequence_id("pump-1", 0), "pump-1:0");
        assert_eq!(sequence_id("pump-1", 7), "pump-1:7");
        assert_eq!(
            sequence_id("a-device-with-a-long-name", u64::MAX),
            format!("a-device-with-a-long-name:{}", u64::MAX)
        );
    }

    #[test]
    fn content_ids_are_stable_and_distinct() {
        let a = content_id("s", "t", b"{}", 0);
        assert_eq!(a, content_id("s", "t", b"{}", 0));
        assert_ne!(a, content_id("s", "t", b"{}", 1));
        assert_ne!(a, content_id("s", "u", b"{}", 0));
        let t = stamped_content_id("s", "t", b"{}", 0, Some(1));
        assert_ne!(t, a, "the gateway's stamp tells repeats apart");
        assert_ne!(t, stamped_content_id("s", "t", b"{}", 0, Some(2)));
        assert_eq!(a, stamped_content_id("s", "t", b"{}", 0, None));
        assert_eq!(a.len(), 33);
    }

    #[test]
    fn rfc3339_text() {
        assert_eq!(
            rfc3339(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_010),
            "2000-02-29T00:00:00.00000001Z"
        );
        assert_eq!(rfc3339(i64::MIN), "1677-09-21T00:12:43.145224192Z");
        assert_eq!(rfc3339(i64::MAX), "2262-04-11T23:47:16.854775807Z");
    }

    /// What the `time` crate writes for `ns`: the reference for [`rfc3339`].
    fn time_crate_rfc3339(ns: i64) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
            .expect("in range")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats")
    }

    proptest::proptest! {
        /// The hand-written formatter writes what the `time` crate writes.
        #[test]
        fn rfc3339_matches_the_time_crate(ns in proptest::prelude::any::<i64>()) {
            proptest::prop_assert_eq!(rfc3339(ns), time_crate_rfc3339(ns));
        }

        /// Two interleaved runs of timestamps, as the router writes them, reuse the
        /// cached dates and still match the `time` crate (across midnight too).
        #[test]
        fn rfc3339_of_nearby_times_matches_the_time_crate(
            base in -5_000_000_000_000_000_000i64..5_000_000_000_000_000_000,
            other in 0i64..400_000_000_000_000,
            steps in proptest::collection::vec(0i64..40_000_000_000_000, 1..20),
        ) {
            // Two clocks, as an event's time and its receipt time, possibly days apart.
            let mut ns = [base, base.saturating_add(other)];
            for step in steps {
                for t in &mut ns {
                    *t = t.saturating_add(step);
                    proptest::prop_assert_eq!(rfc3339(*t), time_crate_rfc3339(*t));
                }
            }
        }
    }
}
