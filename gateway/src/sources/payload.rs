//! Payload decoders: MQTT (and later serial) payloads into [`Event`]s.
//!
//! Formats: a JSON object mapped by [`JsonMapping`], SenML (RFC 8428) JSON, and a bare
//! number. A payload that cannot be decoded gives a [`Malformed`] with a short `reason`
//! (the metrics label) and a human detail; it never panics.

use std::borrow::Cow;

use super::json::{Json, Text};
use crate::event::{sequence_id, stamped_content_id, ClockQuality, Event, Fields, Location, Value};
use compact_str::{CompactString, ToCompactString};
use gateway_config::{JsonMapping, PayloadFormat, TimeUnit};
use serde::de::Deserialize;
use smallvec::{smallvec, SmallVec};

/// The events decoded from one payload: one (the usual case) without an allocation.
pub type Events = SmallVec<[Event; 1]>;

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// Metrics label, e.g. `malformed_json`, `missing_device`.
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

fn bad(reason: &'static str, detail: impl Into<String>) -> Malformed {
    Malformed {
        reason,
        detail: detail.into(),
    }
}

/// Everything a decoder needs to know about where a payload came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The input's name.
    pub source: &'a str,
    /// The topic (or port).
    pub topic: &'a str,
    /// Fields captured from the topic template.
    pub captures: &'a [(&'a str, &'a str)],
    /// Receipt time, ns since the epoch.
    pub received_ns: i64,
}

impl Origin<'_> {
    /// A field the topic captured; an empty level (`sensors//telemetry`: MQTT's `+`
    /// matches it) counts as missing.
    fn capture(&self, name: &str) -> Option<&str> {
        self.captures
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_empty())
    }

    fn tags(&self) -> Fields<CompactString> {
        // Inserted one by one (a later capture of a name wins): most topics capture
        // only the device, and collecting even nothing sorted a vector.
        let mut tags = Fields::new();
        for (n, v) in self.captures {
            if *n != "device" && *n != "metric" {
                tags.insert(CompactString::from(*n), CompactString::from(*v));
            }
        }
        tags
    }

    /// An event from here: source, origin and receipt time filled in, the topic's
    /// fields as tags, no location and no readings yet.
    fn event(
        &self,
        id: CompactString,
        device: CompactString,
        time_ns: i64,
        clock: ClockQuality,
    ) -> Event {
        Event {
            id,
            device,
            source: self.source.into(),
            origin: self.topic.into(),
            time_ns,
            clock,
            received_ns: self.received_ns,
            location: None,
            readings: Fields::new(),
            tags: self.tags(),
            route: None,
            redelivered: false,
        }
    }
}

/// A payload format and its JSON mapping, prepared once per input to decode its payloads.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: PayloadFormat,
    mapping: JsonMapping,
    /// What each name of the mapping means to a member of that name, when no name is a
    /// dotted path: a JSON payload is then decoded in one pass over its text, without
    /// building the document (see [`Decoder::decode`]). `None` for a mapping with a
    /// dotted name.
    flat: Option<Vec<Role>>,
}

/// What one name of a mapping makes of the members it names.
#[derive(Debug, Clone)]
struct Role {
    name: String,
    /// The fields it names, one bit per field in [`Named::names`] order.
    fields: u8,
    /// The tags it names, by index in `JsonMapping::tags`.
    tags: Vec<usize>,
    /// A listed reading (`JsonMapping::readings`).
    reading: bool,
}

impl Role {
    /// Each distinct name of `m` with what it maps. An empty name maps no field, tag or
    /// reading (as `lookup` finds nothing for it), but a member named "" is still no
    /// reading when a field or a tag is named "" (as in `Named::find`): it is listed,
    /// mapping nothing.
    fn of(m: &JsonMapping) -> Vec<Role> {
        fn role<'r>(roles: &'r mut Vec<Role>, name: &str) -> &'r mut Role {
            let i = match roles.iter().position(|r| r.name == name) {
                Some(i) => i,
                None => {
                    roles.push(Role {
                        name: name.to_string(),
                        fields: 0,
                        tags: Vec::new(),
                        reading: false,
                    });
                    roles.len() - 1
                }
            };
            &mut roles[i]
        }
        let mut roles = Vec::new();
        for (i, name) in Named::names(m).into_iter().enumerate() {
            let r = role(&mut roles, name);
            if !name.is_empty() {
                r.fields |= 1 << i;
            }
        }
        for (i, t) in m.tags.iter().enumerate() {
            let r = role(&mut roles, t);
            if !t.is_empty() {
                r.tags.push(i);
            }
        }
        for name in m.readings.iter().filter(|n| !n.is_empty()) {
            role(&mut roles, name).reading = true;
        }
        roles
    }

    /// The role of the member `key`, if a name names it: lengths and first bytes are
    /// compared before the names themselves (a `memcmp` call for every key and name of
    /// the same length was 8% of the decoder).
    fn find<'r>(roles: &'r [Role], key: &str) -> Option<&'r Role> {
        let k = key.as_bytes();
        roles.iter().find(|r| {
            let n = r.name.as_bytes();
            n.len() == k.len() && n.first() == k.first() && n == k
        })
    }
}

impl Decoder {
    /// A decoder of `format` payloads; `mapping` is used for JSON objects.
    pub fn new(format: PayloadFormat, mapping: &JsonMapping) -> Decoder {
        let m = mapping;
        let flat = Named::names(m)
            .into_iter()
            .chain(m.tags.iter().map(String::as_str))
            .chain(m.readings.iter().map(String::as_str))
            .all(|n| !n.contains('.'));
        Decoder {
            format,
            mapping: mapping.clone(),
            flat: flat.then(|| Role::of(m)),
        }
    }

    /// Decodes one payload into zero or more events.
    ///
    /// A JSON object under a mapping without dotted names is read in one pass: each
    /// member's key is compared with the mapping's names as it is parsed, the members the
    /// mapping names are kept as values, readings are converted straight from the text,
    /// and anything else is skipped. Building the whole document first and walking it
    /// was about a quarter of the input thread. A dotted name (`pos.lat`) needs the
    /// nested objects, so such a mapping decodes through the document
    /// ([`Decoder::decode_via_document`]); both give the same events and errors (a
    /// property test holds them to it).
    pub fn decode(&self, origin: &Origin<'_>, payload: &[u8]) -> Result<Events, Malformed> {
        match self.format {
            PayloadFormat::Json => match &self.flat {
                Some(roles) => {
                    decode_flat(&self.mapping, roles, origin, payload).map(|e| smallvec![e])
                }
                None => self.decode_via_document(origin, payload),
            },
            _ => self.decode_via_document(origin, payload),
        }
    }

