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
use std::ffi::c_void;

use libmimalloc_sys as mi;

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
    fn plain_only_where_blocks_are_aligned() {
        assert!(plain(224, 8));
        assert!(plain(3, 1));
        assert!(plain(2 * WORD, 2 * WORD));
        assert!(!plain(3 * WORD, 2 * WORD));
        assert!(!plain(64, 64));
    }
}
