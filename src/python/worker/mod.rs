//! A worker: a hand-written coroutine that an asyncio task drives, and that drives handlers.
//!
//! `__next__` / `send` / `throw` implement `yield from` in Rust: the worker takes an event from
//! the lanes, calls each handler in priority order, and steps a handler's coroutine with
//! `PyIter_Send`. A handler that finishes without suspending costs one call and one send, with
//! no task, no future and no thread crossing. A handler that suspends makes the worker yield the
//! handler's future to the asyncio task, so `asyncio.current_task()`, timeouts and cancellation
//! behave as in any task. An idle worker yields its own loop future, resolved by the next
//! publish (one wake-up per batch, not per event). After `BUDGET` events in one step the worker
//! yields once so the loop stays responsive under a long backlog.

use quanta::Instant;
use std::sync::Arc;

use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::{PyTraverseError, PyVisit};

use crate::core::dispatch::{Delivery, Next};
use crate::python::bus::{Inner, PyBusCore};
use crate::python::envelope::{self, Borrowed};
use crate::python::events::{self, Step};
use crate::python::futures::resolve_all;
use crate::python::sync::GilMutex;

mod outcome;

/// Events one worker handles before it yields to the loop once.
const BUDGET: u32 = 1024;

static SLEEP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static COPY_CONTEXT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CANCELLED: PyOnceLock<Py<pyo3::types::PyType>> = PyOnceLock::new();
static CURRENT_TASK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A handler's coroutine (or executor future).
    Handler,
    /// The after-call hook's awaitable (`event_storage.mark_event_processed`).
    Hook,
    /// The sleep before a retry.
    Backoff,
    /// The wait while a subscription's circuit breaker is open.
    Pause,
}

struct Current {
    /// Owned by the capsule in `State::slot` (see `envelope::Borrowed`).
    env: Borrowed,
    lane: Option<u64>,
    /// Which subscription, which attempt, whether a retry was decided.
    delivery: Delivery,
    /// When the running call started (every call is timed; see `call_next`).
    started: Option<Instant>,
}

#[derive(Default)]
struct State {
    cur: Option<Current>,
    awaiting: Option<(Py<PyAny>, Kind)>,
    /// Yielded a handler's future: not dispatching, so not counted as active.
    suspended: bool,
    /// The task was cancelled (a `CancelledError` was thrown in and not taken back: see
    /// `task_still_cancelling`).
    cancelled: bool,
    /// Bookkeeping not yet written to the bus, flushed under the next lock this worker takes
    /// anyway (one lock per event instead of three).
    pending: Pending,
    /// The end of the previous call, reused as the start of the next one when nothing but
    /// the worker's own bookkeeping ran in between (no suspension, no hook, no idle wait).
    clock: Option<Instant>,
    /// The capsule this worker last put in the envelope's context variable (see
    /// `envelope::set_current`).
    slot: Option<envelope::Slot>,
}

#[derive(Default)]
struct Pending {
    /// Successful handler calls, with their duration (ns).
    calls: Vec<u64>,
    /// A finished event.
    finished: Option<Finished>,
}

/// An event whose every subscription is done: its lane is released at the next flush.
struct Finished {
    lane: Option<u64>,
}

impl Pending {
    fn flush(&mut self, inner: &mut Inner) {
        for ns in self.calls.drain(..) {
            inner.engine.record_call(ns, true);
        }
        if let Some(Finished { lane }) = self.finished.take() {
            inner.engine.finish(lane);
        }
    }
}

/// One dispatch loop; `EventBus.start()` runs `workers` of them as asyncio tasks.
#[pyclass(frozen, name = "Worker", module = "oxbus._oxbus")]
pub struct PyWorker {
    core: Py<PyBusCore>,
    index: usize,
    st: GilMutex<State>,
    /// The context its task runs in, when the bus created the task with one (Python 3.11+):
    /// the envelope's context variable is then checked without copying the context.
    context: Option<Py<PyAny>>,
}

fn is_cancelled_error(py: Python<'_>, e: &PyErr) -> bool {
    CANCELLED
        .import(py, "asyncio", "CancelledError")
        .is_ok_and(|c| e.is_instance(py, c.as_any()))
}

