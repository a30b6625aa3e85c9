//! The broker's memory allocator: mimalloc for everything but the few very large
//! blocks, which go to the system's malloc.
//!
//! Why not glibc's malloc alone: the store thread allocates the bodies it reads back and
//! the runtime's threads free them (and the other way round for publishes), and glibc
//! takes the allocating thread's arena lock for every such free, so the threads spend
//! their time waking each other (a paged 1M x 1 KiB drain ran at half the rate).
//! mimalloc frees across threads without a shared lock.
//!
//! Why not mimalloc alone: the deques that hold one record per queued message (see
//! `growth`) reach hundreds of MiB and grow in place. glibc serves such blocks with their
//! own mappings and grows them by remapping pages; mimalloc copies them into a new block,
//! so for a moment a ten-million-message backlog holds its largest deques twice (peak
//! RSS 1.5 GiB instead of 0.9).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes come from the system's malloc.
const LARGE: usize = 1 << 20;

/// mimalloc for blocks under [`LARGE`], the system's malloc for larger ones (the
/// `#[global_allocator]` of the `warren` binary). A block's size, which Rust passes to
/// `dealloc` and `realloc`, tells which allocator it came from.
pub struct BrokerAlloc;

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE
}

// SAFETY: every block is freed or resized by the allocator that made it: both calls
// receive the layout it was allocated with, and its size selects the same allocator.
// A resize that crosses `LARGE` allocates from the other one, copies and frees.
unsafe impl GlobalAlloc for BrokerAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc_zeroed(layout) }
        } else {
            // SAFETY: as above.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) {
            // SAFETY: `ptr` came from `System` (its size is at least LARGE).
            unsafe { System.dealloc(ptr, layout) }
        } else {
            // SAFETY: `ptr` came from mimalloc.
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (is_large(&layout), is_large(&new_layout)) {
            // SAFETY: the block stays with the allocator that made it.
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            // SAFETY: as above.
            (false, false) => unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: a fresh block from the allocator its new size selects; the old
                // one is read for the bytes both hold, then freed by its own allocator.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        let keep = layout.size().min(new_size);
                        std::ptr::copy_nonoverlapping(ptr, new, keep);
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// Bytes mimalloc holds committed (its own estimate on Linux): with the system malloc's
/// in-use bytes, what the process's heap really uses.
pub fn mimalloc_committed_bytes() -> u64 {
    let mut fields = [0usize; 8];
    let [
        elapsed,
        user,
        system,
        rss,
        peak_rss,
        commit,
        peak_commit,
        faults,
    ] = &mut fields;
    // SAFETY: every pointer is to a live usize that mi_process_info only writes.
    unsafe {
        libmimalloc_sys::mi_process_info(
            elapsed,
            user,
            system,
            rss,
            peak_rss,
            commit,
            peak_commit,
            faults,
        )
    };
    fields[5] as u64
}

/// Asks mimalloc to return the memory it holds free to the system.
pub fn mimalloc_release() {
    // SAFETY: mi_collect only frees memory mimalloc holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_move_between_the_allocators_as_they_grow_and_shrink() {
        let alloc = BrokerAlloc;
        let small = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: the block is written and read only within its size, and freed with
        // the layout of its last size.
        unsafe {
            let p = alloc.alloc(small);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 7, 1000);
            let p = alloc.realloc(p, small, 3 << 20);
            assert!(!p.is_null());
            assert_eq!(*p.add(999), 7);
            std::ptr::write_bytes(p.add(1000), 9, (3 << 20) - 1000);
            let large = Layout::from_size_align(3 << 20, 8).unwrap();
            let p = alloc.realloc(p, large, 5 << 20);
            assert_eq!(*p.add(999), 7);
            assert_eq!(*p.add((3 << 20) - 1), 9);
            let p = alloc.realloc(p, Layout::from_size_align(5 << 20, 8).unwrap(), 500);
            assert_eq!(*p.add(499), 7);
            alloc.dealloc(p, Layout::from_size_align(500, 8).unwrap());
        }
    }
}
