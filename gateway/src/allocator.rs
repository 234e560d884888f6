//! The global allocator (feature `mimalloc`): mimalloc, called the way C calls it.
//!
//! The `mimalloc` crate's `GlobalAlloc` hands every Rust allocation to
//! `mi_malloc_aligned`. mimalloc 3 serves that from its small-block fast path only when
//! the block's free list is ready and, failing that, without over-allocating only when
//! the block size is a power of two. Any other size (a `Vec` of four readings is 224
//! bytes) went to the fallback: a block of a larger size class, marked as holding
//! interior pointers, which also slows its `free`. The fallback was 8% of the MQTT input
//! thread's samples. mimalloc's own issue and the Rust wrappers that fixed it the same
//! way: microsoft/mimalloc#314, purpleprotocol/mimalloc_rust#170.
//!
//! Here a request whose alignment every fitting mimalloc block already has goes to
//! `mi_malloc` / `mi_zalloc` / `mi_realloc`, as C's `malloc` does (see [`plain`]); only
//! larger alignments take the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::{c_long, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use libmimalloc_sys as mi;

/// `mi_option_purge_delay` in mimalloc.h (not exported as a constant by the sys crate "for
/// stability reasons"; the same position in mimalloc 2 and 3).
const PURGE_DELAY: mi::mi_option_t = 15;

/// The purge delay (ms) while the spool is in use: an outage, the drain after it. mimalloc
/// keeps freed pages 1 s by default before it returns them to the OS; with librdkafka and
/// SQLite on mimalloc too, that raised the peak RSS of an outage and its drain by 10 to 15
/// MiB (past the 64 MiB target). 10 ms kept the peak at 55 MiB, later 44 MiB, at the same
/// drain rate (0 ms cut the drain rate by two thirds). BENCHMARKS.md has the runs.
pub const PURGE_DELAY_SPOOLING_MS: c_long = 10;

/// The purge delay (ms) while records go straight to Kafka. mimalloc purges every page
/// that is free when the delay runs out. Records live one linger and a round trip (20 to
/// 40 ms), and librdkafka frees a whole batch of them at once: at 10 ms the router
/// faulted the same pages back in after every purge (15% of its samples in a profile,
/// and `madvise` 4.5% more). At 250 ms it spent 19% less CPU, and the peak RSS of direct
/// sends rose from about 30 to about 39 MiB, under the outage's peak at 10 ms.
pub const PURGE_DELAY_DIRECT_MS: c_long = 250;

/// Which purge delay the router's mode calls for, and whether it changed.
struct Mode {
    /// The purge delay is the gateway's to set (the environment does not set it).
    managed: AtomicBool,
    /// The last mode given to [`Mode::switch`].
    direct: AtomicBool,
}

impl Mode {
    const fn new() -> Mode {
        Mode {
            managed: AtomicBool::new(false),
            direct: AtomicBool::new(false),
        }
    }

    /// Takes charge of the delay, starting in spooling mode; returns the delay to set.
    fn manage(&self) -> c_long {
        self.managed.store(true, Ordering::Relaxed);
        self.direct.store(false, Ordering::Relaxed);
        PURGE_DELAY_SPOOLING_MS
    }

    /// The delay to set for mode `direct`, if the gateway manages it and the mode changed.
    fn switch(&self, direct: bool) -> Option<c_long> {
        (self.managed.load(Ordering::Relaxed)
            && self.direct.swap(direct, Ordering::Relaxed) != direct)
            .then_some(if direct {
                PURGE_DELAY_DIRECT_MS
            } else {
                PURGE_DELAY_SPOOLING_MS
            })
    }
}

static MODE: Mode = Mode::new();

fn set_purge_delay(ms: c_long) {
    // SAFETY: `mi_option_set` stores an option's value; it may be called from any thread
    // at any time (mimalloc reads the purge delay each time it schedules a purge), and
    // both delays are in its documented range.
    #[allow(unsafe_code)]
    unsafe {
        mi::mi_option_set(PURGE_DELAY, ms)
    };
}

/// Sets the purge delay for a start with the spool in use, unless `MIMALLOC_PURGE_DELAY`
/// (or its old name `MIMALLOC_RESET_DELAY`) in the environment sets it: then the
/// operator's value holds throughout.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
        && std::env::var_os("MIMALLOC_RESET_DELAY").is_none()
    {
        set_purge_delay(MODE.manage());
    }
}

/// Switches the purge delay with the router's mode: [`PURGE_DELAY_DIRECT_MS`] while
/// records go straight to Kafka, [`PURGE_DELAY_SPOOLING_MS`] while the spool is in use.
/// Does nothing unless [`tune`] took charge of the delay; cheap to call on every tick.
pub fn direct_mode(direct: bool) {
    if let Some(ms) = MODE.switch(direct) {
        set_purge_delay(ms);
    }
}