/// Whether the task running the worker is still being cancelled after a `CancelledError` was
/// thrown into a handler. `asyncio.timeout()` (and `asyncio.wait_for`, built on it since Python
/// 3.12) cancels the *current* task, which is the worker's, and takes the request back with
/// `Task.uncancel()` when it turns the `CancelledError` into `TimeoutError`; only a request
/// still pending is the worker's own cancellation (`stop()`). Python 3.10 has no
/// `Task.cancelling()` (nor anything that uncancels): there a thrown `CancelledError` is always
/// the task's own, as it is for a task without the method.
fn task_still_cancelling(py: Python<'_>) -> bool {
    let Ok(task) = CURRENT_TASK
        .import(py, "asyncio", "current_task")
        .and_then(PyAnyMethods::call0)
    else {
        return true;
    };
    match task.call_method0(intern!(py, "cancelling")) {
        Ok(n) => n.extract::<usize>().map_or(true, |n| n > 0),
        Err(_) => true,
    }
}

impl PyWorker {
    fn core(&self) -> &PyBusCore {
        self.core.get()
    }

    /// Runs until something must be awaited; returns what to yield to the task.
    fn step(&self, py: Python<'_>, mut incoming: Option<PyErr>) -> PyResult<Py<PyAny>> {
        let mut st = self.st.lock(py);
        if st.suspended {
            st.suspended = false;
            self.core().inner.lock(py).engine.resume();
        }
        let mut handled = 0u32;
        loop {
            if let Some((it, kind)) = st.awaiting.take() {
                let thrown = incoming.take();
                let cancel_thrown = thrown.as_ref().is_some_and(|e| is_cancelled_error(py, e));
                let bound = it.bind(py);
                let res = match &thrown {
                    Some(e) => events::throw_into(bound, e),
                    None => events::send_none(bound),
                };
                if cancel_thrown && !st.cancelled {
                    // Judged after the handler has seen it: see `task_still_cancelling`.
                    st.cancelled = task_still_cancelling(py);
                }
                match res {
                    Ok(Step::Yielded(v)) => {
                        st.awaiting = Some((it, kind));
                        self.suspend(py, &mut st);
                        return Ok(v.unbind());
                    }
                    Ok(Step::Returned(value)) => {
                        // A thread-pool handler may hand back an awaitable: run it too.
                        if kind == Kind::Handler && !value.is_none() {
                            if let Some(it) = events::awaitable_iter(&value)? {
                                st.awaiting = Some((it.unbind(), Kind::Handler));
                                continue;
                            }
                        }
                        self.after_await(py, &mut st, kind, None)?;
                    }
                    Err(e) => self.after_await(py, &mut st, kind, Some(e))?,
                }
                continue;
            }
            if let Some(e) = incoming.take() {
                return Err(e);
            }
            if st.cancelled {
                // Cancelled while a handler ran and the handler swallowed it: finish as asked.
                return Err(pyo3::exceptions::asyncio::CancelledError::new_err(
                    "worker cancelled",
                ));
            }
            if st.cur.is_none() {
                if handled >= BUDGET {
                    st.clock = None;
                    st.pending.flush(&mut self.core().inner.lock(py));
                    return Ok(py.None());
                }
                match self.take(py, &mut st)? {
                    Some(idle_future) => return Ok(idle_future),
                    None => handled += 1,
                }
            }
            self.call_next(py, &mut st)?;
        }
    }

