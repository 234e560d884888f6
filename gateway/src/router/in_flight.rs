//! The router's table of records in flight in the producer, by `seq`.
//!
//! Records are handed to librdkafka in increasing `seq` and mostly confirmed in about that
//! order. A `BTreeMap` keyed by `seq` paid for that pattern with a shift of its leaf's
//! entries (a few KiB of records) on every removal from the front. Here entries sit in a
//! ring in `seq` order: a removal leaves a hole that is popped once it reaches the front,
//! lookups are binary searches, and nothing moves.

use std::collections::VecDeque;

/// Records in flight, by `seq`, in `seq` order.
#[derive(Debug)]
pub(super) struct InFlight<T> {
    /// Sorted by seq; `None` is a removed entry not yet at the front.
    ring: VecDeque<(u64, Option<T>)>,
    live: usize,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            ring: VecDeque::new(),
            live: 0,
        }
    }
}

impl<T> InFlight<T> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Adds `seq`; appending is O(1) for the usual increasing seq, an older seq is put
    /// in its place. A seq already present is replaced.
    pub fn insert(&mut self, seq: u64, value: T) {
        match self.ring.back() {
            Some((last, _)) if *last >= seq => match self.position(seq) {
                Ok(i) => {
                    if self.ring[i].1.replace(value).is_none() {
                        self.live += 1;
                    }
                }
                Err(i) => {
                    self.ring.insert(i, (seq, Some(value)));
                    self.live += 1;
                }
            },
            _ => {
                self.ring.push_back((seq, Some(value)));
                self.live += 1;
            }
        }
    }

    pub fn remove(&mut self, seq: &u64) -> Option<T> {
        let i = self.position(*seq).ok()?;
        let value = self.ring[i].1.take()?;
        self.live -= 1;
        while matches!(self.ring.front(), Some((_, None))) {
            self.ring.pop_front();
        }
        // Holes behind a record that stays in flight would pile up: keep them below the
        // live entries (plus a constant), compacting in O(n) when they are not.
        if self.ring.len() > 2 * self.live + 1024 {
            self.ring.retain(|(_, v)| v.is_some());
        }
        Some(value)
    }

    pub fn contains(&self, seq: &u64) -> bool {
        self.position(*seq).is_ok_and(|i| self.ring[i].1.is_some())
    }

    pub fn get_mut(&mut self, seq: &u64) -> Option<&mut T> {
        let i = self.position(*seq).ok()?;
        self.ring[i].1.as_mut()
    }

    /// The entry with the lowest seq (the front is never a hole).
    pub fn first_key_value(&self) -> Option<(&u64, &T)> {
        self.ring
            .front()
            .and_then(|(s, v)| v.as_ref().map(|v| (s, v)))
    }

    /// The entry with the highest seq.
    pub fn last_key_value(&self) -> Option<(&u64, &T)> {
        self.ring
            .iter()
            .rev()
            .find_map(|(s, v)| v.as_ref().map(|v| (s, v)))
    }

    /// Live entries in seq order.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &T)> {
        self.ring
            .iter()
            .filter_map(|(s, v)| v.as_ref().map(|v| (s, v)))
    }

    /// Live entries in seq order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut T)> {
        self.ring
            .iter_mut()
            .filter_map(|(s, v)| v.as_mut().map(|v| (&*s, v)))
    }

    pub fn clear(&mut self) {
        self.ring.clear();
        self.live = 0;
    }

    /// Reads the entry `seq` would have without gaps, and what `deeper` reads of its
    /// value, to bring them into the cache (see `Router::touch`); what it returns means
    /// nothing.
    pub fn touch(&self, seq: u64, deeper: impl Fn(&T) -> u64) -> u64 {
        let Some((front, _)) = self.ring.front() else {
            return 0;
        };
        seq.checked_sub(*front)
            .and_then(|d| usize::try_from(d).ok())
            .and_then(|i| self.ring.get(i))
            .map_or(0, |(s, v)| s ^ v.as_ref().map_or(0, &deeper))
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        // Seqs in the ring are mostly consecutive (gaps only where records went to the
        // spool instead): try the slot seq would have without gaps before searching, which
        // would touch a dozen cold entries.
        if let Some((front, _)) = self.ring.front() {
            if let Some(guess) = seq
                .checked_sub(*front)
                .and_then(|d| usize::try_from(d).ok())
            {
                if self.ring.get(guess).is_some_and(|(s, _)| *s == seq) {
                    return Ok(guess);
                }
            }
        }
        self.ring.binary_search_by_key(&seq, |(s, _)| *s)
    }
}

impl<T> IntoIterator for InFlight<T> {
    type Item = (u64, T);
    type IntoIter = std::iter::FilterMap<
        std::collections::vec_deque::IntoIter<(u64, Option<T>)>,
        fn((u64, Option<T>)) -> Option<(u64, T)>,
    >;

    /// Live entries in seq order.
    fn into_iter(self) -> Self::IntoIter {
        self.ring.into_iter().filter_map(|(s, v)| v.map(|v| (s, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Get(u64),
        /// Reads only: any seq, in the table or not, changes nothing.
        Touch(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..400).prop_map(Op::Insert),
            3 => (0u64..400).prop_map(Op::Remove),
            1 => (0u64..400).prop_map(Op::Get),
            1 => (0u64..400).prop_map(Op::Touch),
        ]
    }

    proptest! {
        /// Any sequence of operations leaves the same entries as a BTreeMap would.
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec(op(), 0..600)) {
            let mut ours = InFlight::default();
            let mut model = BTreeMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(s) => {
                        ours.insert(s, i);
                        model.insert(s, i);
                    }
                    Op::Remove(s) => prop_assert_eq!(ours.remove(&s), model.remove(&s)),
                    Op::Get(s) => prop_assert_eq!(ours.get_mut(&s).copied(), model.get(&s).copied()),
                    Op::Touch(s) => {
                        std::hint::black_box(ours.touch(s, |v| *v as u64));
                    }
                }
                prop_assert_eq!(ours.len(), model.len());
                prop_assert_eq!(ours.first_key_value(), model.first_key_value());
                prop_assert_eq!(ours.last_key_value(), model.last_key_value());
            }
            let a: Vec<(u64, usize)> = ours.iter_mut().map(|(s, v)| (*s, *v)).collect();
            let b: Vec<(u64, usize)> = model.iter().map(|(s, v)| (*s, *v)).collect();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(ours.into_iter().collect::<Vec<_>>(), b);
        }
    }

    #[test]
    fn holes_behind_a_stuck_record_stay_bounded() {
        let mut f = InFlight::default();
        f.insert(0, ());
        for seq in 1..100_000 {
            f.insert(seq, ());
            f.remove(&seq);
        }
        assert_eq!(f.len(), 1);
        assert!(f.ring.len() <= 2 + 1024, "{} entries kept", f.ring.len());
        assert_eq!(f.remove(&0), Some(()));
        assert!(f.ring.is_empty());
    }
}
