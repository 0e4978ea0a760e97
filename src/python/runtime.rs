//! The one tokio runtime of the process, and every way a thread outside Python enters it.
//!
//! - `handle()` gives the runtime the pure-Rust transports run on (they take a
//!   `tokio::runtime::Handle`; nothing in `src/transport` builds a runtime of its own).
//! - `future_into_py` turns a one-off Rust future (connecting, stopping) into an asyncio
//!   awaitable, with pyo3-async-runtimes' generic bridge driven by this runtime.
//! - `attach` is how a background thread (a tokio worker, the SQLite writer) takes the GIL to
//!   hand results to a loop.
//!
//! Exit. A thread that holds the GIL when CPython starts finalizing is killed (`pthread_exit`)
//! the next time it asks for the GIL back; the unwinding runs PyO3's guard, which releases a
//! thread state that is no longer current, and CPython aborts ("Fatal Python error:
//! PyGILState_Release: thread state ... must be current when releasing ... finalizing"). It
//! happens whenever a background thread is in the middle of a hand-off at exit — a store
//! dropped without `close()`, a tokio-backed future resolved just before `asyncio.run`
//! returns. So an `atexit` hook (it runs before finalization, while every thread still works)
//! closes a gate: no thread enters Python through `attach` (or the bridge's own completions)
//! any more, the hook waits for those already inside to leave (with the GIL released), then
//! shuts the runtime down. `Python::try_attach` alone is not enough: it only refuses once
//! finalization has begun, not to a thread that entered just before.
//!
//! pyo3-async-runtimes' ready-made tokio module keeps its runtime in a static that can never be
//! shut down and resolves futures with a plain `Python::attach`, outside any gate; its generic
//! module, driven here by `Oxbus`, runs the same bridge on a runtime this module owns.

use std::cell::OnceCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3_async_runtimes::generic::{ContextExt, Runtime as GenericRuntime};
use pyo3_async_runtimes::TaskLocals;
use tokio::runtime::{Handle, Runtime};

use crate::python::errors;

/// How long the exit hook waits for threads inside Python, then for the runtime's tasks.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The runtime (taken out when it is shut down).
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
/// A handle on it, kept after the shutdown: a task spawned then is cancelled at once.
static HANDLE: OnceLock<Handle> = OnceLock::new();

/// Threads inside `attach`, and whether the gate is closed.
static GATE: Mutex<(usize, bool)> = Mutex::new((0, false));
static GATE_LEFT: Condvar = Condvar::new();

/// The shared runtime, started on first use. Fails once the interpreter is exiting.
pub fn handle() -> PyResult<Handle> {
    if GATE.lock().1 {
        return Err(exiting());
    }
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let mut rt = RUNTIME.lock();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("oxbus-tokio")
        .enable_all()
        .build()
        .map_err(|e| errors::oxbus_error(format!("cannot start the tokio runtime: {e}")))?;
    let h = runtime.handle().clone();
    *rt = Some(runtime);
    let _ = HANDLE.set(h.clone());
    Ok(h)
}

fn exiting() -> PyErr {
    errors::bus_closed("the interpreter is exiting: oxbus's runtime is shut down")
}

/// Runs `f` with the GIL from a thread Python did not start — unless the interpreter is
/// exiting (then `None`, and nothing of Python is touched).
pub fn attach<F, R>(f: F) -> Option<R>
where
    F: for<'py> FnOnce(Python<'py>) -> R,
{
    {
        let mut g = GATE.lock();
        if g.1 {
            return None;
        }
        g.0 += 1;
    }
    let _leave = Leave; // leaves the gate even if `f` unwinds
    Python::try_attach(f)
}

/// A thread inside `attach`; leaving wakes the exit hook when it is the last.
struct Leave;

impl Drop for Leave {
    fn drop(&mut self) {
        let mut g = GATE.lock();
        g.0 -= 1;
        if g.0 == 0 {
            GATE_LEFT.notify_all();
        }
    }
}

/// The exit hook (registered with `atexit` when the module loads): closes the gate, waits for
/// the threads inside Python to leave, then stops the runtime's threads. Idempotent.
#[pyfunction]
pub fn shutdown(py: Python<'_>) {
    py.detach(|| {
        let deadline = Instant::now() + EXIT_WAIT;
        {
            let mut g = GATE.lock();
            g.1 = true;
            while g.0 > 0 {
                if GATE_LEFT.wait_until(&mut g, deadline).timed_out() {
                    break;
                }
            }
        }
        let rt = RUNTIME.lock().take();
        if let Some(runtime) = rt {
            runtime.shutdown_timeout(EXIT_WAIT);
        }
    });
}

/// Registers `shutdown` with `atexit`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let hook = wrap_pyfunction!(shutdown, m)?;
    m.py().import("atexit")?.call_method1("register", (hook,))?;
    Ok(())
}

/// An asyncio awaitable of `fut`'s result, run on the shared runtime.
///
/// Costs one thread hop each way (~71 µs an await in DESIGN.md's prototype): for one-off
/// awaits; per-event paths resolve many loop futures per wake-up (`completion`).
pub fn future_into_py<F, T>(py: Python<'_>, fut: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    handle()?;
    pyo3_async_runtimes::generic::future_into_py::<Oxbus, F, T>(py, fut)
}

tokio::task_local! {
    static LOCALS: OnceCell<TaskLocals>;
}

/// The shared runtime, as pyo3-async-runtimes' generic bridge sees it.
pub struct Oxbus;

impl GenericRuntime for Oxbus {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = tokio::task::JoinHandle<()>;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Exiting, the task is cancelled at once (nothing awaits its awaitable any more).
        HANDLE.get().map_or_else(never_ran, |h| h.spawn(fut))
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        // The bridge resolves its asyncio future here with `Python::attach`: through the
        // gate, so it never runs while the interpreter exits.
        let gated = move || {
            let _ = attach(|_py| f());
        };
        HANDLE
            .get()
            .map_or_else(never_ran, |h| h.spawn_blocking(gated))
    }
}

/// Unreachable in practice (`future_into_py` starts the runtime before the bridge spawns):
/// the join handle of a task cancelled at once, on a runtime without threads.
fn never_ran() -> tokio::task::JoinHandle<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime starts no thread");
    rt.spawn(async {})
}

impl ContextExt for Oxbus {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        let cell = OnceCell::new();
        let _ = cell.set(locals);
        Box::pin(LOCALS.scope(cell, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        LOCALS.try_with(|c| c.get().cloned()).unwrap_or_default()
    }
}
