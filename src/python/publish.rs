//! `Publish`: the awaitable `await bus.publish(event)` gets on an in-memory bus, a native
//! object in place of a Python coroutine (which costs a frame, a coroutine object and a
//! scheduling of its own on every event: a third of the whole per-event cost measured with
//! callgrind; see benches/README.md).
//!
//! It behaves as the coroutine of `async def publish` did: nothing happens at the call, the
//! event is published on the first step (`send(None)`, `__next__`, or the `am_send` slot that
//! `await` and asyncio's tasks use), and the value is `True`. It implements the coroutine
//! protocol (`send`, `throw`, `close`, `__await__`) and `oxbus` registers it as a
//! `collections.abc.Coroutine`, so `asyncio.create_task(bus.publish(e))`, `gather` and
//! `wait_for` take it. A full queue makes it wait in `oxbus.backends.admit` (a Python
//! coroutine it drives, as `yield from` would). One never awaited warns as a coroutine would
//! (`RuntimeWarning: coroutine 'EventBus.publish' was never awaited`) and publishes nothing.
//!
//! The value travels without a `StopIteration` where the caller asks through `PyIter_Send`
//! (CPython 3.11's `await`, every asyncio task): the type's `am_send` slot, which PyO3 does
//! not generate, is set once on the type object (`install_slots`). Callers of `__next__` /
//! `send` (3.12's `await` calls `tp_iternext`) get the `StopIteration(True)` Python requires.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyRuntimeWarning, PyStopIteration, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyString, PyTuple};

use crate::python::bus::PyBusCore;
use crate::python::events::{self, Step};
use crate::python::sync::GilCell;

static ADMIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

enum State {
    /// Made, never stepped: nothing published yet.
    Fresh {
        event: Py<PyAny>,
        key: Option<Py<PyAny>>,
        correlation_id: Option<Py<PyAny>>,
    },
    /// The queue was full: driving `admit(core, waiter)` until the event enters.
    Waiting(Py<PyAny>),
    /// Being stepped (a step re-entered from the code it runs is refused, as a coroutine's).
    Running,
    /// Returned, raised or closed.
    Done,
}

/// What one step ended with.
enum Outcome {
    /// Suspended on this (a loop future).
    Yield(Py<PyAny>),
    /// Finished: the event was accepted.
    Accepted,
}

/// `await bus.publish(event)` on an in-memory bus; see the module documentation.
#[pyclass(frozen, name = "Publish", module = "oxbus._oxbus")]
pub struct PyPublish {
    core: Py<PyBusCore>,
    state: GilCell<State>,
}

impl PyPublish {
    pub fn new(
        core: Py<PyBusCore>,
        event: Py<PyAny>,
        key: Option<Py<PyAny>>,
        correlation_id: Option<Py<PyAny>>,
    ) -> Self {
        Self {
            core,
            state: GilCell::new(State::Fresh {
                event,
                key,
                correlation_id,
            }),
        }
    }

