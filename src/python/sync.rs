//! Engine state shared by the threads that hold the GIL.
//!
//! Every access to the engine's state takes the GIL token, so the GIL already serialises
//! them: a lock of its own would only add two atomic read-modify-writes per acquisition (on
//! these machines ~2% of an in-memory event's cost each, measured with `perf`), and an
//! in-memory event takes the engine three times. `GilMutex` is therefore a flag guarded by
//! the GIL: taking it free costs a plain read and two writes (the flag, and the holder's
//! thread, so that the holder asking again panics instead of waiting for itself). It is
//! held across a GIL release only when its holder releases the GIL on purpose while holding
//! it (or Python code run under it lets another thread in); another thread that then wants
//! it waits with the GIL released, so the holder can take the GIL back and finish. Code under the lock still
//! keeps Python out where it can (collect, unlock, then call), which keeps the hold times
//! short. Sound because the GIL is real: the module refuses to load into a free-threaded
//! interpreter running without it (`require_gil`); the GIL's hand-over between threads
//! orders their reads and writes of the flag and the value.

use std::cell::{Cell, UnsafeCell};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use pyo3::prelude::*;

/// A lock whose only way in takes the GIL token: free, a flag; held, a wait without the GIL.
/// Taken again by its holder's own thread (Python code run under it that came back to the
/// engine: a bug) it panics, naming the bug, where it would wait for itself forever.
#[derive(Default)]
pub struct GilMutex<T> {
    held: Cell<bool>,
    /// The thread that holds it (`pthread_self`: a register read), while `held`.
    holder: Cell<Option<libc::pthread_t>>,
    value: UnsafeCell<T>,
}

// SAFETY: the flag and the value are only touched by the thread holding the GIL (`lock` takes
// the token, the guard can neither leave that thread nor outlive the token's lifetime), and
// the value only by the flag's holder; values move between threads only as `T: Send`.
unsafe impl<T: Send> Sync for GilMutex<T> {}

