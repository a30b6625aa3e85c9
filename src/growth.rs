//! Growth of the long deques that hold one small record per queued message (a queue's
//! ready list, the store writer's index of live entries and messages). `VecDeque`
//! doubles when full, so a backlog of ten million 40-byte records could hold room for
//! sixteen million; past a few thousand records these grow by an eighth instead (the
//! allocator moves large blocks by remapping their pages, so growing often stays cheap),
//! and give their memory back once they are mostly empty.

use std::collections::VecDeque;

/// Below this many records a deque grows and keeps its room as std decides.
const GENTLE_FROM: usize = 4096;

/// Makes room for one more record in `deque`, growing a large one by an eighth.
pub fn reserve_one<T>(deque: &mut VecDeque<T>) {
    let len = deque.len();
    if len == deque.capacity() && len >= GENTLE_FROM {
        deque.reserve_exact(len / 8);
    }
}

/// Gives back most of the room of a large deque that is less than a quarter full.
pub fn shrink_if_sparse<T>(deque: &mut VecDeque<T>) {
    let capacity = deque.capacity();
    if capacity >= GENTLE_FROM && deque.len() < capacity / 4 {
        deque.shrink_to(deque.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_deque_grows_by_an_eighth_and_shrinks_once_mostly_empty() {
        let mut deque: VecDeque<u64> = VecDeque::new();
        for i in 0..100_000u64 {
            reserve_one(&mut deque);
            deque.push_back(i);
        }
        assert!(
            deque.capacity() < 100_000 + 100_000 / 8 + 1,
            "{}",
            deque.capacity()
        );
        deque.drain(..90_000);
        shrink_if_sparse(&mut deque);
        assert!(deque.capacity() < 30_000, "{}", deque.capacity());
        assert_eq!(deque.front(), Some(&90_000));
    }
}
