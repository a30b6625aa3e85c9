//! The loss checker: which sequence numbers of a producer arrived at a queue, and which
//! of those that did not arrive had been confirmed.
//!
//! Every body carries (producer id, sequence); sequences of a producer start at 0 and
//! equal its publisher-confirm delivery tag minus one. A [`SeqSet`] is a bitmap whose
//! dense prefix (every bit set) is dropped as it grows, so a long in-order run costs a
//! few words, not one bit per message forever.

use std::collections::VecDeque;

/// A set of sequence numbers, compact while they arrive nearly in order.
#[derive(Debug, Default, Clone)]
pub struct SeqSet {
    /// Every sequence below `base * 64` is in the set.
    base: u64,
    /// Bits for sequences from `base * 64` on.
    words: VecDeque<u64>,
    /// Number of distinct sequences in the set.
    len: u64,
}

impl SeqSet {
    /// An empty set.
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    /// Adds `seq`; false when it was already in the set.
    #[inline]
    pub fn insert(&mut self, seq: u64) -> bool {
        let word = seq / 64;
        if word < self.base {
            return false;
        }
        let index = (word - self.base) as usize;
        if index >= self.words.len() {
            self.words.resize(index + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let w = &mut self.words[index];
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.len += 1;
        if index == 0 && *w == u64::MAX {
            while self.words.front() == Some(&u64::MAX) {
                self.words.pop_front();
                self.base += 1;
            }
        }
        true
    }

    /// Adds every sequence in `0..=seq` (a multiple confirm).
    pub fn insert_through(&mut self, seq: u64) {
        let full_words = (seq + 1) / 64;
        while self.base < full_words {
            let w = self.words.pop_front().unwrap_or(0);
            self.len += u64::from((!w).count_ones());
            self.base += 1;
        }
        for s in full_words * 64..=seq {
            self.insert(s);
        }
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 1;
        }
    }

    /// True when `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.word(seq / 64) & (1u64 << (seq % 64)) != 0
    }

    /// Number of distinct sequences in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 64 membership bits of sequences `64 * index ..= 64 * index + 63`.
    fn word(&self, index: u64) -> u64 {
        if index < self.base {
            u64::MAX
        } else {
            self.words
                .get((index - self.base) as usize)
                .copied()
                .unwrap_or(0)
        }
    }
}

/// What a queue received from one producer.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    seen: SeqSet,
    highest: Option<u64>,
    /// Deliveries, duplicates included.
    pub received: u64,
    /// Deliveries of a sequence already received.
    pub duplicates: u64,
    /// Deliveries flagged `redelivered` by the broker.
    pub redelivered: u64,
    /// First deliveries of a sequence lower than one received before.
    pub out_of_order: u64,
}

impl SeqTracker {
    /// Records one delivery.
    #[inline]
    pub fn record(&mut self, seq: u64, redelivered: bool) {
        self.received += 1;
        self.redelivered += u64::from(redelivered);
        if !self.seen.insert(seq) {
            self.duplicates += 1;
            return;
        }
        match self.highest {
            Some(h) if seq < h => self.out_of_order += 1,
            _ => self.highest = Some(seq),
        }
    }

    /// Distinct sequences received.
    pub fn unique(&self) -> u64 {
        self.seen.len()
    }

    /// Counts the sequences in `0..published` that never arrived, split into those the
    /// broker had confirmed (lost) and the others.
    pub fn missing(&self, published: u64, confirmed: &SeqSet) -> Missing {
        let mut out = Missing::default();
        let words = published.div_ceil(64);
        for i in 0..words {
            let mask = if (i + 1) * 64 <= published {
                u64::MAX
            } else {
                (1u64 << (published % 64)) - 1
            };
            let absent = !self.seen.word(i) & mask;
            if absent == 0 {
                continue;
            }
            let conf = confirmed.word(i);
            out.lost_confirmed += u64::from((absent & conf).count_ones());
            out.unconfirmed_missing += u64::from((absent & !conf).count_ones());
        }
        out
    }
}

/// Published sequences that a queue never delivered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// Confirmed by the broker, yet never delivered: a broken promise.
    pub lost_confirmed: u64,
    /// Never confirmed (or no confirms asked for) and never delivered.
    pub unconfirmed_missing: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_missing_and_split_by_confirmation() {
        let mut t = SeqTracker::default();
        for s in (0..200).filter(|s| *s != 5 && *s != 70 && *s != 199) {
            t.record(s, false);
        }
        let mut confirmed = SeqSet::new();
        confirmed.insert_through(69); // 5 confirmed, 70 and 199 not
        assert_eq!(confirmed.len(), 70);
        let m = t.missing(200, &confirmed);
        assert_eq!(m.lost_confirmed, 1);
        assert_eq!(m.unconfirmed_missing, 2);
        assert_eq!(t.unique(), 197);
        // Nothing is missing below what was published.
        assert_eq!(t.missing(5, &confirmed), Missing::default());
    }

    #[test]
    fn duplicates_and_out_of_order_are_counted() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 3, 2, 2, 4, 1] {
            t.record(s, s == 1);
        }
        assert_eq!(t.received, 7);
        assert_eq!(t.unique(), 5);
        assert_eq!(t.duplicates, 2); // the second 2 and the second 1
        assert_eq!(t.out_of_order, 1); // 2 after 3
        assert_eq!(t.redelivered, 2);
        assert_eq!(t.missing(5, &SeqSet::new()), Missing::default());
    }

    #[test]
    fn dense_prefix_is_compacted_and_still_known() {
        let mut s = SeqSet::new();
        for i in 0..10_000 {
            assert!(s.insert(i));
        }
        assert!(s.words.len() <= 1);
        assert!(!s.insert(17));
        assert!(s.contains(9_999) && !s.contains(10_000));
        s.insert_through(20_000);
        assert_eq!(s.len(), 20_001);
        assert!(s.contains(20_000) && !s.contains(20_001));
    }
}
