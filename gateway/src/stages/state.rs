//! Bounded per-key state for stages: at most `max` keys; beyond it the least recently used
//! are forgotten (an eighth of the map at a time, so the cost per insert stays O(1)
//! amortised) and counted.

use std::collections::HashMap;

use prometheus_client::metrics::counter::Counter;

/// An event time this far behind what a device sent before means its clock was reset (or
/// an earlier time was a glitch far ahead): stages that order a device's events by time
/// start its state over rather than refusing it from then on. One hour.
pub const CLOCK_RESET_NS: i64 = 3_600_000_000_000;

/// The stages' hash maps: foldhash, seeded per process (keys come from devices).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A map from key (a device id, an event id) to a stage's state, with a bound.
pub struct Bounded<V> {
    map: FastMap<String, (V, u64)>,
    max: usize,
    clock: u64,
    evicted: Counter,
}

impl<V> Bounded<V> {
    /// At most `max` keys (at least one); forgotten keys increment `evicted`.
    pub fn new(max: usize, evicted: Counter) -> Self {
        Bounded {
            map: FastMap::default(),
            max: max.max(1),
            clock: 0,
            evicted,
        }
    }

    /// The state of `key`, marked as just used.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(key).map(|(v, used)| {
            *used = clock;
            v
        })
    }

    /// The state of `key` without marking it used.
    pub fn peek(&self, key: &str) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// The state of `key`, made with `make` if absent (which may forget others first).
    pub fn entry(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(key) {
            if self.map.len() >= self.max {
                let _ = self.evict();
            }
            self.map.insert(key.to_string(), (make(), 0));
        }
        self.clock += 1;
        let clock = self.clock;
        let (v, used) = self
            .map
            .get_mut(key)
            .unwrap_or_else(|| unreachable!("inserted above"));
        *used = clock;
        v
    }

    /// Before inserting `key`: when it is new and the map is full, forgets the least
    /// recently used eighth and returns what it held (for stages that must emit it).
    pub fn make_room(&mut self, key: &str) -> Vec<(String, V)> {
        if self.map.contains_key(key) || self.map.len() < self.max {
            return Vec::new();
        }
        self.evict()
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.map.remove(key).map(|(v, _)| v)
    }

    /// Keys and states, in no order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut V)> {
        self.map.iter_mut().map(|(k, (v, _))| (k, v))
    }

    /// Keeps only the entries for which `keep` is true (not counted as evictions).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut V) -> bool) {
        self.map.retain(|k, (v, _)| keep(k, v));
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets the least recently used eighth of the keys (at least one) and returns them.
    fn evict(&mut self) -> Vec<(String, V)> {
        let n = (self.max / 8).max(1).min(self.map.len());
        if n == 0 {
            return Vec::new();
        }
        let mut ages: Vec<u64> = self.map.values().map(|(_, used)| *used).collect();
        let (_, oldest, _) = ages.select_nth_unstable(n - 1);
        let limit = *oldest;
        let gone: Vec<String> = self
            .map
            .iter()
            .filter(|(_, (_, used))| *used <= limit)
            .map(|(k, _)| k.clone())
            .take(n)
            .collect();
        self.evicted.inc_by(gone.len() as u64);
        gone.into_iter()
            .filter_map(|k| self.map.remove(&k).map(|(v, _)| (k, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the keys, the map never holds more than its bound, and every key it
        /// let go of was counted.
        #[test]
        fn stays_bounded_and_counts(max in 1usize..50, keys in proptest::collection::vec(0u16..200, 0..500)) {
            let evicted = Counter::default();
            let mut b = Bounded::new(max, evicted.clone());
            let mut distinct_inserts = 0u64;
            for k in keys {
                let k = k.to_string();
                if b.peek(&k).is_none() {
                    distinct_inserts += 1;
                }
                *b.entry(&k, || 0u32) += 1;
                prop_assert!(b.len() <= max);
            }
            prop_assert_eq!(distinct_inserts, b.len() as u64 + evicted.get());
        }
    }

    #[test]
    fn the_least_recently_used_go_first() {
        let evicted = Counter::default();
        let mut b = Bounded::new(3, evicted.clone());
        b.entry("a", || 1);
        b.entry("b", || 2);
        b.entry("c", || 3);
        b.get_mut("a");
        b.entry("d", || 4);
        assert_eq!(evicted.get(), 1);
        assert!(b.peek("b").is_none(), "b was the least recently used");
        assert!(b.peek("a").is_some() && b.peek("c").is_some() && b.peek("d").is_some());
    }
}
