//! Cache hints, for tiers that implement [`StorageTier::prefetch`](crate::StorageTier::prefetch).

/// Asks the CPU to start bringing the cache line that holds `at` into its cache (for
/// writing, if `write`), and returns at once. Only a hint: it never faults, reads nothing
/// into the program and changes no memory. Does nothing on targets other than x86_64.
///
/// A lookup that knows where its next read will land can issue this first and do other
/// work while the line comes from memory, instead of waiting for it.
///
/// ```
/// let words = vec![0u64; 1024];
/// context_core::cache::prefetch(&words[512], false);
/// assert_eq!(words[512], 0);
/// ```
pub fn prefetch<T: ?Sized>(at: &T, write: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_ET0, _MM_HINT_T0, _mm_prefetch};
        let p = std::ptr::from_ref(at).cast::<i8>();
        // SAFETY: a prefetch is only a hint to the cache: it never faults (not even on an
        // unmapped address), reads nothing into the program and changes no memory. The
        // address is that of a live borrow anyway. `sse`, the feature it needs, is part of
        // the x86_64 baseline.
        unsafe {
            if write {
                _mm_prefetch::<_MM_HINT_ET0>(p);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, write);
}