    /// [`Decoder::decode`] with a JSON object always parsed into a document first, then
    /// mapped: what a mapping with dotted names needs. Public for the benchmark that
    /// compares the two ways.
    pub fn decode_via_document(
        &self,
        origin: &Origin<'_>,
        payload: &[u8],
    ) -> Result<Events, Malformed> {
        match self.format {
            PayloadFormat::Json => {
                decode_document(&self.mapping, origin, payload).map(|e| smallvec![e])
            }
            PayloadFormat::Senml => decode_senml(origin, payload).map(Events::from_vec),
            PayloadFormat::Number => decode_number(origin, payload).map(|e| smallvec![e]),
        }
    }
}

fn lookup<'j, 'a>(obj: &'j Json<'a>, path: &str) -> Option<&'j Json<'a>> {
    if path.is_empty() {
        return None;
    }
    obj.get(path).or_else(|| nested(obj, path))
}

/// The member at a dotted `path` through nested objects. `None` for a plain name: one
/// that is not a member (an optional field such as `alt`) needs no second walk.
fn nested<'j, 'a>(obj: &'j Json<'a>, path: &str) -> Option<&'j Json<'a>> {
    if !path.contains('.') {
        return None;
    }
    let mut cur = obj;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// ns per unit of an epoch number; `Auto` guesses the unit by magnitude (seconds below
/// 1e11, milliseconds below 1e14, microseconds below 1e17, else nanoseconds).
fn ns_per_unit(unit: TimeUnit, magnitude: f64) -> Option<i64> {
    Some(match unit {
        TimeUnit::S => 1_000_000_000,
        TimeUnit::Ms => 1_000_000,
        TimeUnit::Us => 1_000,
        TimeUnit::Ns => 1,
        TimeUnit::Rfc3339 => return None,
        TimeUnit::Auto if magnitude < 1e11 => 1_000_000_000,
        TimeUnit::Auto if magnitude < 1e14 => 1_000_000,
        TimeUnit::Auto if magnitude < 1e17 => 1_000,
        TimeUnit::Auto => 1,
    })
}

/// Converts an epoch number (with a fraction) in `unit` to ns. The whole units and the
/// fraction are converted apart, and a fraction of seconds or milliseconds is rounded to
/// the microsecond: `1700000000.123` is 1700000000.1229999 as a double, and multiplying
/// it by 1e9 gave 122.999 ms.
pub fn epoch_to_ns(v: f64, unit: TimeUnit) -> Option<i64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let per = ns_per_unit(unit, v)?;
    if v * per as f64 >= 9.2e18 {
        return None;
    }
    let whole = v.trunc();
    let mut frac = ((v - whole) * per as f64).round() as i64;
    if per >= 1_000_000 {
        frac = (frac + 500) / 1000 * 1000;
    }
    (whole as i64).checked_mul(per)?.checked_add(frac)
}

/// 2001-01-01T00:00:00Z in ns: no sensor event is older. A device time before it is a
/// clock that was never set (counting from 1970 at power-on, or an uptime).
pub const UNSET_CLOCK_BEFORE_NS: i64 = 978_307_200_000_000_000;

/// The event time and its quality for a time a device sent: its own, or, from a clock
/// that was never set ([`UNSET_CLOCK_BEFORE_NS`]), the gateway's receive time (as the
/// firmware bridge does for uptimes): Kafka deletes a record whose timestamp is older
/// than the topic's retention (a 1970 one at once), and newer brokers refuse it.
fn device_time(ns: i64, received_ns: i64) -> (i64, ClockQuality) {
    if ns < UNSET_CLOCK_BEFORE_NS {
        (received_ns, ClockQuality::Gateway)
    } else {
        (ns, ClockQuality::Device)
    }
}

/// Converts an integer epoch in `unit` to ns, exactly.
pub fn epoch_int_to_ns(v: i64, unit: TimeUnit) -> Option<i64> {
    if v < 0 {
        return None;
    }
    v.checked_mul(ns_per_unit(unit, v as f64)?)
}

/// Parses RFC 3339 text to ns since the epoch.
pub fn rfc3339_to_ns(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    // Before 1970 is refused, as a negative epoch number is.
    i64::try_from(t.unix_timestamp_nanos())
        .ok()
        .filter(|ns| *ns >= 0)
}

fn parse_time(v: &Json<'_>, unit: TimeUnit) -> Result<i64, Malformed> {
    let ns = match v {
        Json::Number(n) if unit != TimeUnit::Rfc3339 => match n.as_i64() {
            Some(i) => epoch_int_to_ns(i, unit),
            None => n.as_f64().and_then(|f| epoch_to_ns(f, unit)),
        },
        Json::String(s) if matches!(unit, TimeUnit::Auto | TimeUnit::Rfc3339) => rfc3339_to_ns(s),
        _ => None,
    };
    ns.ok_or_else(|| {
        bad(
            "bad_time",
            format!("cannot read {v} as a timestamp ({unit:?})"),
        )
    })
}

fn json_device(v: &Json<'_>) -> Option<CompactString> {
    match v {
        Json::String(s) if !s.is_empty() => Some(CompactString::from(&**s)),
        Json::Number(n) => Some(n.to_compact_string()),
        _ => None,
    }
}

/// A location from optional parts: none without lat/lon, an error when out of range.
pub(crate) fn location(
    lat: Option<f64>,
    lon: Option<f64>,
    alt: Option<f64>,
    acc: Option<f64>,
) -> Result<Option<Location>, Malformed> {
    match (lat, lon) {
        (None, None) => Ok(None),
        (Some(lat), Some(lon)) => {
            if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                return Err(bad(
                    "bad_location",
                    format!("lat {lat} / lon {lon} out of range"),
                ));
            }
            if alt.is_some_and(|v| !v.is_finite()) || acc.is_some_and(|v| !v.is_finite()) {
                return Err(bad(
                    "bad_location",
                    "altitude and accuracy must be finite numbers",
                ));
            }
            Ok(Some(Location {
                lat,
                lon,
                alt,
                accuracy: acc,
            }))
        }
        _ => Err(bad("bad_location", "lat and lon must come together")),
    }
}

/// The mapping's named fields of one payload, found in one walk over its members.
///
/// Each field is `lookup`'s answer for its name: the member of that literal name (the
/// last one if it repeats) or, for a dotted path that is no member's name, the nested
/// member. One walk compares each key with the names once, where a lookup per name
/// walked the members seven times and the readings walk compared every key with every
/// name twice more (string compares were 7% of the input thread).
struct Named<'j, 'a> {
    /// In [`Named::names`] order: device, time, seq, lat, lon, alt, accuracy.
    fields: [Option<&'j Json<'a>>; 7],
    /// Per member: whether a name or a tag names it (it is then no reading).
    reserved: SmallVec<[bool; 16]>,
}

