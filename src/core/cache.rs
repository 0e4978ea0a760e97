//! Cache hints: asking the CPU to fetch memory that will be read soon.
//!
//! A bounded queue that is full holds events published thousands of events ago: the memory of
//! the one a worker takes (its queue slot, its envelope, the event object the handler call
//! touches) has left the core's caches, and each first read waits on the next level. A worker
//! hints the next event's envelope while it handles the one it took (`src/python/worker/mod.rs`;
//! perf of the in-memory bus: the first read of a taken envelope was ~4% of the samples; hints
//! two and three events ahead, of the queue slot and the event object, measured no better).
//! A hint never faults and changes nothing but timing; off x86-64 it does nothing.

/// Hints the cache lines of `len` bytes from `start` (a pointer that need not be valid).
#[inline]
pub fn prefetch(start: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut line = start as usize & !63;
        let end = (start as usize).wrapping_add(len.max(1));
        while line < end {
            // SAFETY: a prefetch neither reads nor faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_any_address_without_faulting() {
        let v = [7u64; 40];
        prefetch(v.as_ptr().cast(), size_of_val(&v));
        prefetch(std::ptr::null(), 4096);
        prefetch(usize::MAX as *const u8, 1);
        assert_eq!(v[39], 7);
    }
}