    /// One step: publish (first step) or resume the wait for room. `thrown` is an exception
    /// thrown in (`throw`), `value` what `send` passed.
    fn step(
        &self,
        py: Python<'_>,
        value: Option<&Bound<'_, PyAny>>,
        thrown: Option<PyErr>,
    ) -> PyResult<Outcome> {
        // No lock (the GIL protects the state): a fresh publish is marked done before it runs (a step
        // re-entered meanwhile is refused as a reuse), and stays done once accepted.
        let state = match self.state.replace(py, State::Running) {
            s @ (State::Fresh { .. } | State::Done) => {
                self.state.replace(py, State::Done);
                s
            }
            s => s,
        };
        let (outcome, next) = match state {
            State::Fresh {
                event,
                key,
                correlation_id,
            } => {
                if let Some(e) = thrown {
                    // Thrown into a coroutine that never ran: it ends with that exception.
                    return Err(e);
                }
                if value.is_some_and(|v| !v.is_none()) {
                    return Err(PyTypeError::new_err(
                        "can't send non-None value to a just-started coroutine",
                    ));
                }
                let waiter = self.core.get().publish_event(
                    py,
                    &event.into_bound(py),
                    key.map(|k| k.into_bound(py)),
                    correlation_id.map(|c| c.into_bound(py)),
                    None,
                )?;
                let Some(waiter) = waiter else {
                    return Ok(Outcome::Accepted);
                };
                // The queue is full: wait for room in `admit`.
                let it = self.admit(py, waiter)?;
                Self::drive(py, it, None, None)
            }
            State::Waiting(it) => Self::drive(py, it, value, thrown),
            State::Running => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "coroutine already executing",
                ));
            }
            State::Done => {
                return Err(thrown.unwrap_or_else(|| {
                    PyRuntimeError::new_err("cannot reuse already awaited coroutine")
                }));
            }
        };
        self.state.replace(py, next);
        outcome
    }

    /// `oxbus.backends.admit(core, waiter)`: waits for room, then enters the event.
    fn admit(&self, py: Python<'_>, waiter: Py<PyAny>) -> PyResult<Py<PyAny>> {
        let admit = ADMIT.import(py, "oxbus.backends", "admit")?;
        Ok(admit.call1((&self.core, waiter))?.unbind())
    }

    /// Steps the `admit` coroutine, as `yield from` would.
    fn drive(
        py: Python<'_>,
        it: Py<PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        thrown: Option<PyErr>,
    ) -> (PyResult<Outcome>, State) {
        let bound = it.bind(py);
        let res = match thrown {
            Some(e) => events::throw_into(bound, &e),
            None => events::send(bound, value),
        };
        match res {
            Ok(Step::Yielded(v)) => (Ok(Outcome::Yield(v.unbind())), State::Waiting(it)),
            Ok(Step::Returned(_)) => (Ok(Outcome::Accepted), State::Done),
            Err(e) => (Err(e), State::Done),
        }
    }

    /// The step as Python's iterator protocol wants it: the yielded value, or
    /// `StopIteration(True)` once accepted.
    fn next_value(
        &self,
        py: Python<'_>,
        value: Option<&Bound<'_, PyAny>>,
        thrown: Option<PyErr>,
    ) -> PyResult<Py<PyAny>> {
        match self.step(py, value, thrown)? {
            Outcome::Yield(v) => Ok(v),
            Outcome::Accepted => Err(PyStopIteration::new_err((true,))),
        }
    }
}

/// Warns as CPython does for a coroutine never awaited (never stepped, never closed).
fn warn_never_awaited(py: Python<'_>) {
    // An exception being raised meanwhile is kept aside, as CPython's own finalizer does.
    let pending = PyErr::take(py);
    let category = py.get_type::<PyRuntimeWarning>();
    if let Err(e) = PyErr::warn(
        py,
        &category,
        c"coroutine 'EventBus.publish' was never awaited",
        1,
    ) {
        e.write_unraisable(py, None);
    }
    if let Some(e) = pending {
        e.restore(py);
    }
}

impl Drop for PyPublish {
    fn drop(&mut self) {
        if !matches!(self.state.get_mut(), State::Fresh { .. }) {
            return;
        }
        Python::attach(warn_never_awaited);
    }
}

#[pymethods]
impl PyPublish {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.next_value(py, None, None)
    }

    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.next_value(py, Some(value), None)
    }

    #[pyo3(signature = (typ, val=None, _tb=None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.next_value(py, None, Some(events::thrown(typ, val)))
    }

    /// Ends it: never published if it had not run; a wait for room is abandoned (the event is
    /// then not accepted).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        match self.state.replace(py, State::Done) {
            State::Waiting(it) => {
                it.bind(py).call_method0(pyo3::intern!(py, "close"))?;
                Ok(())
            }
            State::Running => {
                self.state.replace(py, State::Running);
                Err(pyo3::exceptions::PyValueError::new_err(
                    "coroutine already executing",
                ))
            }
            State::Fresh { .. } | State::Done => Ok(()),
        }
    }

    #[allow(clippy::unused_self)]
    #[getter]
    fn __name__(&self) -> &'static str {
        "publish"
    }

    #[allow(clippy::unused_self)]
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "EventBus.publish"
    }

    #[allow(clippy::unused_self)]
    fn __repr__(&self) -> &'static str {
        "<oxbus publish awaitable (EventBus.publish)>"
    }
}