/// The purge delay mimalloc uses now (ms).
#[cfg(test)]
fn purge_delay() -> c_long {
    // SAFETY: `mi_option_get` reads an option's value; it may be called at any time.
    #[allow(unsafe_code)]
    unsafe {
        mi::mi_option_get(PURGE_DELAY)
    }
}

/// The machine word, mimalloc's unit of block sizes.
const WORD: usize = std::mem::size_of::<usize>();

/// Whether a plain (unaligned) mimalloc call returns memory aligned for `size` and
/// `align`.
///
/// mimalloc's size classes are whole words (`init.c`): below 10 words a request is rounded
/// up to an even number of words (to a multiple of four on 32-bit targets,
/// `MI_ALIGN2W`/`MI_ALIGN4W` in `page-queue.c`), and from 10 words on every class is an
/// even number of words; the first block of a page is 16-byte aligned
/// (`MI_PAGE_MIN_START_BLOCK_ALIGN`). So every block is word-aligned, and a size that is
/// a multiple of two words lands in a class whose blocks are two-word multiples apart,
/// hence two-word aligned. This holds without mimalloc's padding and guard pages, which
/// only its `debug` and `secure` builds add (neither feature is enabled, see the
/// workspace Cargo.toml); `tests::plain_calls_honour_the_layout` checks it on every build.
#[inline]
const fn plain(size: usize, align: usize) -> bool {
    align <= WORD || (align <= 2 * WORD && size % align == 0)
}

/// mimalloc as the global allocator, with plain calls where they suffice.
pub struct Allocator;

// SAFETY: every call returns memory from mimalloc that is at least `layout.size()` bytes
// and aligned to `layout.align()`: the aligned calls guarantee it, and the plain calls are
// used only where `plain` shows their blocks have that alignment. Every block is freed or
// resized with mimalloc's own calls, which accept blocks from both kinds of call.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls have no preconditions.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned, not yet freed.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a live block of this allocator; the result is aligned
        // for `layout.align()` by the same argument as in `alloc`.
        unsafe {
            if plain(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 4 KiB and a few large ones, at alignments 1 to 64, through the
    /// allocator's own calls: the memory is aligned and usable, also after growing and
    /// shrinking.
    #[test]
    #[allow(unsafe_code)]
    fn plain_calls_honour_the_layout() {
        let a = Allocator;
        let sizes = (1..=4096).chain([8191, 8192, 65_536, 1 << 20, (1 << 20) + 8]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: non-zero sizes; every block is written within its size and
                // freed once, with the layout it was made with.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc size {size} align {align}");
                    p.write_bytes(0xA5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zalloc size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    let grown = a.realloc(p, layout, size * 2 + align);
                    assert_eq!(grown as usize % align, 0, "grow size {size} align {align}");
                    assert_eq!(*grown, 0xA5);
                    let big = Layout::from_size_align_unchecked(size * 2 + align, align);
                    let shrunk = a.realloc(grown, big, size.div_ceil(2));
                    assert_eq!(
                        shrunk as usize % align,
                        0,
                        "shrink size {size} align {align}"
                    );
                    a.dealloc(
                        shrunk,
                        Layout::from_size_align_unchecked(size.div_ceil(2), align),
                    );
                    a.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn the_purge_delay_follows_the_routers_mode() {
        let mode = Mode::new();
        // Not managed (the environment sets the delay): the mode leaves it alone.
        assert_eq!(mode.switch(true), None);
        assert_eq!(mode.manage(), PURGE_DELAY_SPOOLING_MS);
        assert_eq!(mode.switch(false), None);
        assert_eq!(mode.switch(true), Some(PURGE_DELAY_DIRECT_MS));
        assert_eq!(mode.switch(true), None);
        assert_eq!(mode.switch(false), Some(PURGE_DELAY_SPOOLING_MS));
        // mimalloc takes the value (no other test sets it: `tune` runs in the binary).
        let before = purge_delay();
        set_purge_delay(PURGE_DELAY_DIRECT_MS);
        assert_eq!(purge_delay(), PURGE_DELAY_DIRECT_MS);
        set_purge_delay(before);
    }

    #[test]
    fn plain_only_where_blocks_are_aligned() {
        assert!(plain(224, 8));
        assert!(plain(3, 1));
        assert!(plain(2 * WORD, 2 * WORD));
        assert!(!plain(3 * WORD, 2 * WORD));
        assert!(!plain(64, 64));
    }
}
