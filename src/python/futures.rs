//! Settling asyncio futures from the engine's glue: never twice, never raising.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// Whether a loop future is done (an error counts as done: it will never be resolved).
pub fn is_done(py: Python<'_>, fut: &Py<PyAny>) -> bool {
    fut.bind(py)
        .call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

/// Resolves a loop future with `value` unless it is done (cancelled by a timeout, say).
pub fn resolve(py: Python<'_>, fut: &Py<PyAny>, value: &Bound<'_, PyAny>) {
    settle(py, fut, intern!(py, "set_result"), value);
}

pub fn fail(py: Python<'_>, fut: &Py<PyAny>, err: &PyErr) {
    settle(
        py,
        fut,
        intern!(py, "set_exception"),
        err.value(py).as_any(),
    );
}

/// `fut.<method>(value)` unless the future is done; an error is reported, never raised.
fn settle(py: Python<'_>, fut: &Py<PyAny>, method: &Bound<'_, PyString>, value: &Bound<'_, PyAny>) {
    if is_done(py, fut) {
        return;
    }
    let f = fut.bind(py);
    if let Err(e) = f.call_method1(method, (value,)) {
        e.write_unraisable(py, Some(f));
    }
}

/// A request's result (or error), built on its loop's thread.
pub type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// Finished futures with their outcomes.
pub type Finished = Vec<(Py<PyAny>, Outcome)>;

/// Settles each future with its outcome, on its loop's thread, unless it is done (cancelled by
/// its awaiter): every one is tried, and an error is reported, never raised.
pub fn settle_all(py: Python<'_>, items: Finished) {
    for (fut, outcome) in items {
        if is_done(py, &fut) {
            continue;
        }
        match outcome(py) {
            Ok(v) => resolve(py, &fut, v.bind(py)),
            Err(e) => fail(py, &fut, &e),
        }
    }
}

/// Resolves each future with None.
pub fn resolve_all(py: Python<'_>, futs: Vec<Py<PyAny>>) {
    let none = py.None().into_bound(py);
    for f in futs {
        resolve(py, &f, &none);
    }
}
