//! Engine locks taken by threads that hold the GIL.
//!
//! A thread that holds the GIL and blocks on a lock whose holder is waiting for the GIL
//! deadlocks the process; the holder can be waiting for the GIL without running any Python
//! code of its own (pyo3's first `intern!` of a call site detaches while it initialises).
//! `GilMutex::lock` therefore only ever *waits* with the GIL released: an uncontended lock
//! costs one `try_lock`, a contended one releases the GIL while it waits. Code under the lock
//! still keeps Python out where it can (collect, unlock, then call), which keeps the hold
//! times short; this type makes the remaining cases safe.

use parking_lot::{Mutex, MutexGuard};
use pyo3::Python;

/// A `parking_lot::Mutex` whose only way in takes the GIL token and waits without it.
#[derive(Default)]
pub struct GilMutex<T>(Mutex<T>);

impl<T: Send> GilMutex<T> {
    /// A new, unlocked mutex.
    pub const fn new(value: T) -> Self {
        Self(Mutex::new(value))
    }

    /// Takes the lock; when another thread holds it, waits with the GIL released.
    #[inline]
    pub fn lock(&self, py: Python<'_>) -> MutexGuard<'_, T> {
        if let Some(guard) = self.0.try_lock() {
            return guard;
        }
        py.detach(|| self.0.lock())
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}
