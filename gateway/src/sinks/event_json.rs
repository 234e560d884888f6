//! The Kafka value of an event in the JSON schema `edge-gateway.event.v1` (README, "Kafka
//! records"), written straight into one buffer.
//!
//! This runs once per event on the router thread. serde's derive wrote every field name
//! through the string escaper and formatted both timestamps into `String`s first; here
//! the constant parts are copied as they are, strings without anything to escape are
//! copied in one piece, and timestamps are written in place. Numbers still go through
//! `serde_json`, so they read exactly as before (`20.5`, `3.0`, `1e+21`, `null` for a
//! non-finite value). `json_value_schema_is_pinned` pins the bytes.

use crate::event::{write_rfc3339, Event, Fields, Location, Value};

/// The JSON value schema name, also the `schema` parameter of the records'
/// `content-type` header.
pub const SCHEMA: &str = "edge-gateway.event.v1";

/// The `content-type` header of an event record with a JSON value: the media type with the
/// schema as a parameter (RFC 6838), so one header names both. A consumer that only
/// checks the type compares what comes before the `;`.
pub const CONTENT_TYPE_JSON: &str = "application/json; schema=edge-gateway.event.v1";

/// The `content-type` header of an event record with a postcard value.
pub const CONTENT_TYPE_POSTCARD: &str = "application/x-postcard; schema=edge-gateway.event.v1";

/// The JSON value bytes of an event.
pub fn event_json_bytes(e: &Event) -> Vec<u8> {
    // Sized for the fixed fields plus a typical reading or tag, so that the buffer is
    // not grown (and copied) two or three times per event.
    let guess =
        320 + e.id.len() + e.device.len() + e.origin.len() + 40 * (e.readings.len() + e.tags.len());
    let mut out = Vec::with_capacity(guess);
    write_event(e, &mut out);
    out
}

