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
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Blocks of at least this many bytes come from the system's malloc. Not lower: the
/// store's chunk rows (a group commit's bodies, often 1-4 MiB) are built, read back and
/// freed many times a second, and a block of its own mapping per row costs page faults
/// and zeroing every time (with 1 MiB here, a paged drain spent a seventh of its CPU
/// so, and took about 8% more CPU per message than with 8 MiB).
const LARGE: usize = 8 << 20;

/// mimalloc for blocks under [`LARGE`], the system's malloc for larger ones (the
/// `#[global_allocator]` of the `warren` binary). A block's size, which Rust passes to
/// `dealloc` and `realloc`, tells which allocator it came from.
pub struct BrokerAlloc;

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE
}

/// Whether a plain `mi_malloc` block suits `layout`: every mimalloc block is aligned to
/// at least a word. The mimalloc crate always calls mimalloc's aligned functions, which
/// for a block over 1 KiB whose size is not a power of two take a slow path that
/// over-allocates to align it: a message body is such a block, several times per
/// message (a quarter of all allocations on bench/compare row 3's scenario).
fn word_aligned(layout: &Layout) -> bool {
    layout.align() <= std::mem::align_of::<usize>()
}

// SAFETY: every block is freed or resized by the allocator that made it: both calls
// receive the layout it was allocated with, and its size selects the same allocator.
// A resize that crosses `LARGE` allocates from the other one, copies and frees.
unsafe impl GlobalAlloc for BrokerAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        } else if word_aligned(&layout) {
            // SAFETY: mi_malloc takes any size; its block is word-aligned.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: as above.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc_zeroed(layout) }
        } else if word_aligned(&layout) {
            // SAFETY: as mi_malloc, zeroed.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
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
            // SAFETY: the block came from mimalloc (plain or aligned, both resized by
            // mi_realloc); the new one needs no more than a word's alignment.
            (false, false) if word_aligned(&layout) => unsafe {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            },
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

/// mimalloc's option `allow_thp` (its `mi_option_t` number in v3).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// First thing in `main`, so that a drained backlog's memory goes back to the system
/// (and the memory alarm clears):
/// - no transparent huge pages for this process: freed small pages inside a huge page
///   do not go back;
/// - every block glibc serves (those of [`LARGE`] and more) gets its own mapping, given
///   back when it is freed. glibc otherwise raises its mapping threshold after the first
///   large free (up to 32 MiB) and serves later blocks from its arenas, whose free space
///   between live blocks stays resident.
pub fn configure() {
    // SAFETY: sets an option's value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; a fixed threshold also
    // turns its adjustment off.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int)
    };
}

/// Bytes mimalloc reports committed (`mi_process_info`), added to the system malloc's
/// in-use bytes as what the heap uses. It counts pages mimalloc holds free too, and its
/// statistics are merged only when a thread collects, so it runs high: the memory
/// monitor therefore also releases on time while memory runs short.
pub fn mimalloc_committed_bytes() -> u64 {
    /// Position of the committed figure among `mi_process_info`'s eight outputs.
    const COMMIT: usize = 5;
    let mut fields = [0usize; 8];
    let f = fields.as_mut_ptr();
    // SAFETY: eight distinct live usizes of `fields`, which mi_process_info only writes.
    unsafe {
        libmimalloc_sys::mi_process_info(
            f,
            f.add(1),
            f.add(2),
            f.add(3),
            f.add(4),
            f.add(5),
            f.add(6),
            f.add(7),
        )
    };
    fields[COMMIT] as u64
}

/// Bumped by every [`mimalloc_release`]: threads that have not collected since then do
/// at their next [`collect_if_asked`].
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The value of [`RELEASES`] this thread last collected at.
    static COLLECTED: Cell<u64> = const { Cell::new(0) };
}

/// Asks mimalloc to return the memory it holds free to the system. mimalloc can collect
/// only the calling thread's heap, and a page freed by other threads (a body read back
/// on the store's reader thread and freed on the runtime's after its delivery) stays
/// with the thread that allocated it: so this collects here and asks every other thread
/// to collect at its next [`collect_if_asked`].
pub fn mimalloc_release() {
    let now = RELEASES.fetch_add(1, Ordering::Relaxed) + 1;
    COLLECTED.with(|c| c.set(now));
    // SAFETY: mi_collect only frees memory mimalloc holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Collects this thread's mimalloc heap when a release was asked since it last did:
/// called by long-lived threads when they go idle (the runtime's workers when they park,
/// the store's threads between their jobs). Costs an atomic load otherwise.
pub fn collect_if_asked() {
    let asked = RELEASES.load(Ordering::Relaxed);
    if COLLECTED.with(|c| c.replace(asked)) != asked {
        // SAFETY: as in `mimalloc_release`.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
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
