//! A global allocator that aborts on any single allocation of
//! [`MAX_ALLOCATION`] bytes or more. Included (with `#[path]`) by every fuzz
//! target and by the stable corpus replay `tests/fuzz_corpus.rs`.
//!
//! Why: the inputs are a few kilobytes, so an allocation that large means a
//! size claimed by the file (dims, lengths, counts) was trusted before it
//! was checked against the bytes that are really there. libFuzzer's
//! `-malloc_limit_mb` catches that too, but only when a sanitizer is built
//! in (it hooks malloc through the sanitizer runtime); the stable toolchain
//! builds the targets without one, and this cap makes the check hold there
//! as well. The abort is a crash to libFuzzer, which saves the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// The largest single allocation a fuzz input may cause, exclusive: the
/// same bound as `scripts/fuzz.sh`'s default `-malloc_limit_mb=512`.
pub const MAX_ALLOCATION: usize = 512 << 20;

/// [`System`], with the cap in front.
pub struct CappedAllocator;

#[global_allocator]
static GLOBAL: CappedAllocator = CappedAllocator;

/// Aborts when `size` is over the cap. An allocator must not unwind, so
/// this aborts instead of panicking, and it formats the message itself on
/// the stack, because allocating here would re-enter the allocator.
fn check(size: usize) {
    if size < MAX_ALLOCATION {
        return;
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = size;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"fuzz allocation cap: an allocation of ");
    let _ = err.write_all(&digits[at..]);
    let _ = err.write_all(b" bytes (cap 536870912): a size from the input was trusted\n");
    let _ = err.flush();
    std::process::abort();
}

// SAFETY: every call is passed unchanged to `System`, which upholds the
// `GlobalAlloc` contract; `check` only reads the size and may abort.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}