/// Appends the JSON value of `e` to `out`.
pub(super) fn write_event(e: &Event, out: &mut Vec<u8>) {
    out.extend_from_slice(br#"{"schema":""#);
    out.extend_from_slice(SCHEMA.as_bytes());
    out.extend_from_slice(br#"","id":"#);
    write_str(&e.id, out);
    out.extend_from_slice(br#","device":"#);
    write_str(&e.device, out);
    out.extend_from_slice(br#","source":"#);
    write_str(&e.source, out);
    out.extend_from_slice(br#","origin":"#);
    write_str(&e.origin, out);
    out.extend_from_slice(br#","time":""#);
    write_rfc3339(e.time_ns, out);
    out.extend_from_slice(br#"","time_ms":"#);
    write_number(e.time_ns.div_euclid(1_000_000), out);
    out.extend_from_slice(br#","clock":""#);
    out.extend_from_slice(e.clock.as_str().as_bytes());
    out.extend_from_slice(br#"","received":""#);
    write_rfc3339(e.received_ns, out);
    out.push(b'"');
    if let Some(Location {
        lat,
        lon,
        alt,
        accuracy,
    }) = e.location
    {
        out.extend_from_slice(br#","location":{"lat":"#);
        write_number(lat, out);
        out.extend_from_slice(br#","lon":"#);
        write_number(lon, out);
        if let Some(alt) = alt {
            out.extend_from_slice(br#","alt":"#);
            write_number(alt, out);
        }
        if let Some(accuracy) = accuracy {
            out.extend_from_slice(br#","accuracy":"#);
            write_number(accuracy, out);
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#","readings":"#);
    write_fields(&e.readings, out, |v, out| match v {
        Value::Number(n) => write_number(*n, out),
        Value::Text(t) => write_str(t, out),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
    });
    out.extend_from_slice(br#","tags":"#);
    write_fields(&e.tags, out, |v, out| write_str(v, out));
    out.push(b'}');
}

/// A JSON object of `fields`, in their (name) order, each value written by `value`.
fn write_fields<V>(fields: &Fields<V>, out: &mut Vec<u8>, value: impl Fn(&V, &mut Vec<u8>)) {
    out.push(b'{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        value(v, out);
    }
    out.push(b'}');
}

/// A number as `serde_json` writes it (shortest round-trip form; `null` if not finite).
fn write_number<N: serde::Serialize>(n: N, out: &mut Vec<u8>) {
    // Writing to a Vec fails only if serialising fails, which numbers never do.
    let _ = serde_json::to_writer(out, &n);
}

/// A JSON string literal, escaped as `serde_json` escapes it: `"`, `\` and control
/// characters (short forms where JSON has them, else `\u00XX`); everything else as is.
fn write_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(br#"\""#),
            b'\\' => out.extend_from_slice(br"\\"),
            b'\n' => out.extend_from_slice(br"\n"),
            b'\r' => out.extend_from_slice(br"\r"),
            b'\t' => out.extend_from_slice(br"\t"),
            0x08 => out.extend_from_slice(br"\b"),
            0x0c => out.extend_from_slice(br"\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(br"\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::ClockQuality;
    use proptest::prelude::*;

    #[test]
    fn content_types_name_the_schema() {
        for ct in [CONTENT_TYPE_JSON, CONTENT_TYPE_POSTCARD] {
            assert_eq!(ct.split_once("; schema=").map(|(_, s)| s), Some(SCHEMA));
        }
    }

    pub(crate) fn event() -> Event {
        Event {
            id: "d/1:5".into(),
            device: "d/1".into(),
            source: "site".into(),
            origin: "t".into(),
            time_ns: 1_700_000_000_123_000_000,
            clock: ClockQuality::Device,
            received_ns: 1_700_000_000_123_000_000,
            location: Some(Location {
                lat: 1.5,
                lon: 2.5,
                alt: None,
                accuracy: Some(3.0),
            }),
            readings: [
                ("t".into(), Value::Number(20.5)),
                ("s".into(), Value::Text("ok".into())),
            ]
            .into(),
            tags: [("site".into(), "b 1".into())].into(),
            route: None,
            redelivered: false,
        }
    }

    #[test]
    fn json_value_schema_is_pinned() {
        let text = String::from_utf8(event_json_bytes(&event())).expect("utf8");
        assert_eq!(
            text,
            r#"{"schema":"edge-gateway.event.v1","id":"d/1:5","device":"d/1","source":"site","origin":"t","time":"2023-11-14T22:13:20.123Z","time_ms":1700000000123,"clock":"device","received":"2023-11-14T22:13:20.123Z","location":{"lat":1.5,"lon":2.5,"accuracy":3.0},"readings":{"s":"ok","t":20.5},"tags":{"site":"b 1"}}"#
        );
    }

    #[test]
    fn odd_values_are_escaped_and_valid() {
        let mut e = event();
        e.device = "a\"b\\c\nd\u{1}e\u{7f}é😀".into();
        e.location = None;
        e.readings.insert("nan".into(), Value::Number(f64::NAN));
        e.readings.insert("big".into(), Value::Number(1e21));
        e.readings.insert("on".into(), Value::Bool(true));
        e.tags.clear();
        let bytes = event_json_bytes(&e);
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.contains(r#""device":"a\"b\\c\nd\u0001e"#), "{text}");
        assert!(text.contains(r#""big":1e+21,"#), "{text}");
        assert!(text.contains(r#""nan":null"#), "{text}");
        assert!(
            text.ends_with(r#""on":true,"s":"ok","t":20.5},"tags":{}}"#),
            "{text}"
        );
        assert!(!text.contains("location"), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
        assert_eq!(v["device"], serde_json::Value::String(e.device.to_string()));
    }

    proptest! {
        /// Any string comes back from a JSON parser as it went in, escaped as serde_json
        /// escapes it.
        #[test]
        fn strings_match_serde_json(s in any::<String>()) {
            let mut ours = Vec::new();
            write_str(&s, &mut ours);
            prop_assert_eq!(&ours, &serde_json::to_vec(&s).expect("serialise"));
        }
    }
}
