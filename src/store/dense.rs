//! [`DenseMap`]: the writer's maps from keys handed out in increasing order (message
//! ids, a queue's offsets) to small fixed-size records, one per live message of a
//! backlog. A hash table costs its records' size plus a control byte, times up to
//! twice for its power-of-two table (and the key beside every record); a deque indexed
//! by `key - base` costs the record alone, plus the room `growth` leaves.
//!
//! Keys mostly come in increasing order and mostly leave from the front (a queue is
//! FIFO), so the deque stays dense: vacant slots at the front are dropped at once. What
//! would make it sparse goes to a small hash table (`spill`) instead: a few old records
//! pinning the front (an unacked message while millions pass), every other key missing
//! (persistent and transient messages interleaved), a key far past the end. Every key
//! in `spill` is below `base`, so a key is looked up in one place only.

use std::collections::{HashMap, VecDeque};

use super::writer::IdBuildHasher;
use crate::growth;

/// A record of a [`DenseMap`], with one value that marks a vacant slot.
pub(super) trait DenseValue: Copy {
    /// The vacant slot (never a live record's value).
    const VACANT: Self;
    /// Whether this is [`DenseValue::VACANT`].
    fn is_vacant(&self) -> bool;
}

/// The deque holds at least this many slots before it is kept dense.
const MIN_DENSE: usize = 64;

/// A key past the end by more than this (or than the deque's length) starts the deque
/// afresh there, its records moved to `spill`, instead of padding the gap.
const MAX_GAP: u64 = 1024;

/// A map from `u64` keys to records, for keys that mostly come in increasing order.
#[derive(Debug)]
pub(super) struct DenseMap<V: DenseValue> {
    /// Key of `slots[0]`.
    base: u64,
    slots: VecDeque<V>,
    /// Slots that are not vacant.
    live: usize,
    /// Records whose key is below `base`.
    spill: HashMap<u64, V, IdBuildHasher>,
}

impl<V: DenseValue> Default for DenseMap<V> {
    fn default() -> Self {
        DenseMap {
            base: 0,
            slots: VecDeque::new(),
            live: 0,
            spill: HashMap::default(),
        }
    }
}

impl<V: DenseValue> DenseMap<V> {
    /// Number of records.
    pub(super) fn len(&self) -> usize {
        self.live + self.spill.len()
    }