impl<T: Send> GilMutex<T> {
    /// A new, unlocked mutex.
    pub const fn new(value: T) -> Self {
        Self {
            held: Cell::new(false),
            holder: Cell::new(None),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock; when another thread holds it (it released the GIL meanwhile), waits
    /// with the GIL released until it is free.
    ///
    /// # Panics
    ///
    /// When the thread holding it asks again: it would wait for itself forever.
    #[inline]
    pub fn lock<'py>(&'py self, py: Python<'py>) -> GilGuard<'py, T> {
        // SAFETY: always safe to call.
        let me = unsafe { libc::pthread_self() };
        while self.held.get() {
            self.wait(py, me);
        }
        self.held.set(true);
        self.holder.set(Some(me));
        GilGuard {
            lock: self,
            _gil: PhantomData,
        }
    }

    #[cold]
    fn wait(&self, py: Python<'_>, me: libc::pthread_t) {
        assert!(
            self.holder.get() != Some(me),
            "oxbus: an engine lock was taken again by the thread holding it (Python code ran \
             under the lock and called back into the bus): a bug in oxbus, please report it"
        );
        py.detach(|| std::thread::sleep(std::time::Duration::from_micros(20)));
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// The value while nobody holds the lock, for the garbage collector's `__traverse__`,
    /// which runs with the GIL held but gets no token: None while the lock is held (the
    /// holder may be changing the value on a thread that released the GIL).
    ///
    /// # Safety
    ///
    /// The calling thread holds the GIL and runs no Python and takes no lock while it uses the
    /// reference (so no other thread can take the lock meanwhile: `lock` needs the GIL).
    pub unsafe fn peek(&self) -> Option<&T> {
        if self.held.get() {
            return None;
        }
        // SAFETY: free, and (the caller's contract) nobody can take it while this is used.
        Some(unsafe { &*self.value.get() })
    }
}

/// The holder of a [`GilMutex`]: neither `Send` nor `Sync`, and no longer than the GIL token
/// it was taken with, so it is used and dropped by the thread holding the GIL.
pub struct GilGuard<'py, T> {
    lock: &'py GilMutex<T>,
    _gil: PhantomData<(Python<'py>, *const ())>,
}

impl<T> Deref for GilGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the flag: no other reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for GilGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`, and `&mut self` is unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for GilGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.held.set(false);
    }
}

/// A value replaced or cloned out by the thread holding the GIL, with no lock: for state only
/// ever touched by calls from Python on the hottest path, where a lock pair (two atomic
/// read-modify-writes, ~2% of an in-memory event's cost each on these machines) is the
/// largest cost left. Holding the GIL is the whole protection, so the API never lets a
/// reference into the value escape and runs no Python while it touches it (`replace` moves
/// values; `get` clones a value whose `Clone` is plain Rust). Sound because the GIL is real:
/// the module refuses to load into a free-threaded interpreter running without it
/// (`require_gil`).
pub struct GilCell<T>(std::cell::UnsafeCell<T>);

// SAFETY: every access takes the GIL token (see the type's documentation), so accesses from
// different threads are serialised by the GIL; values move between threads only as `T: Send`.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    /// A new cell.
    pub const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Puts `value` in and returns what was there.
    #[inline]
    pub fn replace(&self, _py: Python<'_>, value: T) -> T {
        // SAFETY: the GIL is held (the token), and no other access is in progress: none
        // runs Python or hands out a reference.
        unsafe { std::ptr::replace(self.0.get(), value) }
    }

    /// The value, through exclusive access.
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}

impl<T: Clone> GilCell<T> {
    /// A clone of the value (`T`'s `Clone` must not run Python).
    #[inline]
    pub fn get(&self, _py: Python<'_>) -> T {
        // SAFETY: as for `replace`; the clone is made before anything else can run.
        unsafe { (*self.0.get()).clone() }
    }
}

/// Refuses a free-threaded interpreter whose GIL is off (`PYTHON_GIL=0`, `-X gil=0`): the
/// engine's `GilCell`s rely on it. (CPython turns the GIL back on when it imports a module
/// that does not declare free-threading support, as this one does not, unless forced off.)
pub fn require_gil(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    if let Ok(enabled) = sys.getattr("_is_gil_enabled") {
        if !enabled.call0()?.is_truthy()? {
            return Err(pyo3::exceptions::PyImportError::new_err(
                "oxbus needs the GIL, and this free-threaded interpreter runs without it \
                 (PYTHON_GIL=0 or -X gil=0): run it without that setting",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_holder_that_releases_the_gil_keeps_the_others_out_until_it_is_done() {
        Python::initialize();
        let m = Arc::new(GilMutex::new(Vec::<u32>::new()));
        let theirs = Arc::clone(&m);
        let (held, wait) = mpsc::channel();
        let holder = std::thread::spawn(move || {
            Python::attach(|py| {
                let mut g = theirs.lock(py);
                g.push(1);
                held.send(()).unwrap();
                // Holding the lock with the GIL released: the main thread gets the GIL and
                // must wait for the lock without it, or this thread could never finish.
                py.detach(|| std::thread::sleep(Duration::from_millis(50)));
                g.push(2);
            });
        });
        wait.recv().unwrap();
        Python::attach(|py| m.lock(py).push(3));
        holder.join().unwrap();
        Python::attach(|py| assert_eq!(*m.lock(py), vec![1, 2, 3]));
    }

    #[test]
    fn its_holder_taking_it_again_panics_instead_of_waiting_forever() {
        Python::initialize();
        let m = GilMutex::new(0u8);
        Python::attach(|py| {
            let held = m.lock(py);
            let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                drop(m.lock(py));
            }));
            let msg = again.expect_err("re-entry must panic");
            let msg = msg.downcast_ref::<&str>().copied().unwrap_or_default();
            assert!(
                msg.contains("taken again by the thread holding it"),
                "{msg}"
            );
            drop(held);
            *m.lock(py) += 1; // free again after its holder let go
            assert_eq!(*m.lock(py), 1);
        });
    }

    #[test]
    fn a_gil_cell_hands_back_what_it_held() {
        Python::initialize();
        let c = GilCell::new(Some(1));
        Python::attach(|py| {
            assert_eq!(c.get(py), Some(1));
            assert_eq!(c.replace(py, None), Some(1));
            assert_eq!(c.get(py), None);
        });
    }
}
