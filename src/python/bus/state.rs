//! The state of a `BusCore`: the engine with the glue's payloads (envelopes, loop futures,
//! handlers), and what only the glue knows: Python objects, the `wait_for` waiters, the route
//! cache. A leaf of `bus`: its other modules import it, it imports none of them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};
use rustc_hash::FxHashMap;

use crate::core::bus::{Engine, Settings};
use crate::core::health::Probe;
use crate::core::plan::Cache;
use crate::core::retry::RetryPolicy;
use crate::core::watch::Watches;
use crate::python::envelope::EnvData;
use crate::python::route::{Handler, Route};
use crate::python::sync::{GilCell, GilMutex};
use crate::store::writer::Writer;

/// An accepted event waiting for a worker.
pub type Queued = crate::core::bus::Queued<Arc<EnvData>>;

/// The engine of a bus, with the glue's payloads: envelopes, loop futures, handlers.
pub type BusEngine = Engine<Arc<EnvData>, Py<PyAny>, Handler>;

/// What the glue keeps with a `wait_for` call: its predicate and the future it resolves.
pub(super) struct Waiting {
    pub(super) predicate: Option<Py<PyAny>>,
    pub(super) fut: Py<PyAny>,
}

/// The bus's state: the engine, and what only the glue knows (Python objects).
pub struct Inner {
    /// Run state, admission, lanes, idle workers, drain waiters, parking, counters.
    pub engine: BusEngine,
    pub(super) routes: Cache<Route>,
    /// The `wait_for` calls.
    pub(super) waiters: Watches<Waiting>,
    /// The futures of publishers given room, by token (see `admit_blocked`).
    pub(super) held: FxHashMap<u64, Py<PyAny>>,
    pub loop_: Option<Py<PyAny>>,
    pub after_call: Option<Py<PyAny>>,
    /// The thread of the loop the bus runs on.
    pub loop_thread: Option<libc::pthread_t>,
    /// `clock.sleep(seconds)` and `clock.time()`; the loop's by default.
    pub sleep: Option<Py<PyAny>>,
    pub now: Option<Py<PyAny>>,
    /// `wrap(awaitable, timeout, threaded, name) -> awaitable`, for handler timeouts.
    pub wrap_timeout: Option<Py<PyAny>>,
    pub(super) probe: Option<Probe>,
}

/// The engine behind one `oxbus.EventBus`.
#[pyclass(frozen, name = "BusCore", module = "oxbus._oxbus")]
pub struct PyBusCore {
    pub inner: GilMutex<Inner>,
    /// The engine's validated settings, copied here to be read without the lock.
    pub settings: Settings,
    pub threaded_sync: bool,
    pub executor: Option<Py<PyAny>>,
    pub default_retry: RetryPolicy,
    /// `wait_for` waiters registered; read without the lock on every publish.
    pub(super) waiter_count: AtomicUsize,
    /// Whether the after-call hook runs after successful calls too (`event_storage`).
    pub(super) hook_on_success: AtomicBool,
    /// A durable bus's log: workers record finished deliveries on it directly.
    pub(super) progress: std::sync::OnceLock<Arc<Writer>>,
    /// The route found last by class alone, read without the engine's lock: emptied under
    /// the GIL by every change of the subscriptions, so it is never stale once that change
    /// returns.
    pub(super) last_route: GilCell<Option<(usize, Arc<Route>)>>,
}

impl Inner {
    /// Visits the Python objects held here for the garbage collector (`BusCore.__traverse__`):
    /// the loop, hooks, held and waiting futures, and the handlers. Queued events and cached
    /// routes are not visited: they can only delay a collection, never free anything early.
    pub(super) fn traverse(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for hook in [
            &self.loop_,
            &self.after_call,
            &self.sleep,
            &self.now,
            &self.wrap_timeout,
        ] {
            visit.call(hook)?;
        }
        for fut in self.held.values() {
            visit.call(fut)?;
        }
        for w in self.waiters.iter() {
            visit.call(&w.payload.predicate)?;
            visit.call(&w.payload.fut)?;
        }
        for sub in self.engine.router.iter() {
            let h = &sub.payload;
            visit.call(&h.callable)?;
            visit.call(&h.target)?;
            visit.call(&h.retry_on)?;
        }
        Ok(())
    }

    /// The state of a bus not started yet.
    fn new(settings: Settings) -> Self {
        Self {
            engine: Engine::new(settings),
            routes: Cache::default(),
            waiters: Watches::default(),
            held: FxHashMap::default(),
            loop_: None,
            after_call: None,
            loop_thread: None,
            sleep: None,
            now: None,
            wrap_timeout: None,
            probe: None,
        }
    }
}

impl PyBusCore {
    /// Runs `op` on the engine with the token of the publisher waiting on `fut` (`enter`,
    /// `withdraw`), and drops what `held` kept for it once the lock is released (a Python
    /// object: its finalizer must not run under the lock).
    pub(super) fn settle_held<T>(
        &self,
        py: Python<'_>,
        fut: &Bound<'_, PyAny>,
        op: impl FnOnce(&mut BusEngine, u64) -> T,
    ) -> T {
        let token = fut.as_ptr() as u64;
        let (out, held) = {
            let mut inner = self.inner.lock(py);
            let held = inner.held.remove(&token);
            (op(&mut inner.engine, token), held)
        };
        drop(held);
        out
    }

    /// A bus not started yet, on validated settings.
    pub(super) fn with_settings(
        settings: Settings,
        threaded_sync: bool,
        executor: Option<Py<PyAny>>,
        default_retry: RetryPolicy,
    ) -> Self {
        Self {
            inner: GilMutex::new(Inner::new(settings)),
            settings,
            threaded_sync,
            executor,
            default_retry,
            waiter_count: AtomicUsize::new(0),
            hook_on_success: AtomicBool::new(false),
            progress: std::sync::OnceLock::new(),
            last_route: GilCell::new(None),
        }
    }

    /// Whether the after-call hook also runs after successful calls.
    pub fn hook_on_success(&self) -> bool {
        self.hook_on_success.load(Relaxed)
    }

    /// After every change of the subscriptions, with the GIL held since (and the engine's
    /// lock released): the lock-free route cache is emptied.
    pub(super) fn routes_changed(&self, py: Python<'_>) {
        drop(self.last_route.replace(py, None));
    }

    /// The durable log finished deliveries are recorded on, if any.
    pub fn progress(&self) -> Option<&Arc<Writer>> {
        self.progress.get()
    }
}