#[cfg(not(feature = "abi3"))]
/// The `am_send` slot: one step through `PyIter_Send`, the value without a `StopIteration`.
unsafe extern "C" fn am_send(
    slf: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: CPython calls the slot with the GIL held, `slf` an instance of this type (the
    // slot is installed on this type only and the class cannot be subclassed), `arg` a live
    // object and `result` a valid out pointer. PyO3 is not told the thread is attached (that
    // costs a recursive `PyGILState_Ensure`): a `Py` dropped in the step waits in PyO3's pool
    // of deferred decrefs, which the publish path avoids by holding `Bound`s.
    unsafe {
        let py = Python::assume_attached();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let this = Borrowed::from_ptr(py, slf).cast_unchecked::<PyPublish>();
            let arg = Borrowed::from_ptr(py, arg);
            let value = if arg.is_none() { None } else { Some(&*arg) };
            this.get().step(py, value, None)
        }));
        send_result(py, outcome, result)
    }
}

#[cfg(not(feature = "abi3"))]
/// Hands a step's outcome (or its panic) to `am_send`'s caller.
///
/// # Safety
/// `result` must be a valid out pointer.
unsafe fn send_result(
    py: Python<'_>,
    outcome: std::thread::Result<PyResult<Outcome>>,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let step = outcome.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic in Publish.send".to_owned());
        Err(pyo3::panic::PanicException::new_err(msg))
    });
    match step {
        Ok(Outcome::Yield(v)) => {
            // SAFETY: `result` is a valid out pointer; it receives a new reference.
            unsafe { *result = v.into_ptr() };
            ffi::PySendResult::PYGEN_NEXT
        }
        Ok(Outcome::Accepted) => {
            // SAFETY: as above; `True` is returned as a new reference.
            unsafe {
                let t = ffi::Py_True();
                ffi::Py_INCREF(t);
                *result = t;
            }
            ffi::PySendResult::PYGEN_RETURN
        }
        Err(e) => {
            e.restore(py);
            // SAFETY: as above; with an error set, the result is NULL.
            unsafe { *result = std::ptr::null_mut() };
            ffi::PySendResult::PYGEN_ERROR
        }
    }
}

/// `PyMethodDef` holds raw pointers (to static strings and a function): shareable.
struct MethodDef(ffi::PyMethodDef);
// SAFETY: it only points at `'static` data and is never written.
unsafe impl Sync for MethodDef {}

static PUBLISH_DEF: MethodDef = MethodDef(ffi::PyMethodDef {
    ml_name: c"publish".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunctionFastWithKeywords: publish_fast,
    },
    ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
    ml_doc: c"publish(event, key=None, correlation_id=None)\n--\n\nThe awaitable of one publish on an in-memory bus (see oxbus.EventBus.publish).".as_ptr(),
});

/// `await bus.publish(event)` on an in-memory bus: an awaitable that publishes when first
/// stepped (see `oxbus._oxbus.Publish`).
#[pyfunction]
#[pyo3(signature = (core, event, key=None, correlation_id=None))]
pub fn publishing(
    core: Py<PyBusCore>,
    event: Py<PyAny>,
    key: Option<Py<PyAny>>,
    correlation_id: Option<Py<PyAny>>,
) -> PyPublish {
    PyPublish::new(core, event, key, correlation_id)
}

/// `publishing` as a builtin bound to `core`, which `EventBus` installs as `bus.publish`:
/// called with `(event, key=None, correlation_id=None)`, it reads its arguments without
/// PyO3's general parser and returns a `Publish`.
#[pyfunction]
pub fn publisher(core: &Bound<'_, PyBusCore>) -> PyResult<Py<PyAny>> {
    let py = core.py();
    // SAFETY: a static method definition; the function object keeps `core` alive.
    let f = unsafe {
        ffi::PyCFunction_NewEx(
            std::ptr::addr_of!(PUBLISH_DEF.0).cast_mut(),
            core.as_ptr(),
            std::ptr::null_mut(),
        )
    };
    if f.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new, non-null reference.
    Ok(unsafe { Bound::from_owned_ptr(py, f) }.unbind())
}

