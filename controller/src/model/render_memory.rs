//! A memory bound for rendering templates.
//!
//! minijinja bounds the steps a template takes (fuel, see [`crate::model::render`]) but not the size of
//! the strings it builds: `{% set s = s ~ s %}` doubles a string per step, so a few steps can
//! take gigabytes. [`Allocator`] (installed by `tlm` as the global allocator) counts what the
//! current thread allocates while it renders a template ([`limit`]); past
//! [`RENDER_MEMORY_LIMIT`] the process ends at once with one line naming the template and exit
//! status 1. Nothing is half-written: a commit writes only to its staging directory while it
//! renders, which the next `tlm` removes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Memory one template may allocate while it renders one node.
pub const RENDER_MEMORY_LIMIT: usize = 256 * 1024 * 1024;

thread_local! {
    /// Bytes still allowed on this thread, while it renders.
    static LEFT: Cell<Option<isize>> = const { Cell::new(None) };
    /// The template being rendered (pointer and length of its path, alive while `LEFT` is set).
    static TEMPLATE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// While alive, the thread's allocations count against [`RENDER_MEMORY_LIMIT`].
pub struct Limit<'a> {
    _template: std::marker::PhantomData<&'a str>,
}

/// Bounds the memory the current thread allocates until the returned guard is dropped.
pub fn limit(template: &str) -> Limit<'_> {
    TEMPLATE.with(|t| t.set((template.as_ptr(), template.len())));
    LEFT.with(|l| l.set(Some(RENDER_MEMORY_LIMIT as isize)));
    Limit {
        _template: std::marker::PhantomData,
    }
}

impl Drop for Limit<'_> {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(None));
        TEMPLATE.with(|t| t.set((std::ptr::null(), 0)));
    }
}

/// Counts `delta` bytes; false when the thread is over its limit.
fn account(delta: isize) -> bool {
    LEFT.try_with(|l| match l.get() {
        None => true,
        Some(left) => {
            let left = left - delta;
            l.set(Some(left));
            left >= 0
        }
    })
    .unwrap_or(true)
}

/// Ends the process: the template took more memory than allowed. Allocates nothing.
fn exceeded() -> ! {
    let write = |bytes: &[u8]| {
        let _ = rustix::io::write(rustix::stdio::stderr(), bytes);
    };
    write(b"tlm: error: template `");
    let (ptr, len) = TEMPLATE
        .try_with(|t| t.get())
        .unwrap_or((std::ptr::null(), 0));
    if !ptr.is_null() {
        // SAFETY: set by `limit` from a `&str` that outlives the guard, which is alive.
        write(unsafe { std::slice::from_raw_parts(ptr, len) });
    }
    write(b"`: rendering takes more than 256 MiB of memory (a string built in a loop?)\n");
    // Neither std nor rustix's stable API ends the process without running exit handlers
    // (`std::process::exit` flushes stdout and runs `atexit` handlers, which may allocate, here
    // inside the allocator; `abort` is a different status).
    // SAFETY: ends the process without running anything that could allocate.
    unsafe { libc::_exit(1) }
}

/// The system allocator, with the per-thread bound of [`limit`].
pub struct Allocator;

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size() as isize) {
            exceeded();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size() as isize) {
            exceeded();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !account(new_size as isize - layout.size() as isize) {
            exceeded();
        }
        System.realloc(ptr, layout, new_size)
    }
}