    /// Takes the next event into `st.cur`; when there is none, returns the idle future to yield.
    fn take(&self, py: Python<'_>, st: &mut State) -> PyResult<Option<Py<PyAny>>> {
        let core = self.core();
        let mut inner = core.inner.lock(py);
        st.pending.flush(&mut inner);
        if let Some((item, lane)) = inner.engine.take() {
            if let Some(next) = inner.engine.peek() {
                envelope::prefetch(&next.item); // read after this event's handler (core::cache)
            }
            let blocked = inner.engine.blocked_publishers() > 0;
            drop(inner);
            if blocked {
                // Only when publishers wait: the common case takes the lock once per event.
                let admitted = core.admit_blocked(py);
                core.admitted(py, admitted);
            }
            let ctx = self.context.as_ref().map(|c| c.bind(py));
            let delivery = Delivery::new(item.item.route().subs.len());
            st.cur = Some(Current {
                delivery,
                env: envelope::set_current(py, item.item, &mut st.slot, ctx)?,
                lane,
                started: None,
            });
            return Ok(None);
        }
        let loop_ = inner.loop_.as_ref().map(|l| l.clone_ref(py));
        drop(inner);
        let Some(loop_) = loop_ else {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "worker started before the bus",
            ));
        };
        // Creating a future runs no user code, so nothing can be queued between the empty
        // `take` above and registering as idle below.
        let fut = loop_.bind(py).call_method0(intern!(py, "create_future"))?;
        fut.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
        let mut inner = core.inner.lock(py);
        st.clock = None;
        let drains = inner.engine.go_idle(fut.clone().unbind());
        drop(inner);
        resolve_all(py, drains);
        Ok(Some(fut.unbind()))
    }

    /// Yielding a handler's future: this worker stops dispatching; wake another if work waits.
    /// Its event's key is held from now on: others take while it waits (`core::lanes`).
    fn suspend(&self, py: Python<'_>, st: &mut State) {
        st.suspended = true;
        st.clock = None;
        let mut inner = self.core().inner.lock(py);
        st.pending.flush(&mut inner);
        if let Some(cur) = &st.cur {
            inner.engine.hold(cur.lane);
        }
        let wake = inner.engine.suspend();
        drop(inner);
        self.core().wake(py, wake);
    }

    /// Calls the next subscription of the current event, or finishes the event.
    fn call_next(&self, py: Python<'_>, st: &mut State) -> PyResult<()> {
        let cur = st.cur.as_mut().expect("an event is current");
        let Next::Call { sub: idx, attempt } = cur.delivery.next() else {
            Self::finish_event(st);
            return Ok(());
        };
        let special = {
            let sub = &cur.env.route().subs[idx];
            sub.payload.park || sub.payload.breaker.as_ref().is_some_and(|b| !b.is_closed())
        };
        if special {
            // Parking and an open breaker: rare, with their own lookups.
            let env = Arc::clone(&cur.env);
            let sub = &env.route().subs[idx];
            env.set_call(idx, attempt);
            if sub.payload.park {
                if let Some(h) = Self::key_hash(py, cur)? {
                    if self.core().inner.lock(py).engine.is_parked(sub.id, h) {
                        return self.park(py, st, h);
                    }
                }
            }
            if let Some(b) = sub.payload.breaker.as_ref().filter(|b| !b.is_closed()) {
                if let Some(wait) = b.wait(self.now(py)?) {
                    // Open: wait out the cool-down, then try once (half-open).
                    let it = self.sleep(py, wait)?;
                    st.awaiting = Some((it.unbind(), Kind::Pause));
                    return Ok(());
                }
            }
        }
        // Borrowed, not cloned: the common path of an event takes no reference count.
        let State {
            cur,
            clock,
            awaiting,
            ..
        } = st;
        let cur = cur.as_mut().expect("an event is current");
        let env = &*cur.env;
        let sub = &env.route().subs[idx];
        env.set_call(idx, attempt);
        let event = env.event_ref().bind(py);
        // Every call is timed, so the histogram's count is the number of calls (issue 14).
        // `quanta::Instant::now` reads the TSC (10-17 ns here), and a call that follows
        // another without a suspension starts at the previous call's end: one read per call.
        // Cost against the former 1-in-8 sampling, release builds, same run, CPU time per
        // event (bench_inmemory's oxbus cases, 6 alternating rounds, medians): about 20 ns
        // per call, -5.5% events/s geometric mean, -11% worst (sync handler x4, 1 worker:
        // trivial handlers, where the clock is the largest part of a call).
        cur.started = Some(clock.take().unwrap_or_else(Instant::now));
        let wrap = match sub.payload.timeout {
            Some(t) => self
                .core()
                .inner
                .lock(py)
                .wrap_timeout
                .as_ref()
                .map(|w| (w.clone_ref(py), t)),
            None => None,
        };
        let mut result = match (&wrap, sub.payload.threaded) {
            (Some((w, t)), true) => {
                w.bind(py)
                    .call1((&sub.payload.callable, event, *t, true, &*sub.name))
            }
            (None, true) => self.in_executor(py, &sub.payload.callable, event),
            (_, false) => sub.payload.callable.bind(py).call1((event,)),
        };
        if let (Some((w, t)), false, Ok(r)) = (&wrap, sub.payload.threaded, &result) {
            // A sync handler on the loop cannot be interrupted; an awaitable gets the timeout.
            if !r.is_none() && r.hasattr(intern!(py, "__await__"))? {
                result = w.bind(py).call1((r, py.None(), *t, false, &*sub.name));
            }
        }
        match result.and_then(|r| events::awaitable_iter(&r)) {
            Ok(Some(it)) => {
                *awaiting = Some((it.unbind(), Kind::Handler));
                Ok(())
            }
            Ok(None) => self.call_done(py, st, None),
            Err(e) => self.call_done(py, st, Some(e)),
        }
    }

    fn in_executor<'py>(
        &self,
        py: Python<'py>,
        f: &Py<PyAny>,
        event: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let core = self.core();
        let loop_ = core.inner.lock(py).loop_.as_ref().map(|l| l.clone_ref(py));
        let loop_ = loop_.ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("no loop"))?;
        let executor = core
            .executor
            .as_ref()
            .map_or_else(|| py.None(), |e| e.clone_ref(py));
        // The thread runs the handler in a copy of this context, so it sees its envelope.
        let copy = COPY_CONTEXT.get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("contextvars")?.getattr("copy_context")?.unbind())
        })?;
        let run = copy.bind(py).call0()?.getattr(intern!(py, "run"))?;
        loop_.bind(py).call_method1(
            intern!(py, "run_in_executor"),
            (executor, run, f.bind(py), event),
        )
    }

    fn after_await(
        &self,
        py: Python<'_>,
        st: &mut State,
        kind: Kind,
        err: Option<PyErr>,
    ) -> PyResult<()> {
        match kind {
            Kind::Handler => self.call_done(py, st, err),
            Kind::Hook => {
                if let Some(e) = err {
                    if !e.is_instance_of::<PyException>(py) {
                        return Err(e);
                    }
                    e.write_unraisable(py, None);
                }
                self.advance(py, st)
            }
            Kind::Backoff | Kind::Pause => {
                if kind == Kind::Backoff {
                    self.core().inner.lock(py).engine.backoff_ended();
                }
                match err {
                    Some(e) => Err(e),
                    None => self.call_next(py, st),
                }
            }
        }
    }

    /// `clock.sleep(seconds)` as an iterator to drive (the loop's `asyncio.sleep` by default).
    fn sleep<'py>(&self, py: Python<'py>, seconds: f64) -> PyResult<Bound<'py, PyAny>> {
        let custom = self
            .core()
            .inner
            .lock(py)
            .sleep
            .as_ref()
            .map(|s| s.clone_ref(py));
        let aw = match custom {
            Some(s) => s.bind(py).call1((seconds,))?,
            None => SLEEP
                .get_or_try_init(py, || {
                    Ok::<_, PyErr>(py.import("asyncio")?.getattr("sleep")?.unbind())
                })?
                .bind(py)
                .call1((seconds,))?,
        };
        events::awaitable_iter(&aw)?.ok_or_else(|| {
            pyo3::exceptions::PyTypeError::new_err("clock.sleep() must return an awaitable")
        })
    }

    /// `clock.time()` (the loop's time by default).
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        let (custom, loop_) = {
            let inner = self.core().inner.lock(py);
            (
                inner.now.as_ref().map(|n| n.clone_ref(py)),
                inner.loop_.as_ref().map(|l| l.clone_ref(py)),
            )
        };
        match (custom, loop_) {
            (Some(n), _) => n.bind(py).call0()?.extract(),
            (None, Some(l)) => l.bind(py).call_method0(intern!(py, "time"))?.extract(),
            (None, None) => Ok(0.0),
        }
    }
}

