//! A loop's own wake-up for futures finished on other threads, without the GIL.
//!
//! Each asyncio loop that waits for the store's writer (or a transport) gets, on first use, a
//! socket pair whose reading end it watches (`loop.add_reader`) and a queue. A background
//! thread hands the loop its finished futures by pushing them on the queue and writing one
//! byte when none is on its way already: no GIL, no Python thread state, nothing of Python at
//! all. The loop, woken by the byte, resolves the whole queue at once on its own thread.
//!
//! Before, the thread took the GIL to call `loop.call_soon_threadsafe` per batch: CPython made
//! and freed a thread state for it each time (an `mmap`/`munmap` of its frame stack), the
//! thread waited for the GIL whenever the loop was running Python code, and the loop, woken,
//! waited for the thread to give the GIL back. That path stays for loops that cannot watch a
//! descriptor (`add_reader` raises, as on Windows' proactor loop) or cannot be weakly
//! referenced (the registry forgets a loop when it is collected, or found closed when a new
//! loop comes).

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use rustc_hash::FxHashMap;

use crate::python::futures::{settle_all, Finished};

/// The wake-up of one loop: the socket pair and the finished futures waiting for the loop.
pub struct LoopWake {
    /// The end the loop watches.
    rx: UnixStream,
    /// The end other threads write one byte to.
    tx: UnixStream,
    /// A byte was written that the loop has not read yet: pushes write no other.
    armed: AtomicBool,
    queue: Mutex<Finished>,
}

impl LoopWake {
    fn new() -> std::io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Self {
            rx,
            tx,
            armed: AtomicBool::new(false),
            queue: Mutex::new(Vec::new()),
        })
    }

    /// From any thread: queues finished futures for the loop and wakes it (once per batch the
    /// loop has not taken yet).
    pub fn hand(&self, items: Finished) {
        self.queue.lock().extend(items);
        if !self.armed.swap(true, SeqCst) {
            // Nonblocking; a full buffer means bytes are waiting already.
            let _ = (&self.tx).write(&[1]);
        }
    }

    /// On the loop thread: everything queued. The bytes are read and the flag cleared before
    /// the queue is taken, so a push after this take writes a byte again.
    fn take(&self) -> Finished {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
        self.armed.store(false, SeqCst);
        std::mem::take(&mut *self.queue.lock())
    }
}

/// A loop's entry: its wake-up (None: the loop cannot watch a descriptor) and the weak
/// reference whose callback forgets the entry when the loop is collected.
struct Entry {
    wake: Option<Arc<LoopWake>>,
    watch: Py<PyAny>,
}

/// Loops by address. An entry leaves before its loop's memory can be reused (the weak
/// reference's callback runs as the loop is collected).
static LOOPS: Mutex<Option<FxHashMap<usize, Entry>>> = Mutex::new(None);

/// The wake-up of `loop_` (made and registered on first use), or None when its futures are
/// resolved through `call_soon_threadsafe` instead. On the loop's thread.
pub fn of(loop_: &Bound<'_, PyAny>) -> Option<Arc<LoopWake>> {
    let id = loop_.as_ptr() as usize;
    if let Some(e) = LOOPS.lock().as_ref().and_then(|m| m.get(&id)) {
        return e.wake.clone();
    }
    // First sight of this loop: Python calls, outside the registry's lock.
    let py = loop_.py();
    sweep(py);
    let forget = Py::new(py, PyForget(id)).ok()?;
    let watch = py
        .import(intern!(py, "weakref"))
        .and_then(|w| w.getattr(intern!(py, "ref")))
        .and_then(|r| r.call1((loop_, forget)))
        .ok()?; // not weakly referenceable: never cached, always the fallback
    let wake = LoopWake::new().ok().map(Arc::new).and_then(|w| {
        let reader = Py::new(py, PyWakeReader(Arc::clone(&w))).ok()?;
        loop_
            .call_method1(intern!(py, "add_reader"), (w.rx.as_raw_fd(), reader))
            .ok()
            .map(|_| w)
    });
    let old = LOOPS.lock().get_or_insert_with(FxHashMap::default).insert(
        id,
        Entry {
            wake: wake.clone(),
            watch: watch.unbind(),
        },
    );
    drop(old); // (none: this thread saw no entry, and only the loop's thread adds its own)
    wake
}

/// Forgets the loops that are closed (or gone): their socket pairs close once the loop's
/// selector let go of the reader too. Run when a new loop is first seen, so a program that
/// runs loop after loop (a test suite: `asyncio.run` per test) keeps a pair open only for the
/// loops still open, even when a closed loop is never collected.
fn sweep(py: Python<'_>) {
    let known: Vec<(usize, Py<PyAny>)> = LOOPS.lock().as_ref().map_or_else(Vec::new, |m| {
        m.iter()
            .map(|(id, e)| (*id, e.watch.clone_ref(py)))
            .collect()
    });
    let closed: Vec<usize> = known
        .into_iter()
        .filter(|(_, watch)| {
            watch.bind(py).call0().is_ok_and(|l| {
                l.is_none()
                    || l.call_method0(intern!(py, "is_closed"))
                        .and_then(|c| c.is_truthy())
                        .unwrap_or(false)
            })
        })
        .map(|(id, _)| id)
        .collect();
    if closed.is_empty() {
        return;
    }
    let gone: Vec<Entry> = {
        let mut loops = LOOPS.lock();
        let m = loops.get_or_insert_with(FxHashMap::default);
        closed.iter().filter_map(|id| m.remove(id)).collect()
    };
    drop(gone); // after the lock: their weak references are Python objects
}

/// The weak reference's callback: forgets a collected loop.
#[pyclass(frozen, name = "LoopForget", module = "oxbus._oxbus")]
pub struct PyForget(usize);

#[pymethods]
impl PyForget {
    fn __call__(&self, _gone: &Bound<'_, PyAny>) {
        let entry = LOOPS.lock().as_mut().and_then(|m| m.remove(&self.0));
        drop(entry); // after the lock: its weak reference is a Python object
    }
}

/// The loop's reader callback: resolves every future handed to it since the last call.
#[pyclass(frozen, name = "LoopWakeReader", module = "oxbus._oxbus")]
pub struct PyWakeReader(Arc<LoopWake>);

#[pymethods]
impl PyWakeReader {
    fn __call__(&self, py: Python<'_>) {
        settle_all(py, self.0.take());
    }
}