impl<'j, 'a> Named<'j, 'a> {
    const DEVICE: usize = 0;
    const TIME: usize = 1;
    const SEQ: usize = 2;
    const LAT: usize = 3;
    const LON: usize = 4;
    const ALT: usize = 5;
    const ACCURACY: usize = 6;

    fn names(m: &JsonMapping) -> [&str; 7] {
        [
            &m.device,
            &m.time,
            &m.seq,
            &m.lat,
            &m.lon,
            &m.alt,
            &m.accuracy,
        ]
    }

    fn find(m: &JsonMapping, members: &'j [(Cow<'a, str>, Json<'a>)]) -> Named<'j, 'a> {
        let names = Named::names(m);
        let mut fields = [None; 7];
        let mut reserved = SmallVec::with_capacity(members.len());
        for (k, v) in members {
            let k: &str = k;
            let mut named = false;
            for (slot, name) in fields.iter_mut().zip(names) {
                if name == k {
                    named = true;
                    // An empty name maps no field (as in `lookup`), but its member is
                    // still no reading.
                    if !name.is_empty() {
                        *slot = Some(v);
                    }
                }
            }
            reserved.push(named || m.tags.iter().any(|t| t == k));
        }
        Named { fields, reserved }
    }

    /// The field `i` of `doc`, as [`lookup`] would find it.
    fn get(&self, doc: &'j Json<'a>, m: &JsonMapping, i: usize) -> Option<&'j Json<'a>> {
        // The literal member was looked for in `find`: only the nested walk is left.
        self.fields[i].or_else(|| nested(doc, Named::names(m)[i]))
    }
}

/// What a JSON object maps to, found by either way of reading it: the mapping's fields,
/// its tags (per name in `JsonMapping::tags`) and the readings.
struct Found<'j, 'a> {
    /// In [`Named::names`] order.
    fields: [Option<&'j Json<'a>>; 7],
    tags: SmallVec<[Option<&'j Json<'a>>; 4]>,
    readings: Fields<Value>,
}

/// A reading's value, if the member is one: a number, a string or a boolean.
fn to_value(v: &Json<'_>) -> Option<Value> {
    match v {
        Json::Number(n) => n.as_f64().map(Value::Number),
        Json::String(s) => Some(Value::Text(CompactString::from(&**s))),
        Json::Bool(b) => Some(Value::Bool(*b)),
        _ => None,
    }
}

fn not_json(e: serde_json::Error) -> Malformed {
    bad("malformed_json", format!("not JSON: {e}"))
}

fn not_an_object() -> Malformed {
    bad("malformed_json", "the payload must be a JSON object")
}

/// The JSON decoder through the whole document: parsed, then walked by the mapping.
fn decode_document(m: &JsonMapping, o: &Origin<'_>, payload: &[u8]) -> Result<Event, Malformed> {
    let doc = Json::parse(payload).map_err(not_json)?;
    let Json::Object(members) = &doc else {
        return Err(not_an_object());
    };
    let named = Named::find(m, members);
    let mut readings = Fields::new();
    if m.readings.is_empty() {
        // Capped: repeated keys and nested values count here but are no readings.
        let candidates = named.reserved.iter().filter(|r| !**r).count();
        readings.reserve_exact(candidates.min(16));
        // A repeated key counts once, as its last value (as `serde_json::Value`
        // reads it): walk from the end and skip keys already decided.
        let mut skipped = std::collections::BTreeSet::new();
        for ((k, v), reserved) in members.iter().zip(&named.reserved).rev() {
            let k: &str = k;
            if *reserved || readings.contains_key(k) || skipped.contains(k) {
                continue;
            }
            match to_value(v) {
                Some(val) => {
                    readings.insert(CompactString::from(k), val);
                }
                None => {
                    skipped.insert(k);
                }
            }
        }
    } else {
        readings.reserve_exact(m.readings.len());
        for r in &m.readings {
            if let Some(val) = lookup(&doc, r).and_then(to_value) {
                readings.insert(CompactString::from(r.as_str()), val);
            }
        }
    }
    let found = Found {
        fields: std::array::from_fn(|i| named.get(&doc, m, i)),
        tags: m.tags.iter().map(|t| lookup(&doc, t)).collect(),
        readings,
    };
    finish(m, o, payload, found)
}