    /// Whether it holds no record.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn index(&self, key: u64) -> Option<usize> {
        let i = key.checked_sub(self.base)?;
        (i < self.slots.len() as u64).then_some(i as usize)
    }

    /// The record under `key`.
    pub(super) fn get(&self, key: u64) -> Option<&V> {
        match self.index(key) {
            Some(i) => self.slots.get(i).filter(|v| !v.is_vacant()),
            None => self.spill.get(&key),
        }
    }

    /// The record under `key`, to change it in place (never to [`DenseValue::VACANT`]).
    pub(super) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        match self.index(key) {
            Some(i) => self.slots.get_mut(i).filter(|v| !v.is_vacant()),
            None => self.spill.get_mut(&key),
        }
    }

    /// Puts `value` (not [`DenseValue::VACANT`]) under `key`; the record it replaces.
    pub(super) fn insert(&mut self, key: u64, value: V) -> Option<V> {
        debug_assert!(!value.is_vacant());
        if let Some(i) = self.index(key) {
            let old = std::mem::replace(&mut self.slots[i], value);
            if old.is_vacant() {
                self.live += 1;
                return None;
            }
            return Some(old);
        }
        if key < self.base {
            return self.spill.insert(key, value);
        }
        let end = self.base.saturating_add(self.slots.len() as u64);
        let gap = key - end;
        if self.slots.is_empty() {
            self.base = key;
        } else if gap > MAX_GAP.max(self.slots.len() as u64) {
            self.spill_all();
            self.base = key;
        } else {
            for _ in 0..gap {
                growth::reserve_one(&mut self.slots);
                self.slots.push_back(V::VACANT);
            }
        }
        growth::reserve_one(&mut self.slots);
        self.slots.push_back(value);
        self.live += 1;
        self.keep_dense();
        None
    }

    /// Takes out the record under `key`.
    pub(super) fn remove(&mut self, key: u64) -> Option<V> {
        let Some(i) = self.index(key) else {
            return self.spill.remove(&key);
        };
        let old = std::mem::replace(&mut self.slots[i], V::VACANT);
        if old.is_vacant() {
            return None;
        }
        self.live -= 1;
        while self.slots.front().is_some_and(DenseValue::is_vacant) {
            self.slots.pop_front();
            self.base += 1;
        }
        self.keep_dense();
        growth::shrink_if_sparse(&mut self.slots);
        Some(old)
    }

    /// Gives back the room the deque holds beyond its records (in place: the records
    /// move to the front of its allocation, which then shrinks).
    pub(super) fn shrink_to_fit(&mut self) {
        self.slots.shrink_to_fit();
    }

    /// Takes out every record.
    pub(super) fn clear(&mut self) {
        *self = DenseMap::default();
    }

    /// Every record with its key: the deque's in key order, then the others.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_vacant())
            .map(move |(i, v)| (base + i as u64, v))
            .chain(self.spill.iter().map(|(&k, v)| (k, v)))
    }

    /// Every record with its key, in key order (the few in `spill`, all below `base`,
    /// sorted first).
    pub(super) fn iter_in_order(&self) -> impl Iterator<Item = (u64, &V)> {
        let mut spilled: Vec<(u64, &V)> = self.spill.iter().map(|(&k, v)| (k, v)).collect();
        spilled.sort_unstable_by_key(|&(k, _)| k);
        let base = self.base;
        spilled.into_iter().chain(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_vacant())
                .map(move |(i, v)| (base + i as u64, v)),
        )
    }

    /// Keeps the records for which `keep` is true (it may change them).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u64, &mut V) -> bool) {
        let base = self.base;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.is_vacant() && !keep(base + i as u64, slot) {
                *slot = V::VACANT;
                self.live -= 1;
            }
        }
        self.spill.retain(|&k, v| keep(k, v));
        while self.slots.front().is_some_and(DenseValue::is_vacant) {
            self.slots.pop_front();
            self.base += 1;
        }
        self.keep_dense();
    }

    /// While fewer than a quarter of the slots are live, the front slot leaves the
    /// deque (its record, if any, for `spill`).
    fn keep_dense(&mut self) {
        while self.slots.len() > MIN_DENSE && self.live * 4 < self.slots.len() {
            let Some(front) = self.slots.pop_front() else {
                break;
            };
            if !front.is_vacant() {
                self.spill.insert(self.base, front);
                self.live -= 1;
            }
            self.base += 1;
        }
    }

    /// Moves every record of the deque to `spill`, emptying it.
    fn spill_all(&mut self) {
        let base = self.base;
        for (i, v) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if !v.is_vacant() {
                self.spill.insert(base + i as u64, v);
            }
        }
        self.live = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    impl DenseValue for u32 {
        const VACANT: u32 = 0;
        fn is_vacant(&self) -> bool {
            *self == 0
        }
    }

    /// Applies the same operations to a `DenseMap` and a `BTreeMap` and compares them.
    fn check(ops: &[(bool, u64)]) -> DenseMap<u32> {
        let mut dense = DenseMap::<u32>::default();
        let mut model = BTreeMap::new();
        for (n, &(insert, key)) in ops.iter().enumerate() {
            let value = n as u32 + 1;
            if insert {
                assert_eq!(dense.insert(key, value), model.insert(key, value), "{n}");
            } else {
                assert_eq!(dense.remove(key), model.remove(&key), "{n}");
            }
            assert_eq!(dense.len(), model.len(), "{n}");
        }
        let mut all: Vec<(u64, u32)> = dense.iter().map(|(k, v)| (k, *v)).collect();
        all.sort_unstable();
        let in_order: Vec<(u64, u32)> = dense.iter_in_order().map(|(k, v)| (k, *v)).collect();
        assert_eq!(in_order, all);
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        dense
    }

    #[test]
    fn fifo_use_keeps_every_record_in_the_deque() {
        let mut ops: Vec<(bool, u64)> = (0..10_000).map(|k| (true, k)).collect();
        ops.extend((0..9_000).map(|k| (false, k)));
        let dense = check(&ops);
        assert!(dense.spill.is_empty());
        assert_eq!(dense.slots.len(), 1_000);
    }

    #[test]
    fn an_old_record_pinning_the_front_moves_aside_instead_of_keeping_slots_alive() {
        let mut ops: Vec<(bool, u64)> = Vec::new();
        for k in 0..100_000u64 {
            ops.push((true, k));
            if k > 0 {
                ops.push((false, k));
            }
        }
        let dense = check(&ops);
        assert_eq!(dense.get(0), Some(&1));
        assert!(dense.slots.len() <= MIN_DENSE, "{}", dense.slots.len());
    }

    #[test]
    fn sparse_gappy_and_out_of_order_keys_behave_as_a_map() {
        let mut ops: Vec<(bool, u64)> = Vec::new();
        let mut k = 5u64;
        for i in 0..20_000u64 {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = match i % 4 {
                0 => i * 5,
                1 => i * 5 + 1_000_000,
                2 => k % 50_000,
                _ => u64::MAX - i,
            };
            ops.push((!k.is_multiple_of(3), key));
            ops.push((true, i * 5 + 2));
        }
        let mut dense = check(&ops);
        dense.retain(|k, _| k.is_multiple_of(2));
        assert!(dense.iter().all(|(k, _)| k.is_multiple_of(2)));
        assert_eq!(dense.len(), dense.iter().count());
    }
}
