//! Loop futures completed from another thread, a batch at a time.
//!
//! A request registers a future (on the running loop) under a token and hands the token to a
//! background thread. The thread later completes a whole batch: it stores each outcome (a
//! closure that builds the Python result on the loop thread) and schedules the resolver with
//! one `call_soon_threadsafe` per loop involved — one GIL acquisition and one wake-up per batch,
//! never per request, and nothing at all once the interpreter is finalizing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;

/// Builds a request's result (or error) on the loop thread.
pub type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// A request's future and the loop it belongs to.
type Waiting = (Py<PyAny>, Py<PyAny>);

/// Pending futures and finished outcomes of one store or transport.
#[derive(Default)]
pub struct Completions {
    /// token -> (future, its loop)
    pending: Mutex<HashMap<u64, Waiting>>,
    done: Mutex<Vec<(u64, Outcome)>>,
    next: AtomicU64,
}

impl Completions {
    /// A new future on the running loop and the token that completes it.
    pub fn register<'py>(&self, py: Python<'py>) -> PyResult<(u64, Py<PyAny>, Bound<'py, PyAny>)> {
        static GET_RUNNING_LOOP: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
        let get = GET_RUNNING_LOOP.get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
        })?;
        let loop_ = get.bind(py).call0()?;
        let fut = loop_.call_method0(intern!(py, "create_future"))?;
        let token = self.next.fetch_add(1, Relaxed) + 1;
        self.pending
            .lock()
            .insert(token, (fut.clone().unbind(), loop_.clone().unbind()));
        Ok((token, fut.unbind(), loop_))
    }

    /// Forgets a token whose request could not be sent.
    pub fn forget(&self, token: u64) {
        self.pending.lock().remove(&token);
    }

    /// Fails a registered future at once (on the loop thread).
    pub fn fail_now(&self, py: Python<'_>, token: u64, err: &PyErr) {
        if let Some((fut, _)) = self.pending.lock().remove(&token) {
            let _ = fut
                .bind(py)
                .call_method1(intern!(py, "set_exception"), (err.value(py),));
        }
    }

    /// Called from any thread: stores the outcomes and wakes each loop involved once.
    pub fn complete(&self, resolver: &Py<PyResolver>, outcomes: Vec<(u64, Outcome)>) {
        let tokens: Vec<u64> = outcomes.iter().map(|(t, _)| *t).collect();
        self.done.lock().extend(outcomes);
        let _ = Python::try_attach(|py| {
            let mut loops: Vec<Py<PyAny>> = Vec::new();
            {
                let pending = self.pending.lock();
                for t in &tokens {
                    if let Some((_, l)) = pending.get(t) {
                        if !loops.iter().any(|x| x.is(l)) {
                            loops.push(l.clone_ref(py));
                        }
                    }
                }
            }
            for l in loops {
                // A closed loop refuses; its futures are gone with it.
                let _ = l
                    .bind(py)
                    .call_method1(intern!(py, "call_soon_threadsafe"), (resolver.bind(py),));
            }
        });
    }
}

/// Resolves finished requests; scheduled on the loop thread by `Completions::complete`.
#[pyclass(frozen, name = "Resolver", module = "oxbus._oxbus")]
pub struct PyResolver {
    completions: Arc<Completions>,
}

impl PyResolver {
    pub fn new(completions: Arc<Completions>) -> Self {
        Self { completions }
    }
}

#[pymethods]
impl PyResolver {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let done = std::mem::take(&mut *self.completions.done.lock());
        for (token, outcome) in done {
            let Some((fut, _)) = self.completions.pending.lock().remove(&token) else {
                continue;
            };
            let fut = fut.bind(py);
            if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
                continue; // cancelled by its awaiter
            }
            match outcome(py) {
                Ok(v) => fut.call_method1(intern!(py, "set_result"), (v,))?,
                Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.value(py),))?,
            };
        }
        Ok(())
    }
}