/// The arguments of `publish`, read from a vectorcall without PyO3's general parser (which
/// cost more than making the awaitable): `event` by position, `key` and `correlation_id` by
/// position or keyword.
///
/// # Safety
/// `args` holds `nargs` positional then `len(kwnames)` keyword values, as CPython passes them.
unsafe fn publish_args(
    py: Python<'_>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<[Option<Py<PyAny>>; 3]> {
    let mut out: [Option<Py<PyAny>>; 3] = [None, None, None];
    let names = ["event", "key", "correlation_id"];
    let npos = usize::try_from(nargs).unwrap_or(0);
    if npos > 3 {
        return Err(PyTypeError::new_err(format!(
            "publish() takes from 1 to 3 positional arguments but {npos} were given"
        )));
    }
    let arg = |i: usize| {
        // SAFETY: per the caller, `args[i]` is a live object for `i < nargs + len(kwnames)`.
        unsafe { Borrowed::from_ptr(py, *args.add(i)) }
    };
    for (i, slot) in out.iter_mut().enumerate().take(npos) {
        *slot = Some(arg(i).to_owned().unbind());
    }
    if !kwnames.is_null() {
        // SAFETY: CPython passes a tuple of str.
        let kw = unsafe { Borrowed::from_ptr(py, kwnames).cast_unchecked::<PyTuple>() };
        for (j, name) in kw.iter().enumerate() {
            let name = name.cast::<PyString>()?.to_str()?.to_owned();
            let Some(i) = names.iter().position(|n| *n == name) else {
                return Err(PyTypeError::new_err(format!(
                    "publish() got an unexpected keyword argument '{name}'"
                )));
            };
            if out[i].is_some() {
                return Err(PyTypeError::new_err(format!(
                    "publish() got multiple values for argument '{name}'"
                )));
            }
            out[i] = Some(arg(npos + j).to_owned().unbind());
        }
    }
    if out[0].is_none() {
        return Err(PyTypeError::new_err(
            "publish() missing 1 required positional argument: 'event'",
        ));
    }
    Ok(out)
}

/// `publish(event, key=None, correlation_id=None)`: METH_FASTCALL | METH_KEYWORDS.
unsafe extern "C" fn publish_fast(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls it with the GIL held, `slf` the `BusCore` the function was made
    // with (`publisher`), and the arguments as `publish_args` requires.
    unsafe {
        let py = Python::assume_attached();
        let made = catch_unwind(AssertUnwindSafe(|| {
            let [event, key, correlation_id] = publish_args(py, args, nargs, kwnames)?;
            let event = event.expect("checked by publish_args");
            let none = |v: Option<Py<PyAny>>| v.filter(|v| !v.is_none(py));
            let core = Borrowed::from_ptr(py, slf).cast_unchecked::<PyBusCore>();
            let p = PyPublish::new(
                core.to_owned().unbind(),
                event,
                none(key),
                none(correlation_id),
            );
            Ok::<_, PyErr>(Py::new(py, p)?.into_ptr())
        }));
        match made {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => {
                e.restore(py);
                std::ptr::null_mut()
            }
            Err(_) => {
                pyo3::panic::PanicException::new_err("panic in publish").restore(py);
                std::ptr::null_mut()
            }
        }
    }
}

#[cfg(not(feature = "abi3"))]
/// The `am_await` slot (`__await__`): the object itself, without PyO3's method wrapper (its
/// thread-local bookkeeping cost more than the rest of `await`'s set-up).
unsafe extern "C" fn am_await(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: CPython passes a live instance with the GIL held; it receives a new reference.
    unsafe { ffi::Py_INCREF(slf) };
    slf
}

/// Sets `Publish`'s `am_send` and `am_await` slots (see the module documentation). The stable
/// ABI cannot reach them: there `await` goes through PyO3's `__await__` and `__next__`.
#[cfg_attr(feature = "abi3", allow(clippy::unnecessary_wraps))]
pub fn install_slots(py: Python<'_>) -> PyResult<()> {
    #[cfg(not(feature = "abi3"))]
    {
        use pyo3::type_object::PyTypeInfo;
        let ty = PyPublish::type_object(py);
        // SAFETY: a heap type made by PyO3 with `__await__`, so its `tp_as_async` points at
        // the type's own `PyAsyncMethods`; the slot is written once, at import, before any
        // instance exists.
        unsafe {
            let tp = ty.as_type_ptr();
            let am = (*tp).tp_as_async;
            if am.is_null() {
                return Err(PyRuntimeError::new_err("Publish has no async slots"));
            }
            (*am).am_send = Some(am_send);
            (*am).am_await = Some(am_await);
        }
    }
    #[cfg(feature = "abi3")]
    let _ = py;
    Ok(())
}
