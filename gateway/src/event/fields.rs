//! [`Fields`]: an event's readings or tags, by name, in name order.
//!
//! A sorted vector rather than a `BTreeMap`: an event carries a handful of readings and
//! tags, and a `BTreeMap` allocated a node of about 600 bytes for the first one (on the
//! input's thread, freed on the router's). Here one reading costs one small allocation,
//! lookups are a binary search over a few names, and iteration is in name order as
//! before, so the JSON value and the postcard bytes in the spool are unchanged (a map:
//! length, then the pairs in order; `behaves_like_a_btreemap` pins that).

use std::fmt;

use compact_str::CompactString;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Named values (readings or tags) in name order, each name once.
#[derive(Clone, PartialEq)]
pub struct Fields<V> {
    entries: Vec<(CompactString, V)>,
}

impl<V> Default for Fields<V> {
    fn default() -> Self {
        Fields {
            entries: Vec::new(),
        }
    }
}

impl<V> Fields<V> {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.entries[i].1)
    }

    /// The value of `name`, to change it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        self.find(name).ok().map(|i| &mut self.entries[i].1)
    }

    /// True when `name` is there.
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Makes room for exactly `additional` more fields. A decoder that knows how many it
    /// will insert calls it first: an event's fields then take what they need, not the
    /// four slots a growing vector starts with, for as long as the event is in flight.
    pub fn reserve_exact(&mut self, additional: usize) {
        self.entries.reserve_exact(additional);
    }

    /// Sets `name` to `value`; returns the value it had.
    pub fn insert(&mut self, name: CompactString, value: V) -> Option<V> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (name, value));
                None
            }
        }
    }

    /// Takes `name` out; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<V> {
        self.find(name).ok().map(|i| self.entries.remove(i).1)
    }

    /// Removes every field.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Moves every field of `other` in (its values win), leaving it empty.
    pub fn append(&mut self, other: &mut Fields<V>) {
        for (k, v) in other.entries.drain(..) {
            self.insert(k, v);
        }
    }

    /// The fields in name order.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (&CompactString, &V)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The fields in name order, values changeable.
    pub fn iter_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = (&CompactString, &mut V)> + ExactSizeIterator {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    /// The names in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &CompactString> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }
}

impl<V> FromIterator<(CompactString, V)> for Fields<V> {
    /// A later pair with the same name wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (CompactString, V)>>(iter: I) -> Self {
        let mut entries: Vec<(CompactString, V)> = iter.into_iter().collect();
        // Stable: equal names keep their order, and the last of them is kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(CompactString, V)> = Vec::with_capacity(entries.len());
        for e in entries {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Fields { entries: out }
    }
}

impl<V, const N: usize> From<[(CompactString, V); N]> for Fields<V> {
    fn from(pairs: [(CompactString, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<'a, V> IntoIterator for &'a Fields<V> {
    type Item = (&'a CompactString, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (CompactString, V)>,
        fn(&'a (CompactString, V)) -> (&'a CompactString, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<V> IntoIterator for Fields<V> {
    type Item = (CompactString, V);
    type IntoIter = std::vec::IntoIter<(CompactString, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<V> std::ops::Index<&str> for Fields<V> {
    type Output = V;

    /// The value of a name that must be there (as a map's index, it panics otherwise).
    fn index(&self, name: &str) -> &V {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no field {name:?}"),
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for Fields<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for Fields<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Fields<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Pairs<V> {
            type Value = Fields<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields<V>, A::Error> {
                // Written in order by `serialize`: appending keeps it sorted; anything
                // else (another writer) is sorted by `insert`.
                let mut out = Fields {
                    entries: Vec::with_capacity(m.size_hint().unwrap_or(0).min(64)),
                };
                while let Some((k, v)) = m.next_entry::<CompactString, V>()? {
                    match out.entries.last() {
                        Some((last, _)) if *last >= k => {
                            out.insert(k, v);
                        }
                        _ => out.entries.push((k, v)),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Pairs(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Remove(u8),
        Get(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..24, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (0u8..24).prop_map(Op::Remove),
            (0u8..24).prop_map(Op::Get),
        ]
    }

    fn name(k: u8) -> CompactString {
        compact_str::format_compact!("n{k}")
    }

    proptest! {
        /// Any sequence of operations leaves what a BTreeMap would hold, in its order,
        /// and the postcard bytes are a BTreeMap's.
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec(op(), 0..80)) {
            let mut ours = Fields::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(ours.insert(name(k), v), model.insert(name(k), v)),
                    Op::Remove(k) => prop_assert_eq!(ours.remove(&name(k)), model.remove(&name(k))),
                    Op::Get(k) => prop_assert_eq!(ours.get(&name(k)), model.get(&name(k))),
                }
                prop_assert_eq!(ours.len(), model.len());
            }
            let a: Vec<_> = ours.iter().collect();
            let b: Vec<_> = model.iter().collect();
            prop_assert_eq!(a, b);
            let bytes = postcard::to_allocvec(&ours).expect("encode");
            prop_assert_eq!(&bytes, &postcard::to_allocvec(&model).expect("encode"));
            let back: Fields<u32> = postcard::from_bytes(&bytes).expect("decode");
            prop_assert!(back == ours);
            prop_assert_eq!(serde_json::to_string(&ours).expect("json"), serde_json::to_string(&model).expect("json"));
        }

        /// Collecting pairs keeps the last value of a repeated name, as a map does.
        #[test]
        fn collect_keeps_the_last_of_a_name(pairs in proptest::collection::vec((0u8..8, any::<u32>()), 0..30)) {
            let ours: Fields<u32> = pairs.iter().map(|(k, v)| (name(*k), *v)).collect();
            let model: BTreeMap<CompactString, u32> = pairs.iter().map(|(k, v)| (name(*k), *v)).collect();
            prop_assert_eq!(ours.iter().collect::<Vec<_>>(), model.iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn unsorted_input_from_another_writer_is_sorted() {
        let ours: Fields<u32> = serde_json::from_str(r#"{"b":1,"a":2,"b":3}"#).expect("json");
        assert_eq!(format!("{ours:?}"), r#"{"a": 2, "b": 3}"#);
    }
}
