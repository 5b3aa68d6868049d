//! Shared by the fuzz targets: a global allocator that aborts (a crash to
//! AFL++) when the input makes the code under test allocate beyond a bound.
//!
//! The bound: no single allocation over [`MAX_ONE`] (16 MiB) and never more
//! than [`MAX_LIVE`] (64 MiB) live at once. AFL++ feeds inputs of at most
//! 1 MiB, so a parser that needs more than 64 times its input, or one large
//! allocation sized from a number in the input, is a bug.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest single allocation.
pub const MAX_ONE: usize = 16 * 1024 * 1024;
/// Most bytes live at once.
pub const MAX_LIVE: usize = 64 * 1024 * 1024;

/// The bounded allocator; install it with `#[global_allocator]`.
pub struct Bounded;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn charge(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if size > MAX_ONE || live > MAX_LIVE {
        // No message: formatting could allocate inside the allocator.
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
            if new_size > MAX_ONE {
                std::process::abort();
            }
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Defines `main` for a target: the bounded allocator and AFL++'s
/// persistent loop around `$f(&[u8])`.
#[macro_export]
macro_rules! target {
    ($f:path) => {
        #[global_allocator]
        static ALLOC: $crate::Bounded = $crate::Bounded;

        fn main() {
            afl::fuzz!(|data: &[u8]| {
                $f(data);
            });
        }
    };
}
