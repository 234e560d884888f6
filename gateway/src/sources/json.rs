//! A JSON document that borrows its strings from the payload, for the JSON decoder.
//!
//! `serde_json::Value` allocates every key and every string and keeps objects in a
//! `BTreeMap`; a sensor payload is decoded once, a handful of fields are read, and it is
//! thrown away. Here strings without escapes point into the payload and objects are a
//! list of pairs (a lookup scans them from the end, so a repeated key reads as its last
//! value, as with `serde_json::Value`). That halved the decoder's allocations.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value borrowing from the text it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number(Number),
    /// A string (borrowed unless it had escapes).
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object, its members in document order.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// Parses `payload`.
    pub fn parse(payload: &'a [u8]) -> serde_json::Result<Json<'a>> {
        serde_json::from_slice(payload)
    }

    /// The member `key` of an object (the last one if it repeats).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number as `u64`, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }
}

impl fmt::Display for Json<'_> {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(t) => s.serialize_str(t),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            Json::Object(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// A string that borrows where the deserializer allows it (an object's key).
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::DeserializeSeed::deserialize(At(0), d)
    }
}

/// A [`Json`] value at nesting depth `.0` (0: the payload itself).
struct At(u8);

impl<'de> serde::de::DeserializeSeed<'de> for At {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        /// The visitor, at a depth.
        struct V(u8);
        impl<'de> Visitor<'de> for V {
            type Value = Json<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json<'de>, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json<'de>, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
                // JSON text has no NaN or infinity; anything else is a number.
                Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
                Ok(Json::String(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(i) = seq.next_element_seed(At(self.0.saturating_add(1)))? {
                    items.push(i);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
                // No size hint from serde_json. The payload's own object gets room for
                // eight members with the first (a sensor object has a handful; growing
                // 4 -> 8 was a second allocation and a copy per payload); a nested one
                // gets room for one, then grows as it fills, so that a payload of many
                // one-member objects (`[{"a":0},...]`) parses into about ten times its size,
                // not 60. An empty object costs nothing.
                let mut members = Vec::new();
                while let Some(Text(k)) = map.next_key::<Text<'de>>()? {
                    let v = map.next_value_seed(At(self.0.saturating_add(1)))?;
                    if members.capacity() == 0 {
                        if self.0 == 0 {
                            members.reserve(map.size_hint().unwrap_or(8).clamp(1, 64));
                        } else {
                            members.reserve_exact(1);
                        }
                    }
                    members.push((k, v));
                }
                Ok(Json::Object(members))
            }
        }
        d.deserialize_any(V(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_serde_json_value() {
        for text in [
            r#"{"a":1,"b":"x","c":[true,null,2.5],"d":{"e":"q\"uote"},"a":-3}"#,
            r#"[1,"two",{"three":3}]"#,
            r#""just a string""#,
            "12345678901234567890",
            "-0.5e-3",
        ] {
            let ours = Json::parse(text.as_bytes()).expect("parses");
            let theirs: serde_json::Value = serde_json::from_str(text).expect("parses");
            // Same content once both are rendered (Value sorts keys and keeps the last
            // of a repeated one; compare through Value).
            let back: serde_json::Value = serde_json::from_str(&ours.to_string()).expect("json");
            assert_eq!(back, theirs, "{text}");
        }
    }

    #[test]
    fn strings_borrow_unless_escaped_and_repeats_read_last() {
        let text = br#"{"plain":"abc","esc":"a\nb","k":1,"k":2}"#;
        let j = Json::parse(text).expect("parses");
        assert!(matches!(
            j.get("plain"),
            Some(Json::String(Cow::Borrowed("abc")))
        ));
        assert!(matches!(j.get("esc"), Some(Json::String(Cow::Owned(s))) if s == "a\nb"));
        assert_eq!(j.get("k").and_then(Json::as_u64), Some(2));
        assert!(j.get("missing").is_none());
        assert!(Json::parse(b"{\"a\":").is_err());
    }

    #[test]
    fn only_the_payloads_own_object_gets_room_ahead() {
        let top = Json::parse(br#"{"a":{"b":1},"c":[{"d":2}]}"#).expect("parses");
        let Json::Object(members) = &top else {
            panic!("an object")
        };
        assert!(members.capacity() >= 8, "room for a sensor object's fields");
        let Some(Json::Object(inner)) = top.get("a") else {
            panic!("nested object")
        };
        assert!(inner.capacity() < 8, "a nested one grows as it fills");
        let Some(Json::Array(items)) = top.get("c") else {
            panic!("array")
        };
        assert!(matches!(&items[0], Json::Object(o) if o.capacity() < 8));
    }
}
