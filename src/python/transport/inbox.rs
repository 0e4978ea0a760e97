//! Items received on a transport thread, handed to the asyncio loop a batch at a time.
//!
//! The target (the loop and its owner's callback, a bound method of the Python object that
//! holds the core owning this inbox) closes a cycle until `stop()` forgets it: the core that
//! owns the inbox shows it to the garbage collector (`traverse`) and forgets it when told, or
//! when the core goes (`clear`). The transport's tasks share the inbox and may outlive the
//! core for a while: without the `clear` on drop they would keep the loop alive meanwhile.

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use crate::python::runtime;

/// Items received on a transport thread and not yet taken on the loop, and the callback that
/// takes them: scheduled once per batch (when the inbox goes from empty to not empty).
pub struct Inbox<T> {
    items: Mutex<Vec<T>>,
    /// (loop, callback) to schedule when items arrive.
    target: Mutex<Option<(Py<PyAny>, Py<PyAny>)>>,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            target: Mutex::new(None),
        }
    }
}

impl<T> Inbox<T> {
    pub fn push(&self, items: Vec<T>) {
        let first = {
            let mut inbox = self.items.lock();
            let was_empty = inbox.is_empty();
            inbox.extend(items);
            was_empty
        };
        if first {
            // One GIL acquisition per batch; nothing once the interpreter is exiting.
            let _ = runtime::attach(|py| {
                let target = self
                    .target
                    .lock()
                    .as_ref()
                    .map(|(l, c)| (l.clone_ref(py), c.clone_ref(py)));
                if let Some((l, c)) = target {
                    let _ = l
                        .bind(py)
                        .call_method1(intern!(py, "call_soon_threadsafe"), (c,));
                }
            });
        }
    }

    /// Whether nothing waits to be taken.
    pub fn is_empty(&self) -> bool {
        self.items.lock().is_empty()
    }

    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock())
    }

    pub fn set_target(&self, target: Option<(Py<PyAny>, Py<PyAny>)>) {
        // The old target is dropped after the lock is released: a drop may run Python.
        let old = std::mem::replace(&mut *self.target.lock(), target);
        drop(old);
    }

    /// Visits the target's loop and callback, for the `__traverse__` of the core that owns
    /// this inbox. Every holder of the lock holds the GIL (which the collector holds now) and
    /// runs no Python under it, so it is free; were it not, nothing is visited, which only
    /// delays a collection. `visit` runs no Python code.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(target) = self.target.try_lock() {
            if let Some((loop_, callback)) = target.as_ref() {
                visit.call(loop_)?;
                visit.call(callback)?;
            }
        }
        Ok(())
    }

    /// Forgets the target, for the `__clear__` and the drop of the core that owns this inbox:
    /// items that arrive later wait here, scheduled nowhere.
    pub fn clear(&self) {
        self.set_target(None);
    }
}