#[pymethods]
impl PyWorker {
    /// What the garbage collector follows from a worker (its task holds it): its bus core,
    /// its context and the awaitable it waits on. So a bus left running when its loop ended
    /// (task -> worker -> core -> a handler -> the bus -> its tasks) is collected too. The
    /// envelope of the event in hand is not followed: it only delays a collection.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.core)?;
        visit.call(&self.context)?;
        // SAFETY: the collector runs with the GIL held; only `visit` runs meanwhile.
        if let Some(st) = unsafe { self.st.peek() } {
            visit.call(st.awaiting.as_ref().map(|(a, _)| a))?;
        }
        Ok(())
    }

    /// Worker `index` of `core`, to run as an asyncio task.
    #[new]
    #[pyo3(signature = (core, index, context=None))]
    fn new(core: Py<PyBusCore>, index: usize, context: Option<Py<PyAny>>) -> Self {
        Self {
            core,
            index,
            st: GilMutex::new(State::default()),
            context,
        }
    }

    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.step(py, None)
    }

    fn send(&self, py: Python<'_>, _value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.step(py, None)
    }

    #[pyo3(signature = (typ, val=None, _tb=None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.step(py, Some(events::thrown(typ, val)))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = self.st.lock(py);
        if let Some((it, _)) = st.awaiting.take() {
            if let Ok(close) = it.bind(py).getattr(intern!(py, "close")) {
                close.call0()?;
            }
        }
        Ok(())
    }

    /// The worker's index (0-based).
    #[getter]
    fn index(&self) -> usize {
        self.index
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let running = self.core().inner.lock(py).engine.is_running();
        format!(
            "<oxbus Worker {} ({})>",
            self.index,
            if running { "running" } else { "stopped" }
        )
    }
}
