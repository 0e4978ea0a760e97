//! Items received on a transport thread, handed to the asyncio loop a batch at a time.

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;

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
}