/// The JSON decoder in one pass over the text, for a mapping without dotted names (see
/// [`Decoder::decode`]).
fn decode_flat(
    m: &JsonMapping,
    roles: &[Role],
    o: &Origin<'_>,
    payload: &[u8],
) -> Result<Event, Malformed> {
    let mut pass = Pass {
        roles,
        every_reading: m.readings.is_empty(),
        values: SmallVec::new(),
        fields: [None; 7],
        tags: smallvec![None; m.tags.len()],
        readings: SmallVec::new(),
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let object = serde::de::DeserializeSeed::deserialize(&mut pass, &mut de).map_err(not_json)?;
    de.end().map_err(not_json)?;
    if !object {
        return Err(not_an_object());
    }
    // The last of a repeated name decides, as in the document's walk: a later null
    // (or object) takes back an earlier reading.
    let mut readings = Fields::new();
    let valid = pass.readings.iter().filter(|(_, v)| v.is_some()).count();
    readings.reserve_exact(valid.min(16));
    for (k, v) in pass.readings.drain(..) {
        match v {
            Some(v) => {
                readings.insert(k, v);
            }
            None => {
                readings.remove(&k);
            }
        }
    }
    let values = &pass.values;
    let found = Found {
        fields: pass.fields.map(|i| i.map(|i| &values[i])),
        tags: pass.tags.iter().map(|i| i.map(|i| &values[i])).collect(),
        readings,
    };
    finish(m, o, payload, found)
}

/// One pass over a JSON object for [`decode_flat`]: what it keeps of the members.
struct Pass<'m, 'a> {
    roles: &'m [Role],
    /// No readings are listed: every member no name names is a reading.
    every_reading: bool,
    /// Members the mapping names (as fields or tags), parsed.
    values: SmallVec<[Json<'a>; 8]>,
    /// Per field, in [`Named::names`] order: its value's index in `values`.
    fields: [Option<usize>; 7],
    /// Per name in `JsonMapping::tags`: its value's index in `values`.
    tags: SmallVec<[Option<usize>; 4]>,
    /// The reading members in document order, `None` where the value is no reading.
    readings: SmallVec<[(CompactString, Option<Value>); 8]>,
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Pass<'_, 'de> {
    /// Whether the text was an object.
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Pass<'_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(Text(k)) = map.next_key::<Text<'de>>()? {
            let k: &str = &k;
            let role = Role::find(self.roles, k);
            let reading = match role {
                None => self.every_reading,
                // Named: no reading unless listed as one.
                Some(r) => r.reading,
            };
            match role {
                Some(r) if r.fields != 0 || !r.tags.is_empty() => {
                    let v: Json<'de> = map.next_value()?;
                    if reading {
                        self.readings.push((CompactString::from(k), to_value(&v)));
                    }
                    let at = self.values.len();
                    self.values.push(v);
                    for (i, slot) in self.fields.iter_mut().enumerate() {
                        if r.fields & (1 << i) != 0 {
                            *slot = Some(at);
                        }
                    }
                    for &t in &r.tags {
                        self.tags[t] = Some(at);
                    }
                }
                _ if reading => {
                    let Reading(v) = map.next_value()?;
                    self.readings.push((CompactString::from(k), v));
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(false)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// A value read and thrown away, checked as the document's parser checks it. serde's
/// `IgnoredAny` would be cheaper, but serde_json skips it without checking a string's
/// UTF-8 or a number's range (`[1e400]` would pass where the document fails) and reports
/// a bad string one column off: the two ways would not agree.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Skip;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        d.deserialize_any(V)
    }
}

/// A member's value read straight as a reading: `None` for anything [`to_value`] turns
/// down (null, an array, an object), which is skipped over unbuilt.
struct Reading(Option<Value>);

impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reading, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Reading;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Reading, E> {
                Ok(Reading(Some(Value::Bool(v))))
            }
            // As `serde_json::Number::as_f64` reads them.
            fn visit_i64<E>(self, v: i64) -> Result<Reading, E> {
                Ok(Reading(Some(Value::Number(v as f64))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Reading, E> {
                Ok(Reading(Some(Value::Number(v as f64))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Reading, E> {
                Ok(Reading(Some(Value::Number(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Reading, E> {
                Ok(Reading(Some(Value::Text(CompactString::from(v)))))
            }
            fn visit_unit<E>(self) -> Result<Reading, E> {
                Ok(Reading(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Reading, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Reading(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Reading, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Reading(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The event from what the mapping found in a payload; the checks in a fixed order
/// (device, time, location), so either way of reading gives the same error.
fn finish(
    m: &JsonMapping,
    o: &Origin<'_>,
    payload: &[u8],
    found: Found<'_, '_>,
) -> Result<Event, Malformed> {
    let Found {
        fields,
        tags: tag_values,
        readings,
    } = found;
    let device = match o.capture("device") {
        Some(d) => CompactString::from(d),
        None => fields[Named::DEVICE].and_then(json_device).ok_or_else(|| {
            bad(
                "missing_device",
                format!("no device id in field {:?} or the topic", m.device),
            )
        })?,
    };
    let parsed = match fields[Named::TIME] {
        Some(v) if *v != Json::Null => Some(parse_time(v, m.time_unit)?),
        _ => None,
    };
    // A time of exactly 0 is a clock that does not run (stuck at the epoch): every
    // reading would carry the same one, and equal readings would share an id.
    let own_time = parsed.is_some_and(|ns| ns != 0);
    let (time_ns, clock) = match parsed {
        Some(ns) => device_time(ns, o.received_ns),
        None => (o.received_ns, ClockQuality::Gateway),
    };
    let num = |i: usize| -> Result<Option<f64>, Malformed> {
        match fields[i] {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(bad(
                "bad_location",
                format!("field {:?} is {other}, not a number", Named::names(m)[i]),
            )),
        }
    };
    let loc = location(
        num(Named::LAT)?,
        num(Named::LON)?,
        num(Named::ALT)?,
        num(Named::ACCURACY)?,
    )?;
    let seq = fields[Named::SEQ].and_then(Json::as_u64);
    let mut tags = Fields::new();
    for (t, v) in m.tags.iter().zip(tag_values) {
        if let Some(v) = v {
            let s = match v {
                Json::String(s) => CompactString::from(&**s),
                other => other.to_compact_string(),
            };
            tags.insert(CompactString::from(t.as_str()), s);
        }
    }
    let id = match seq {
        Some(s) => sequence_id(&device, s),
        // The stamp only where the payload has no time of its own: a redelivery of one
        // with a time (even from a clock never set) keeps its id.
        None => stamped_content_id(
            o.source,
            o.topic,
            payload,
            0,
            (!own_time).then_some(time_ns),
        )
        .into(),
    };
    let mut e = o.event(id, device, time_ns, clock);
    e.location = loc;
    e.readings = readings;
    e.tags.append(&mut tags);
    Ok(e)
}

fn decode_number(o: &Origin<'_>, payload: &[u8]) -> Result<Event, Malformed> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| bad("malformed_number", "payload is not UTF-8"))?
        .trim();
    let v: f64 = text
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| bad("malformed_number", format!("{text:?} is not a number")))?;
    let device = o
        .capture("device")
        .ok_or_else(|| bad("missing_device", "the topic has no {device} field"))?;
    let metric = o.capture("metric").unwrap_or("value");
    let mut e = o.event(
        stamped_content_id(o.source, o.topic, payload, 0, Some(o.received_ns)).into(),
        device.into(),
        o.received_ns,
        ClockQuality::Gateway,
    );
    e.readings.reserve_exact(1);
    e.readings.insert(metric.into(), Value::Number(v));
    Ok(e)
}

/// SenML: resolves base fields, groups records of one device and time into one event.
fn decode_senml(o: &Origin<'_>, payload: &[u8]) -> Result<Vec<Event>, Malformed> {
    use serde_json::Value as Json;
    let doc: Json = serde_json::from_slice(payload)
        .map_err(|e| bad("malformed_senml", format!("not JSON: {e}")))?;
    let records = doc
        .as_array()
        .ok_or_else(|| bad("malformed_senml", "SenML is a JSON array of records"))?;
    let mut bn = String::new();
    let mut bt = 0.0f64;
    let mut bv = 0.0f64;
    let mut bs = 0.0f64;
    // (device, time) -> event, in first-seen order.
    let mut out: Vec<Event> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let r = r
            .as_object()
            .ok_or_else(|| bad("malformed_senml", format!("record {i} is not an object")))?;
        if let Some(v) = r.get("bn") {
            bn = v
                .as_str()
                .ok_or_else(|| bad("malformed_senml", "bn must be text"))?
                .to_string();
        }
        if let Some(v) = r.get("bt") {
            bt = v
                .as_f64()
                .ok_or_else(|| bad("malformed_senml", "bt must be a number"))?;
        }
        if let Some(v) = r.get("bv") {
            bv = v
                .as_f64()
                .ok_or_else(|| bad("malformed_senml", "bv must be a number"))?;
        }
        if let Some(v) = r.get("bs") {
            bs = v
                .as_f64()
                .ok_or_else(|| bad("malformed_senml", "bs must be a number"))?;
        }
        let wrong = |field: &str, what: &str| {
            bad(
                "malformed_senml",
                format!("record {i}: {field} must be {what}"),
            )
        };
        // RFC 8428 section 4.4: a field ending in `_` must be understood, or the pack
        // refused.
        if let Some(k) = r.keys().find(|k| k.ends_with('_')) {
            return Err(bad(
                "malformed_senml",
                format!("record {i}: unknown must-understand field {k:?}"),
            ));
        }
        let n = match r.get("n") {
            None => "",
            Some(v) => v.as_str().ok_or_else(|| wrong("n", "text"))?,
        };
        let full = format!("{bn}{n}");
        let t = bt
            + match r.get("t") {
                None => 0.0,
                Some(v) => v.as_f64().ok_or_else(|| wrong("t", "a number"))?,
            };
        let value = if let Some(v) = r.get("v") {
            let v = bv + v.as_f64().ok_or_else(|| wrong("v", "a number"))?;
            if !v.is_finite() {
                return Err(wrong("bv + v", "a finite number"));
            }
            Value::Number(v)
        } else if let Some(v) = r.get("vs") {
            Value::Text(v.as_str().ok_or_else(|| wrong("vs", "text"))?.into())
        } else if let Some(v) = r.get("vb") {
            Value::Bool(v.as_bool().ok_or_else(|| wrong("vb", "true or false"))?)
        } else if let Some(v) = r.get("vd") {
            // Data values are base64 text; kept as the text.
            Value::Text(v.as_str().ok_or_else(|| wrong("vd", "base64 text"))?.into())
        } else if let Some(v) = r.get("s") {
            // A sum without a value: the sum is the reading (RFC 8428 section 4.2).
            let v = bs + v.as_f64().ok_or_else(|| wrong("s", "a number"))?;
            if !v.is_finite() {
                return Err(wrong("bs + s", "a finite number"));
            }
            Value::Number(v)
        } else if r.keys().all(|k| k.starts_with('b')) {
            continue; // a base-only record (bn, bt, bv, bu, bs, bver)
        } else {
            return Err(bad("malformed_senml", format!("record {i} has no value")));
        };
        // Device: topic field, else the base name without its trailing separator.
        let (device, reading) = match o.capture("device") {
            Some(d) => (CompactString::from(d), CompactString::from(full.as_str())),
            None => {
                let dev = CompactString::from(bn.trim_end_matches([':', '/', '.']));
                if dev.is_empty() {
                    return Err(bad("missing_device", "no bn and no {device} topic field"));
                }
                let reading = CompactString::from(if n.is_empty() { "value" } else { n });
                (dev, reading)
            }
        };
        if reading.is_empty() {
            return Err(bad("malformed_senml", format!("record {i} has no name")));
        }
        // RFC 8428: times below 2^28 are relative to now.
        let (time_ns, clock) = if t == 0.0 {
            (o.received_ns, ClockQuality::Gateway)
        } else if t < 268_435_456.0 {
            // Relative to now; never before 1970 (a negative Kafka timestamp means
            // none), and no overflow from a huge negative offset.
            let ns = o.received_ns.saturating_add((t * 1e9) as i64);
            if ns < 0 {
                return Err(bad(
                    "bad_time",
                    format!("record {i}: time {t} is before 1970"),
                ));
            }
            (ns, ClockQuality::Gateway)
        } else {
            // The device's time as it is (a clock never set is dealt with below, once
            // the pack's records are grouped by it).
            (
                epoch_to_ns(t, TimeUnit::S)
                    .ok_or_else(|| bad("bad_time", format!("record {i}: bad time {t}")))?,
                ClockQuality::Device,
            )
        };
        let idx = match out
            .iter()
            .position(|e| e.device == device && e.time_ns == time_ns)
        {
            Some(p) => p,
            None => {
                out.push(o.event(CompactString::default(), device, time_ns, clock));
                out.len() - 1
            }
        };
        out[idx].readings.insert(reading, value);
    }
    if out.is_empty() {
        return Err(bad("malformed_senml", "no records with values"));
    }
    // The id takes the gateway's stamp only where the payload carries no time of its own
    // (a relative or missing `t`): a redelivery of the same pack keeps its ids.
    let stamped: Vec<bool> = out
        .iter()
        .map(|e| e.clock != ClockQuality::Device)
        .collect();
    // Times from a clock never set (before 2001) keep their spacing, the newest at
    // receipt: substituting each on its own would merge the pack's times into one.
    let unset = |e: &Event| e.clock == ClockQuality::Device && e.time_ns < UNSET_CLOCK_BEFORE_NS;
    if let Some(newest) = out.iter().filter(|e| unset(e)).map(|e| e.time_ns).max() {
        for e in out.iter_mut().filter(|e| unset(e)) {
            e.time_ns = o.received_ns.saturating_sub(newest - e.time_ns).max(0);
            e.clock = ClockQuality::Gateway;
        }
    }
    for (i, (e, stamped)) in out.iter_mut().zip(stamped).enumerate() {
        let num = |k: &str| match e.readings.get(k) {
            Some(Value::Number(v)) => Some(*v),
            _ => None,
        };
        if let (Some(lat), Some(lon)) = (num("lat"), num("lon")) {
            e.location = location(Some(lat), Some(lon), num("alt"), None)?;
            e.readings.remove("lat");
            e.readings.remove("lon");
            e.readings.remove("alt");
        }
        let stamp = stamped.then_some(e.time_ns);
        e.id = stamped_content_id(o.source, o.topic, payload, i, stamp).into();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    /// Decodes through a prepared [`Decoder`], and holds the one-pass JSON decoder to
    /// what the document's walk makes of the same payload.
    fn decode(
        format: PayloadFormat,
        m: &JsonMapping,
        origin: &Origin<'_>,
        payload: &[u8],
    ) -> Result<Events, Malformed> {
        let d = Decoder::new(format, m);
        let got = d.decode(origin, payload);
        let text = String::from_utf8_lossy(payload);
        assert_eq!(got, d.decode_via_document(origin, payload), "{text}");
        got
    }

    /// (device, event id prefix, event time, readings)
    type Expected<'a> = (&'a str, &'a str, Option<i64>, &'a [(&'a str, f64)]);

    fn check(
        format: PayloadFormat,
        topic_caps: &[(&str, &str)],
        payload: &str,
        expected: Result<&[Expected<'_>], &str>,
    ) {
        let origin = Origin {
            source: "in",
            topic: "t/x",
            captures: topic_caps,
            received_ns: NOW,
        };
        let got = decode(format, &JsonMapping::default(), &origin, payload.as_bytes());
        match (got, expected) {
            (Ok(events), Ok(exp)) => {
                assert_eq!(events.len(), exp.len(), "{payload}");
                for (e, (dev, id_prefix, t, readings)) in events.iter().zip(exp) {
                    assert_eq!(e.device, *dev, "{payload}");
                    assert!(e.id.starts_with(id_prefix), "{} vs {id_prefix}", e.id);
                    if let Some(t) = t {
                        assert_eq!(e.time_ns, *t, "{payload}");
                    }
                    for (name, v) in *readings {
                        assert_eq!(e.readings.get(name), Some(&Value::Number(*v)), "{payload}");
                    }
                }
            }
            (Err(m), Err(reason)) => assert_eq!(m.reason, reason, "{payload}: {}", m.detail),
            (got, exp) => panic!("{payload}: got {got:?}, expected {exp:?}"),
        }
    }

    #[test]
    fn json_mapping() {
        use PayloadFormat::Json as J;
        check(
            J,
            &[],
            r#"{"device":"d1","seq":5,"ts":1700000000,"t":1.5}"#,
            Ok(&[("d1", "d1:5", Some(1_700_000_000_000_000_000), &[("t", 1.5)])]),
        );
        check(
            J,
            &[("device", "topicdev")],
            r#"{"device":"x","ts":1700000000123,"t":2}"#,
            Ok(&[(
                "topicdev",
                "h",
                Some(1_700_000_000_123_000_000),
                &[("t", 2.0)],
            )]),
        );
        check(
            J,
            &[],
            r#"{"device":"d","ts":"2023-11-14T22:13:20.5Z","v":1}"#,
            Ok(&[("d", "h", Some(1_700_000_000_500_000_000), &[("v", 1.0)])]),
        );
        check(
            J,
            &[],
            r#"{"device":"d","ts":1700000000123456,"v":1}"#,
            Ok(&[("d", "h", Some(1_700_000_000_123_456_000), &[])]),
        );
        check(
            J,
            &[],
            r#"{"device":"d","v":1}"#,
            Ok(&[("d", "h", Some(NOW), &[])]),
        );
        check(
            J,
            &[],
            r#"{"device":"d","lat":91,"lon":0}"#,
            Err("bad_location"),
        );
        check(J, &[], r#"{"device":"d","lat":52}"#, Err("bad_location"));
        check(J, &[], r#"{"v":1}"#, Err("missing_device"));
        check(
            J,
            &[],
            r#"{"device":"d","ts":"yesterday"}"#,
            Err("bad_time"),
        );
        check(J, &[], r#"[1,2]"#, Err("malformed_json"));
        check(J, &[], "{\"device\":", Err("malformed_json"));
        check(J, &[], "\u{0}\u{ff}", Err("malformed_json"));
    }

    #[test]
    fn json_location_and_tags() {
        let origin = Origin {
            source: "in",
            topic: "s/site1/d",
            captures: &[("site", "site1")],
            received_ns: NOW,
        };
        let m = JsonMapping {
            tags: vec!["fw".into()],
            ..JsonMapping::default()
        };
        let e = decode(
            PayloadFormat::Json,
            &m,
            &origin,
            br#"{"device":"d","lat":52.5,"lon":13.4,"alt":30,"fw":"1.2","temp":20}"#,
        )
        .expect("decodes")
        .remove(0);
        let loc = e.location.expect("location");
        assert_eq!((loc.lat, loc.lon, loc.alt), (52.5, 13.4, Some(30.0)));
        assert_eq!(e.tags.get("site").map(|v| v.as_str()), Some("site1"));
        assert_eq!(e.tags.get("fw").map(|v| v.as_str()), Some("1.2"));
        assert_eq!(e.readings.keys().collect::<Vec<_>>(), ["temp"]);
    }

    #[test]
    fn dotted_names_read_nested_members_after_literal_ones() {
        let origin = Origin {
            source: "in",
            topic: "t",
            captures: &[],
            received_ns: NOW,
        };
        let m = JsonMapping {
            device: "meta.id".into(),
            lat: "pos.lat".into(),
            lon: "pos.lon".into(),
            // An empty name maps nothing; a member named "" is still no reading.
            alt: String::new(),
            ..JsonMapping::default()
        };
        let e = decode(
            PayloadFormat::Json,
            &m,
            &origin,
            br#"{"meta":{"id":"nested"},"pos":{"lat":1,"lon":2},"pos.lat":3,"":7,"t":4}"#,
        )
        .expect("decodes")
        .remove(0);
        assert_eq!(e.device, "nested");
        let loc = e.location.expect("location");
        // The member literally named "pos.lat" wins over the nested one, as in `lookup`.
        assert_eq!((loc.lat, loc.lon, loc.alt), (3.0, 2.0, None));
        assert_eq!(e.readings.keys().collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn a_repeated_field_reads_as_its_last_value() {
        let origin = Origin {
            source: "in",
            topic: "t",
            captures: &[],
            received_ns: NOW,
        };
        let m = JsonMapping::default();
        let e = decode(
            PayloadFormat::Json,
            &m,
            &origin,
            br#"{"device":"a","device":"b","t":1,"t":2,"u":1,"u":null,"v":null,"v":"x"}"#,
        )
        .expect("decodes")
        .remove(0);
        assert_eq!(e.device, "b");
        assert_eq!(e.readings.get("t"), Some(&Value::Number(2.0)));
        assert_eq!(e.readings.get("u"), None);
        assert_eq!(e.readings.get("v"), Some(&Value::Text("x".into())));
    }

    #[test]
    fn senml() {
        use PayloadFormat::Senml as S;
        check(
            S,
            &[],
            r#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e9,"n":"temp","v":23.1},{"n":"hum","v":40}, {"n":"temp","t":60,"v":24}]"#,
            Ok(&[
                (
                    "urn:dev:ow:10e2073a01080063",
                    "h",
                    Some(1_320_067_464_000_000_000),
                    &[("temp", 23.1), ("hum", 40.0)],
                ),
                (
                    "urn:dev:ow:10e2073a01080063",
                    "h",
                    Some(1_320_067_524_000_000_000),
                    &[("temp", 24.0)],
                ),
            ]),
        );
        check(
            S,
            &[("device", "d9")],
            r#"[{"n":"v","v":1,"t":-5}]"#,
            Ok(&[("d9", "h", Some(NOW - 5_000_000_000), &[("v", 1.0)])]),
        );
        check(S, &[], r#"{"n":"x"}"#, Err("malformed_senml"));
        check(S, &[], r#"[{"n":"x","v":1}]"#, Err("missing_device"));
        check(S, &[], r#"[{"bn":"d:","n":"x"}]"#, Err("malformed_senml"));
        // Every time below 2^28 is relative, negative ones too (RFC 8428 section 4.5.3).
        check(
            S,
            &[("device", "d9")],
            r#"[{"n":"v","v":1,"t":-300000000}]"#,
            Ok(&[(
                "d9",
                "h",
                Some(NOW - 300_000_000_000_000_000),
                &[("v", 1.0)],
            )]),
        );
        // A sum alone is a value; base-only records of any base field; wrong types refused.
        check(
            S,
            &[],
            r#"[{"bn":"d/","bu":"W","bver":10},{"n":"t","v":21},{"bs":100},{"n":"e","s":34}]"#,
            Ok(&[("d", "h", Some(NOW), &[("t", 21.0), ("e", 134.0)])]),
        );
        for bad_record in [
            r#"[{"bn":"d/","n":"x","vb":"true"}]"#,
            r#"[{"bn":"d/","n":"x","vs":5}]"#,
            r#"[{"bn":"d/","n":"x","v":1,"t":"x"}]"#,
            r#"[{"bn":"d/","n":"x","v":1,"ext_":1}]"#,
            r#"[{"bn":"d/","bv":1e308,"n":"x","v":1e308}]"#,
        ] {
            check(S, &[], bad_record, Err("malformed_senml"));
        }
        for before_1970 in [
            r#"[{"bn":"d/","n":"x","v":1,"t":-1e10}]"#,
            r#"[{"bn":"d/","bt":-1e308,"n":"x","v":1,"t":-1e308}]"#,
        ] {
            check(S, &[], before_1970, Err("bad_time"));
        }
    }

    /// The id of the first event `payload` decodes to, received at `received_ns`.
    fn first_id(
        format: PayloadFormat,
        captures: &[(&str, &str)],
        received_ns: i64,
        payload: &str,
    ) -> CompactString {
        let origin = Origin {
            source: "in",
            topic: "t/x",
            captures,
            received_ns,
        };
        decode(format, &JsonMapping::default(), &origin, payload.as_bytes()).expect("decodes")[0]
            .id
            .clone()
    }

    /// An id for events whose payload carries no time or sequence: readings of the same
    /// value at different times are different events, so their ids differ; a payload
    /// with the device's time keeps the pure content hash.
    #[test]
    fn repeated_payloads_without_time_get_their_own_ids() {
        let id = |format, received_ns, payload| {
            first_id(
                format,
                &[("device", "d"), ("metric", "temp")],
                received_ns,
                payload,
            )
        };
        use PayloadFormat::{Json as J, Number as N, Senml as S};
        for (format, payload) in [
            (N, "21.5"),
            (J, r#"{"temp":21.5}"#),
            (S, r#"[{"n":"temp","v":21.5}]"#),
        ] {
            assert_eq!(
                id(format, NOW, payload),
                id(format, NOW, payload),
                "{payload}"
            );
            assert_ne!(
                id(format, NOW, payload),
                id(format, NOW + 60, payload),
                "{payload}"
            );
        }
        let timed = r#"{"temp":21.5,"ts":1700000000}"#;
        assert_eq!(id(J, NOW, timed), id(J, NOW + 60, timed), "a redelivery");
    }

    #[test]
    fn times_convert_exactly() {
        let ms = |v: f64| epoch_to_ns(v, TimeUnit::Auto).map(|ns| ns / 1_000_000);
        // 375 of the 1000 fractions came out a millisecond low by `v * 1e9`.
        for frac in 0..1000 {
            let v = 1_700_000_000.0 + f64::from(frac) / 1000.0;
            assert_eq!(ms(v), Some(1_700_000_000_000 + i64::from(frac)), "{v}");
        }
        assert_eq!(
            epoch_to_ns(1_700_000_000_123.5, TimeUnit::Ms),
            Some(1_700_000_000_123_500_000)
        );
        assert_eq!(rfc3339_to_ns("1969-12-31T23:59:59.5Z"), None, "before 1970");
        assert_eq!(rfc3339_to_ns("1970-01-01T00:00:01Z"), Some(1_000_000_000));
    }

    /// A device clock that was never set (1970 plus its uptime) gives way to the
    /// gateway's receive time.
    #[test]
    fn a_time_from_an_unset_clock_is_the_gateways() {
        check(
            PayloadFormat::Json,
            &[],
            r#"{"device":"d","ts":12345,"v":1}"#,
            Ok(&[("d", "h", Some(NOW), &[("v", 1.0)])]),
        );
        check(
            PayloadFormat::Senml,
            &[],
            r#"[{"bn":"d/","bt":300000000,"n":"v","v":1}]"#,
            Ok(&[("d", "h", Some(NOW), &[("v", 1.0)])]),
        );
        check(
            PayloadFormat::Json,
            &[],
            r#"{"device":"d","ts":978307200,"v":1}"#,
            Ok(&[("d", "h", Some(UNSET_CLOCK_BEFORE_NS), &[("v", 1.0)])]),
        );
        // A pack from an RTC at its 2000-01-01 default keeps its records apart, the
        // newest at receipt.
        check(
            PayloadFormat::Senml,
            &[],
            r#"[{"bn":"d/","bt":946684800,"n":"temp","v":1},{"n":"temp","t":10,"v":2}]"#,
            Ok(&[
                ("d", "h", Some(NOW - 10_000_000_000), &[("temp", 1.0)]),
                ("d", "h", Some(NOW), &[("temp", 2.0)]),
            ]),
        );
    }

    /// A payload with a time of its own keeps its id when it comes again later (a
    /// redelivery), even from a clock never set.
    #[test]
    fn a_redelivered_payload_with_its_own_time_keeps_its_id() {
        let id = |format, received_ns, payload| first_id(format, &[], received_ns, payload);
        for (format, payload) in [
            (PayloadFormat::Json, r#"{"device":"d","ts":12345,"v":1}"#),
            (
                PayloadFormat::Senml,
                r#"[{"bn":"d/","bt":946684800,"n":"v","v":1}]"#,
            ),
        ] {
            assert_eq!(
                id(format, NOW, payload),
                id(format, NOW + 60, payload),
                "{payload}"
            );
        }
    }

    /// A device whose clock does not run sends the same time (0) with every reading:
    /// equal readings must not share an id (dedup, and consumers, would drop them).
    #[test]
    fn a_time_stuck_at_the_epoch_is_no_time_of_its_own() {
        let id = |received_ns, payload| first_id(PayloadFormat::Json, &[], received_ns, payload);
        let stuck = r#"{"device":"d","ts":0,"v":1}"#;
        assert_ne!(id(NOW, stuck), id(NOW + 60, stuck));
    }

    #[test]
    fn an_empty_topic_level_is_no_device() {
        check(
            PayloadFormat::Number,
            &[("device", ""), ("metric", "temp")],
            "1",
            Err("missing_device"),
        );
    }

    #[test]
    fn bare_number() {
        use PayloadFormat::Number as N;
        check(
            N,
            &[("device", "d"), ("metric", "temp")],
            " 21.5\n",
            Ok(&[("d", "h", Some(NOW), &[("temp", 21.5)])]),
        );
        check(
            N,
            &[("device", "d"), ("metric", "temp")],
            "warm",
            Err("malformed_number"),
        );
        check(
            N,
            &[("device", "d"), ("metric", "temp")],
            "NaN",
            Err("malformed_number"),
        );
        check(N, &[("metric", "temp")], "1", Err("missing_device"));
    }

    /// JSON text of an object whose members are drawn from `keys` (repeats allowed) with
    /// values of every kind, nested ones too.
    fn object_text(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            (-1e3f64..1e19).prop_map(|v| v.to_string()),
            Just("1.7e12".to_string()),
            Just("-0.5e-3".to_string()),
            // Out of f64's range: an error wherever it is, read or skipped.
            Just("1e400".to_string()),
            "[a-z0-9 .:-]{0,8}".prop_map(|t| format!("{t:?}")),
            Just(r#""esc\"aped\n""#.to_string()),
            Just(r#""2023-11-14T22:13:20.5Z""#.to_string()),
        ];
        let value = leaf.prop_recursive(3, 16, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((proptest::sample::select(keys), inner), 0..3).prop_map(
                    |m| {
                        let m: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                        format!("{{{}}}", m.join(","))
                    }
                ),
            ]
        });
        proptest::collection::vec((proptest::sample::select(keys), value), 0..9).prop_map(|m| {
            let m: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            format!("{{{}}}", m.join(","))
        })
    }

    /// Mappings without dotted names (those decode through the document), names drawn
    /// from `keys`, readings listed or not, tags or not.
    fn flat_mapping(keys: &'static [&'static str]) -> impl Strategy<Value = JsonMapping> {
        // Half of the names are in no payload, so that more objects decode to an event
        // than fail on a field (a random device, time or location rarely reads).
        let name = || {
            prop_oneof![
                proptest::sample::select(keys).prop_map(String::from),
                Just("absent".to_string()),
            ]
        };
        let names = || proptest::collection::vec(name(), 0..3);
        let unit = proptest::sample::select(
            &[
                TimeUnit::Auto,
                TimeUnit::S,
                TimeUnit::Ms,
                TimeUnit::Ns,
                TimeUnit::Rfc3339,
            ][..],
        );
        (
            (name(), name(), name(), name()),
            (name(), name(), name()),
            unit,
            names(),
            names(),
        )
            .prop_map(
                |((device, time, seq, lat), (lon, alt, accuracy), time_unit, readings, tags)| {
                    JsonMapping {
                        device,
                        time,
                        time_unit,
                        seq,
                        lat,
                        lon,
                        alt,
                        accuracy,
                        readings,
                        tags,
                    }
                },
            )
    }

    const KEYS: &[&str] = &[
        "device", "ts", "seq", "lat", "lon", "alt", "acc", "t", "fw", "", "x", "a.b",
    ];

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The one-pass decoder and the document's walk agree on every object, mapping
        /// and topic: the same event or the same error.
        #[test]
        fn one_pass_and_document_agree(
            text in object_text(KEYS),
            m in flat_mapping(&KEYS[..KEYS.len() - 1]),
            topic_device in proptest::bool::weighted(0.75),
        ) {
            let caps: &[(&str, &str)] = if topic_device { &[("device", "td"), ("site", "s1")] } else { &[] };
            let origin = Origin { source: "in", topic: "t/x", captures: caps, received_ns: NOW };
            let d = Decoder::new(PayloadFormat::Json, &m);
            prop_assert!(d.flat.is_some());
            let got = d.decode(&origin, text.as_bytes());
            prop_assert_eq!(got, d.decode_via_document(&origin, text.as_bytes()), "{}", text);
        }

        /// The same with one byte of the text replaced by any byte (bad UTF-8, a control
        /// character in a string, broken syntax): the same error, position and all.
        #[test]
        fn one_pass_and_document_agree_on_damaged_text(
            text in object_text(KEYS),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = text.into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let origin = Origin { source: "in", topic: "t/x", captures: &[("device", "td")], received_ns: NOW };
            let d = Decoder::new(PayloadFormat::Json, &JsonMapping::default());
            prop_assert_eq!(d.decode(&origin, &bytes), d.decode_via_document(&origin, &bytes));
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let origin = Origin { source: "in", topic: "t", captures: &[("device", "d"), ("metric", "m")], received_ns: NOW };
            for f in [PayloadFormat::Json, PayloadFormat::Senml, PayloadFormat::Number] {
                let _ = decode(f, &JsonMapping::default(), &origin, &bytes);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    /// `cargo test --release -p gateway --lib decode_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn decode_cost() {
        use super::*;
        let payload = br#"{"device":"dev-07","seq":1234,"ts":1800000001234,"temperature":21.50,"lat":52.0007,"lon":13.001234}"#;
        let origin = Origin {
            source: "site",
            topic: "sensors/dev-07/telemetry",
            captures: &[("device", "dev-07")],
            received_ns: 0,
        };
        let d = Decoder::new(PayloadFormat::Json, &JsonMapping::default());
        let n = 1_000_000;
        let t = std::time::Instant::now();
        let mut k = 0;
        for _ in 0..n {
            k += d.decode(&origin, payload).map(|v| v.len()).unwrap_or(0);
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        // Parsing alone, into the borrowed document the decoder uses and into
        // `serde_json::Value` (what it used before), in the same run.
        let parse = |f: &dyn Fn() -> usize| {
            let t = std::time::Instant::now();
            let mut k = 0;
            for _ in 0..n {
                k += f();
            }
            (t.elapsed().as_nanos() as f64 / n as f64, k)
        };
        let (borrowed, _) = parse(&|| Json::parse(payload).map(|_| 1).unwrap_or(0));
        let (value, _) = parse(&|| {
            serde_json::from_slice::<serde_json::Value>(payload)
                .map(|_| 1)
                .unwrap_or(0)
        });
        println!("parse only: borrowed {borrowed:.0} ns, serde_json::Value {value:.0} ns");
        let e = d.decode(&origin, payload).unwrap().remove(0);
        let t = std::time::Instant::now();
        let mut b = 0;
        for _ in 0..n {
            b += crate::sinks::kafka::event_json_bytes(&e).len();
            b += crate::event::Record::Event(e.clone()).encode().len();
        }
        let per2 = t.elapsed().as_nanos() as f64 / n as f64;
        println!("decode {per:.0} ns/event ({k}); render json + clone + postcard {per2:.0} ns/event ({b})");
    }
}
