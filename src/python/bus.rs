//! `BusCore`: the engine's queue, router and counters, driven from the asyncio thread.
//!
//! Everything here runs on the event loop's thread with the GIL held; the lock around `Inner`
//! is never held while Python code runs (a handler may publish, which takes it again).
//! `publish` pushes synchronously and returns `None` while there is room: no future, no thread
//! crossing. Only a full queue hands back a loop future, resolved in FIFO order as room frees.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict, PyIterator, PyList, PyTuple};
use rustc_hash::FxHashMap;

use crate::core::health::{self, Probe, Readings, Thresholds};
use crate::core::lanes::Lanes;
use crate::core::retry::RetryPolicy;
use crate::core::routing::{Matcher, Router, Subscription};
use crate::core::stats::{bump, Stats, TypeCounters};
use crate::core::CoreError;
use crate::python::envelope::{self, EnvData, Origin};
use crate::python::errors;
use crate::python::events;
use crate::python::store::PyStoreCore;
use crate::python::sync::GilMutex;
use crate::python::worker::PyWorker;
use crate::store::writer::Writer;

/// A retry policy (see `oxbus.RetryPolicy`).
#[pyclass(frozen, name = "RetryPolicy", module = "oxbus._oxbus")]
pub struct PyRetryPolicy {
    pub policy: RetryPolicy,
    /// The exception classes worth a retry, as a tuple.
    pub retry_on: Py<PyTuple>,
}

#[pymethods]
impl PyRetryPolicy {
    #[new]
    #[pyo3(signature = (max_attempts=1, base_delay=0.1, max_delay=30.0, multiplier=2.0, jitter=0.1, retry_on=None))]
    fn new(
        py: Python<'_>,
        max_attempts: i64,
        base_delay: f64,
        max_delay: f64,
        multiplier: f64,
        jitter: f64,
        retry_on: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let policy = RetryPolicy::new(max_attempts, base_delay, max_delay, multiplier, jitter)
            .map_err(|e| errors::to_py(&e))?;
        let exc = py.get_type::<pyo3::exceptions::PyException>();
        let retry_on = match retry_on {
            None => PyTuple::new(py, [exc])?,
            Some(t) => {
                let items: Vec<Bound<'_, PyAny>> = match t.cast::<PyTuple>() {
                    Ok(tup) => tup.iter().collect(),
                    Err(_) => vec![t.clone()],
                };
                let base = py.get_type::<pyo3::exceptions::PyBaseException>();
                for it in &items {
                    let ok = it
                        .cast::<pyo3::types::PyType>()
                        .is_ok_and(|ty| ty.is_subclass(&base).unwrap_or(false));
                    if !ok {
                        return Err(setting(
                            "retry_on",
                            "an exception class or a tuple of them",
                            &it.repr()?,
                        ));
                    }
                }
                PyTuple::new(py, items)?
            }
        };
        Ok(Self {
            policy,
            retry_on: retry_on.unbind(),
        })
    }

    /// The exception classes worth a retry.
    #[getter]
    fn retry_on(&self, py: Python<'_>) -> Py<PyTuple> {
        self.retry_on.clone_ref(py)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<Self>() {
            Ok(o) => Ok(o.get().policy == self.policy
                && o.get().retry_on.bind(py).eq(self.retry_on.bind(py))?),
            Err(_) => Ok(false),
        }
    }

    #[getter]
    fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }
    #[getter]
    fn base_delay(&self) -> f64 {
        self.policy.base_delay
    }
    #[getter]
    fn max_delay(&self) -> f64 {
        self.policy.max_delay
    }
    #[getter]
    fn multiplier(&self) -> f64 {
        self.policy.multiplier
    }
    #[getter]
    fn jitter(&self) -> f64 {
        self.policy.jitter
    }

    /// Seconds before retry `n` (1-based), jitter included.
    fn delay(&self, n: u32) -> f64 {
        self.policy.delay(n, fastrand::f64())
    }

    fn __repr__(&self) -> String {
        let p = &self.policy;
        format!(
            "RetryPolicy(max_attempts={}, base_delay={}, max_delay={}, multiplier={}, jitter={}, retry_on={})",
            p.max_attempts, p.base_delay, p.max_delay, p.multiplier, p.jitter,
            Python::attach(|py| self.retry_on.bind(py).repr().map(|r| r.to_string()).unwrap_or_default())
        )
    }
}

/// What a subscription runs.
pub struct Handler {
    pub callable: Py<PyAny>,
    /// The target as subscribed (keeps a class alive while its id is in the router).
    pub target: Py<PyAny>,
    /// Run a sync handler in the executor instead of on the loop.
    pub threaded: bool,
    pub retry: RetryPolicy,
    /// Exception classes worth a retry (a tuple); others go to the dead letters at once.
    pub retry_on: Option<Py<PyAny>>,
    /// Seconds a call may take (async and thread-pool handlers).
    pub timeout: Option<f64>,
    /// Pause after consecutive failures.
    pub breaker: Option<Breaker>,
    /// After a dead letter of key K, later events of K park behind it.
    pub park: bool,
}

/// A circuit breaker's settings and state.
pub struct Breaker {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// Seconds it stays open.
    pub cool_down: f64,
    /// Failures in a row so far.
    pub consecutive: std::sync::atomic::AtomicU32,
    /// Clock time until which calls wait (0 = closed).
    pub open_until: Mutex<f64>,
}

pub type Sub = Subscription<Handler>;

/// Subscription names, shared.
pub type Names = Arc<[Arc<str>]>;

/// The subscriptions one kind of event reaches, resolved once and cached.
pub struct Route {
    class: Py<PyAny>,
    pub subs: Vec<Arc<Sub>>,
    /// On a durable bus: the type key and the subscriptions this route leaves out, whose
    /// progress moves past an event of it (`Writer::skip`).
    pub skip: Option<(Arc<str>, Names)>,
    pub type_key: String,
    pub mro: Vec<usize>,
    pub class_has_key: bool,
    pub counters: Arc<TypeCounters>,
}

/// An accepted event waiting for a worker.
pub struct Queued {
    pub env: Arc<EnvData>,
    /// `health::coarse_now_ns()` at publish.
    pub enqueued: u64,
}

struct Blocked {
    item: Queued,
    lane: Option<u64>,
    fut: Py<PyAny>,
    /// Pushed at admission (a transport's delivery, a replay: nobody awaits `fut`), instead
    /// of by the publisher when it resumes.
    direct: bool,
}

/// A publisher given room, whose event waits for it to resume (`PyBusCore::enter`): one
/// cancelled in between has not published, and its room goes to the next.
struct Admitted {
    item: Queued,
    lane: Option<u64>,
    /// Keeps the future alive while its address is the key.
    fut: Py<PyAny>,
}

struct Waiter {
    id: u64,
    matcher: Matcher,
    predicate: Option<Py<PyAny>>,
    fut: Py<PyAny>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RunState {
    Created,
    Running,
    /// `stop()` is draining: outside publishes are refused, handlers still run.
    Closing,
    Closed,
}

pub struct Inner {
    pub state: RunState,
    pub router: Router<Handler>,
    routes: FxHashMap<(usize, Option<String>), Arc<Route>>,
    routes_gen: u64,
    pub lanes: Lanes<Queued>,
    blocked: VecDeque<Blocked>,
    /// Publishers given room, by their future's address.
    admitted: FxHashMap<usize, Admitted>,
    pub idle: Vec<Py<PyAny>>,
    pub active: usize,
    pub in_flight: usize,
    drain_waiters: Vec<Py<PyAny>>,
    waiters: Vec<Waiter>,
    next_waiter: u64,
    pub stats: Stats,
    pub loop_: Option<Py<PyAny>>,
    pub after_call: Option<Py<PyAny>>,
    pub dead_letters: u64,
    /// (event, subscription) pairs sleeping before a retry.
    pub retrying: usize,
    /// The thread of the loop the bus runs on.
    pub loop_thread: Option<std::thread::ThreadId>,
    /// (subscription id, key hash) pairs parked behind a dead letter.
    pub parked: rustc_hash::FxHashSet<(u64, u64)>,
    /// `clock.sleep(seconds)` and `clock.time()`; the loop's by default.
    pub sleep: Option<Py<PyAny>>,
    pub now: Option<Py<PyAny>>,
    /// `wrap(awaitable, timeout, threaded, name) -> awaitable`, for handler timeouts.
    pub wrap_timeout: Option<Py<PyAny>>,
    probe: Option<Probe>,
}

impl Inner {
    /// Pops an idle worker to wake when nobody is dispatching and work is ready, counting it
    /// active. Runs no Python: the caller hands the future to `PyBusCore::wake` after unlocking,
    /// which skips the futures of cancelled workers.
    pub fn wake_if_needed(&mut self) -> Option<Py<PyAny>> {
        if self.active > 0 || !self.lanes.has_ready() {
            return None;
        }
        let f = self.idle.pop()?;
        self.active += 1;
        Some(f)
    }

    /// Takes as many blocked publishers as there is room for, oldest first. Runs no Python:
    /// `PyBusCore::admit_blocked` checks, unlocked, which of them are still waiting.
    fn take_blocked(&mut self) -> Vec<Blocked> {
        let room = self.lanes.room().min(self.blocked.len());
        self.blocked.drain(..room).collect()
    }

    /// Whether every accepted event has been handled.
    pub fn is_drained(&self) -> bool {
        self.in_flight == 0
            && self.lanes.is_empty()
            && self.blocked.is_empty()
            && self.admitted.is_empty()
    }

    /// The drain waiters to resolve, when drained.
    pub fn take_drain_waiters(&mut self) -> Vec<Py<PyAny>> {
        if self.is_drained() {
            std::mem::take(&mut self.drain_waiters)
        } else {
            Vec::new()
        }
    }
}

/// Whether a loop future is done (an error counts as done: it will never be resolved).
fn is_done(py: Python<'_>, fut: &Py<PyAny>) -> bool {
    fut.bind(py)
        .call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

/// Resolves a loop future with `value` unless it is done (cancelled by a timeout, say).
pub fn resolve(py: Python<'_>, fut: &Py<PyAny>, value: &Bound<'_, PyAny>) {
    let f = fut.bind(py);
    if matches!(
        f.call_method0(intern!(py, "done"))
            .and_then(|d| d.is_truthy()),
        Ok(false)
    ) {
        if let Err(e) = f.call_method1(intern!(py, "set_result"), (value,)) {
            e.write_unraisable(py, Some(f));
        }
    }
}

fn fail(py: Python<'_>, fut: &Py<PyAny>, err: &PyErr) {
    let f = fut.bind(py);
    if matches!(
        f.call_method0(intern!(py, "done"))
            .and_then(|d| d.is_truthy()),
        Ok(false)
    ) {
        if let Err(e) = f.call_method1(intern!(py, "set_exception"), (err.value(py),)) {
            e.write_unraisable(py, Some(f));
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

/// The engine behind one `oxbus.EventBus`.
#[pyclass(frozen, name = "BusCore", module = "oxbus._oxbus")]
pub struct PyBusCore {
    pub inner: GilMutex<Inner>,
    pub workers: usize,
    pub keyed: bool,
    pub threaded_sync: bool,
    pub executor: Option<Py<PyAny>>,
    pub default_retry: RetryPolicy,
    pub thresholds: Thresholds,
    /// `wait_for` waiters registered; read without the lock on every publish.
    waiter_count: AtomicUsize,
    /// Whether the after-call hook runs after successful calls too (`event_storage`).
    hook_on_success: AtomicBool,
    /// A durable bus's log: workers record finished deliveries on it directly.
    progress: std::sync::OnceLock<Arc<Writer>>,
}

impl PyBusCore {
    /// Whether the after-call hook also runs after successful calls.
    pub fn hook_on_success(&self) -> bool {
        self.hook_on_success.load(Relaxed)
    }

    /// The durable log finished deliveries are recorded on, if any.
    pub fn progress(&self) -> Option<&Arc<Writer>> {
        self.progress.get()
    }

    /// The cached route of an event (resolved on first sight of its class, or of its class and
    /// type key when string subscriptions exist or the event is a dict).
    fn route(&self, event: &Bound<'_, PyAny>) -> PyResult<Arc<Route>> {
        let py = event.py();
        let ty = event.get_type();
        let ty_id = ty.as_ptr() as usize;
        let is_dict = event.cast::<PyDict>().is_ok();
        // The common case in one lock: no string subscriptions, not a dict, class cached.
        let by_key = {
            let inner = self.inner.lock(py);
            let by_key = inner.router.needs_type_key();
            if !by_key && !is_dict && inner.routes_gen == inner.router.generation() {
                if let Some(r) = inner.routes.get(&(ty_id, None)) {
                    return Ok(Arc::clone(r));
                }
            }
            by_key
        };
        let type_key = if by_key || is_dict {
            Some(events::type_key(event)?)
        } else {
            None
        };
        let cache_key = (ty_id, type_key);
        if cache_key.1.is_some() {
            let inner = self.inner.lock(py);
            if inner.routes_gen == inner.router.generation() {
                if let Some(r) = inner.routes.get(&cache_key) {
                    return Ok(Arc::clone(r));
                }
            }
        }
        // Miss: read the class outside the lock (Python code may run), then resolve under it.
        let key_name = match &cache_key.1 {
            Some(k) => k.clone(),
            None => events::type_key(event)?,
        };
        let mro = events::mro_ids(&ty)?;
        let class_has_key = events::class_has_key(&ty)?;
        let mut inner = self.inner.lock(py);
        if inner.routes_gen != inner.router.generation() {
            inner.routes.clear();
            inner.routes_gen = inner.router.generation();
        }
        let subs = inner.router.resolve(&key_name, &mro);
        let skip = self.progress.get().map(|_| {
            let out: Names = inner
                .router
                .iter()
                .filter(|s| !subs.iter().any(|m| m.id == s.id))
                .map(|s| Arc::clone(&s.name))
                .collect();
            (Arc::from(key_name.as_str()), out)
        });
        let route = Arc::new(Route {
            class: ty.into_any().unbind(),
            subs,
            skip: skip.filter(|(_, out)| !out.is_empty()),
            counters: inner.stats.type_counters(&key_name),
            type_key: key_name,
            mro,
            class_has_key,
        });
        inner.routes.insert(cache_key, Arc::clone(&route));
        Ok(route)
    }

    /// Builds the envelope of an event about to be published.
    fn envelope(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        position: Option<i64>,
    ) -> PyResult<(Queued, Option<u64>)> {
        if event.is_none() {
            return Err(events::none_event_error());
        }
        let route = self.route(event)?;
        let lane = if self.keyed {
            match &key {
                Some(k) => Some(events::lane_of(k)?),
                None => match events::aggregate_key(event, route.class_has_key)? {
                    Some(k) => Some(events::lane_of(&k)?),
                    None => None,
                },
            }
        } else {
            None
        };
        let origin = match correlation_id {
            Some(c) => Origin::Root(Some(c.unbind())),
            None => match envelope::get_current(py)? {
                Some(parent) => {
                    let p = &parent;
                    Origin::Child(p.correlation(py)?.unbind(), p.id(py)?.unbind())
                }
                None => Origin::Root(None),
            },
        };
        match &origin {
            Origin::Child(c, cause) => mark_domain_event(event, c.bind(py), Some(cause.bind(py)))?,
            Origin::Root(Some(c)) => mark_domain_event(event, c.bind(py), None)?,
            Origin::Root(None) => {}
        }
        let env = EnvData::new(
            event.clone().unbind(),
            origin,
            key.map(Bound::unbind),
            route,
            position,
        );
        Ok((
            Queued {
                env: Arc::new(env),
                enqueued: health::coarse_now_ns(),
            },
            lane,
        ))
    }

    /// Wakes the idle worker `next` popped by `Inner::wake_if_needed`; a future already done
    /// (its worker was cancelled) gives its turn back and the next idle worker is tried.
    pub fn wake(&self, py: Python<'_>, mut next: Option<Py<PyAny>>) {
        while let Some(f) = next {
            if !is_done(py, &f) {
                resolve(py, &f, &py.None().into_bound(py));
                return;
            }
            let mut inner = self.inner.lock(py);
            inner.active -= 1;
            next = inner.wake_if_needed();
        }
    }

    /// Moves blocked publishers into freed room, in FIFO order; returns their futures to
    /// resolve. A publisher whose wait was cancelled saw `CancelledError`: its event is not
    /// accepted. Whether a wait was cancelled is asked with the lock released.
    pub fn admit_blocked(&self, py: Python<'_>) -> Vec<(Py<PyAny>, Option<Arc<EnvData>>)> {
        let mut out = Vec::new();
        loop {
            let taken = self.inner.lock(py).take_blocked();
            if taken.is_empty() {
                return out;
            }
            let live: Vec<Blocked> = taken.into_iter().filter(|b| !is_done(py, &b.fut)).collect();
            let mut inner = self.inner.lock(py);
            for b in live {
                if b.direct {
                    bump(&b.item.env.route().counters.published, 1);
                    let env = Arc::clone(&b.item.env);
                    inner.lanes.push(b.item, b.lane);
                    inner.stats.published += 1;
                    out.push((b.fut, Some(env)));
                } else {
                    inner.lanes.reserve();
                    let key = b.fut.as_ptr() as usize;
                    let fut = b.fut.clone_ref(py);
                    inner.admitted.insert(
                        key,
                        Admitted {
                            item: b.item,
                            lane: b.lane,
                            fut: b.fut,
                        },
                    );
                    out.push((fut, None));
                }
            }
        }
    }

    /// Resolves the `wait_for` calls an accepted event matches.
    pub fn notify_waiters(&self, py: Python<'_>, env: &Arc<EnvData>) {
        if self.waiter_count.load(Relaxed) == 0 {
            return;
        }
        let route = Arc::clone(env.route());
        let waiters = std::mem::take(&mut self.inner.lock(py).waiters);
        let mut keep = Vec::with_capacity(waiters.len());
        let event = env.event_ref().bind(py);
        for w in waiters {
            if !w.matcher.matches(&route.type_key, &route.mro) {
                keep.push(w);
                continue;
            }
            let hit = match &w.predicate {
                None => Ok(true),
                Some(p) => p.bind(py).call1((event,)).and_then(|r| r.is_truthy()),
            };
            match hit {
                Ok(true) => resolve(py, &w.fut, event),
                Ok(false) => keep.push(w),
                Err(e) => fail(py, &w.fut, &e),
            }
        }
        let mut inner = self.inner.lock(py);
        keep.append(&mut inner.waiters);
        inner.waiters = keep;
        self.waiter_count.store(inner.waiters.len(), Relaxed);
    }

    /// Accepts an event delivered by a transport; `ack` runs once every subscription is done.
    pub fn accept_remote(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        correlation_id: Option<Bound<'_, PyAny>>,
        causation_id: Option<Bound<'_, PyAny>>,
        ack: envelope::Ack,
    ) -> PyResult<()> {
        let (mut item, lane) = self.envelope(py, event, None, None, None)?;
        let origin = match (correlation_id, causation_id) {
            (Some(c), Some(cause)) => Origin::Child(c.unbind(), cause.unbind()),
            (c, None) => Origin::Root(c.map(Bound::unbind)),
            (None, Some(cause)) => Origin::Child(item.env.id(py)?.unbind(), cause.unbind()),
        };
        let env = EnvData::new(
            event.clone().unbind(),
            origin,
            None,
            Arc::clone(item.env.route()),
            None,
        );
        *env.ack.lock() = Some(ack);
        item.env = Arc::new(env);
        // A full queue parks it with the blocked publishers: the transport's prefetch bounds them.
        drop(self.accept(py, item, lane, true, true)?);
        Ok(())
    }

    /// Tells publishers they were given room, and the `wait_for` callers of events pushed
    /// at once.
    pub fn admitted(&self, py: Python<'_>, admitted: Vec<(Py<PyAny>, Option<Arc<EnvData>>)>) {
        let none = py.None().into_bound(py);
        for (fut, env) in admitted {
            resolve(py, &fut, &none);
            if let Some(env) = env {
                self.notify_waiters(py, &env);
            }
        }
    }

    /// Whether the bus takes an event now. While `stop()` drains (`Closing`) only events from
    /// inside the bus are taken: those handlers publish, and deliveries it already owes.
    fn check_running(state: RunState, inside: bool) -> PyResult<()> {
        match state {
            RunState::Running => Ok(()),
            RunState::Closing if inside => Ok(()),
            RunState::Closing => Err(errors::bus_closed("the bus is stopping: publishing during `stop()` is refused so no event is silently lost")),
            RunState::Created => Err(errors::bus_not_started("the bus is not started: call `await bus.start()` (or use `async with bus:`) before publishing")),
            RunState::Closed => Err(errors::bus_closed("the bus is stopped: publishing after `stop()` is refused so no event is silently lost")),
        }
    }

    /// Accepts one event: queued now (None), or a future that resolves once it is accepted.
    fn accept(
        &self,
        py: Python<'_>,
        item: Queued,
        lane: Option<u64>,
        wait: bool,
        internal: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let env = Arc::clone(&item.env);
        let route = Arc::clone(env.route());
        // An event published by a running handler is always accepted: the bound applies to
        // what comes from outside, and making a handler wait for room that only handlers can
        // make would freeze the bus.
        let from_handler = env.is_child();
        let mut inner = self.inner.lock(py);
        Self::check_running(inner.state, internal || from_handler)?;
        if route.subs.is_empty() {
            // Nothing to run: accepted and finished at once.
            bump(&route.counters.published, 1);
            inner.stats.published += 1;
            inner.stats.processed += 1;
            inner.stats.unrouted += 1;
            bump(&route.counters.processed, 1);
            drop(inner);
            env.acknowledge();
            self.notify_waiters(py, &env);
            return Ok(None);
        }
        if inner
            .loop_thread
            .is_some_and(|t| t != std::thread::current().id())
        {
            return Err(errors::oxbus_error(
                "publish() and publish_nowait() must run on the bus's event loop thread; \
                 from another thread use bus.publish_threadsafe(event)",
            ));
        }
        if from_handler || (inner.lanes.has_room() && inner.blocked.is_empty()) {
            inner.lanes.push(item, lane);
            inner.stats.published += 1;
            bump(&route.counters.published, 1);
            let wake = inner.wake_if_needed();
            drop(inner);
            self.wake(py, wake);
            self.notify_waiters(py, &env);
            return Ok(None);
        }
        if !wait {
            return Err(errors::to_py(&CoreError::QueueFull {
                capacity: inner.lanes.capacity(),
            }));
        }
        let loop_ = inner
            .loop_
            .as_ref()
            .expect("a running bus has a loop")
            .clone_ref(py);
        drop(inner);
        let fut = loop_
            .bind(py)
            .call_method0(intern!(py, "create_future"))?
            .unbind();
        let mut inner = self.inner.lock(py);
        inner.blocked.push_back(Blocked {
            item,
            lane,
            fut: fut.clone_ref(py),
            direct: internal,
        });
        Ok(Some(fut))
    }
}

/// On a `DomainEvent` published from a handler or with `correlation_id=`, shows the ids of
/// its envelope on the event itself.
fn mark_domain_event(
    event: &Bound<'_, PyAny>,
    correlation: &Bound<'_, PyAny>,
    causation: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let py = event.py();
    if !event
        .get_type()
        .hasattr(intern!(py, "__oxbus_domain_event__"))?
    {
        return Ok(());
    }
    if let Some(d) = event.getattr_opt(intern!(py, "__dict__"))? {
        if let Ok(d) = d.cast::<PyDict>() {
            // Written into __dict__ directly so frozen dataclasses accept it; the inherited
            // ids win, as they do in the envelope.
            d.set_item(intern!(py, "correlation_id"), correlation)?;
            if let Some(causation) = causation {
                d.set_item(intern!(py, "causation_id"), causation)?;
            }
        }
    }
    Ok(())
}

fn setting(name: &'static str, rule: &'static str, value: &impl ToString) -> PyErr {
    errors::to_py(&CoreError::InvalidSetting {
        name,
        rule,
        value: value.to_string(),
    })
}

#[pymethods]
impl PyBusCore {
    #[new]
    #[pyo3(signature = (workers, max_queue_size, keyed=None, threaded_sync=false, executor=None, retry=None))]
    fn new(
        workers: &Bound<'_, PyAny>,
        max_queue_size: &Bound<'_, PyAny>,
        keyed: Option<bool>,
        threaded_sync: bool,
        executor: Option<Py<PyAny>>,
        retry: Option<Bound<'_, PyRetryPolicy>>,
    ) -> PyResult<Self> {
        let workers: usize = match workers.extract::<i64>() {
            Ok(n) if n >= 1 && !workers.is_instance_of::<pyo3::types::PyBool>() => {
                usize::try_from(n).unwrap_or(usize::MAX)
            }
            _ => return Err(setting("workers", "an int >= 1", &workers.repr()?)),
        };
        let capacity: usize = match max_queue_size.extract::<i64>() {
            Ok(n) if n >= 0 && !max_queue_size.is_instance_of::<pyo3::types::PyBool>() => {
                usize::try_from(n).unwrap_or(usize::MAX)
            }
            _ => {
                return Err(setting(
                    "max_queue_size",
                    "an int >= 0 (0 = unbounded)",
                    &max_queue_size.repr()?,
                ))
            }
        };
        Ok(Self {
            inner: GilMutex::new(Inner {
                state: RunState::Created,
                router: Router::new(),
                routes: FxHashMap::default(),
                routes_gen: 0,
                lanes: Lanes::new(capacity),
                blocked: VecDeque::new(),
                admitted: FxHashMap::default(),
                idle: Vec::new(),
                active: 0,
                in_flight: 0,
                drain_waiters: Vec::new(),
                waiters: Vec::new(),
                next_waiter: 1,
                stats: Stats::default(),
                loop_: None,
                after_call: None,
                dead_letters: 0,
                retrying: 0,
                loop_thread: None,
                parked: rustc_hash::FxHashSet::default(),
                sleep: None,
                now: None,
                wrap_timeout: None,
                probe: None,
            }),
            workers,
            keyed: keyed.unwrap_or(workers > 1),
            threaded_sync,
            executor,
            default_retry: retry.map_or_else(RetryPolicy::default, |r| r.get().policy),
            thresholds: Thresholds::default(),
            waiter_count: AtomicUsize::new(0),
            hook_on_success: AtomicBool::new(false),
            progress: std::sync::OnceLock::new(),
        })
    }

    /// Subscribes `handler` to `target`; returns the subscription id.
    #[pyo3(signature = (target, handler, priority, name, threaded, retry=None, retry_on=None, timeout=None, breaker=None, park=false))]
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        handler: &Bound<'_, PyAny>,
        priority: i64,
        name: String,
        threaded: bool,
        retry: Option<Bound<'_, PyRetryPolicy>>,
        retry_on: Option<Py<PyAny>>,
        timeout: Option<f64>,
        breaker: Option<(u32, f64)>,
        park: bool,
    ) -> PyResult<u64> {
        events::check_callable(handler)?;
        let matcher = events::matcher_for(target)?;
        if let Some(t) = timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(setting("timeout", "a number > 0", &t));
            }
        }
        if let Some((n, cool)) = breaker {
            if n < 1 || !(cool.is_finite() && cool >= 0.0) {
                return Err(setting(
                    "circuit_breaker",
                    "(failures >= 1, cool_down >= 0)",
                    &format!("({n}, {cool})"),
                ));
            }
        }
        let payload = Handler {
            callable: handler.clone().unbind(),
            target: target.clone().unbind(),
            threaded: threaded && self.threaded_sync,
            retry: retry
                .as_ref()
                .map_or(self.default_retry, |r| r.get().policy),
            retry_on: retry_on
                .or_else(|| retry.map(|r| r.get().retry_on.clone_ref(r.py()).into_any())),
            timeout,
            breaker: breaker.map(|(failures, cool_down)| Breaker {
                failures,
                cool_down,
                consecutive: std::sync::atomic::AtomicU32::new(0),
                open_until: Mutex::new(0.0),
            }),
            park,
        };
        let mut inner = self.inner.lock(py);
        Ok(inner.router.subscribe(matcher, priority, name, payload).id)
    }

    /// Queues `event` for one subscription only (a dead letter's retry, a durable replay).
    /// False when that subscription is gone or does not match the event.
    #[pyo3(signature = (event, sub_id, position=None, correlation_id=None, causation_id=None, key=None))]
    #[allow(clippy::too_many_arguments)]
    fn redeliver(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        sub_id: u64,
        position: Option<i64>,
        correlation_id: Option<Py<PyAny>>,
        causation_id: Option<Py<PyAny>>,
        key: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let sub = {
            let inner = self.inner.lock(py);
            let found = inner.router.iter().find(|s| s.id == sub_id).map(Arc::clone);
            match found {
                Some(s) => s,
                None => return Ok(false),
            }
        };
        let explicit = key.as_ref().map(|k| k.clone().unbind());
        let (mut item, lane) = self.envelope(py, event, key, None, position)?;
        let full = item.env.route();
        if !full.subs.iter().any(|s| s.id == sub_id) {
            // Not an event this subscription matches (a durable bus's restart scans every
            // event the subscription has not finished, whatever its type): nothing to deliver,
            // and its progress moves past it.
            if let (Some(log), Some(p)) = (self.progress(), position) {
                let _ = log.skip(
                    p,
                    Arc::from(full.type_key.as_str()),
                    Arc::from([Arc::clone(&sub.name)]),
                );
            }
            return Ok(false);
        }
        let route = Route {
            class: full.class.clone_ref(py),
            subs: vec![sub],
            skip: None,
            type_key: full.type_key.clone(),
            mro: full.mro.clone(),
            class_has_key: full.class_has_key,
            counters: Arc::clone(&full.counters),
        };
        let env = Arc::clone(&item.env);
        let origin = match (correlation_id, causation_id) {
            (Some(c), Some(cause)) => Origin::Child(c, cause),
            (c, None) => Origin::Root(c),
            (None, Some(cause)) => Origin::Child(env.correlation(py)?.unbind(), cause),
        };
        item.env = Arc::new(EnvData::new(
            event.clone().unbind(),
            origin,
            explicit,
            Arc::new(route),
            position,
        ));
        if let Some(fut) = self.accept(py, item, lane, true, true)? {
            drop(fut);
        }
        Ok(true)
    }

    /// Sets the clock: `sleep(seconds) -> awaitable` and `time() -> float`.
    fn set_clock(&self, py: Python<'_>, sleep: Py<PyAny>, now: Py<PyAny>) {
        let mut inner = self.inner.lock(py);
        inner.sleep = Some(sleep);
        inner.now = Some(now);
    }

    /// Sets the wrapper that puts a timeout on a handler's awaitable.
    fn set_timeout_wrapper(&self, py: Python<'_>, wrap: Py<PyAny>) {
        self.inner.lock(py).wrap_timeout = Some(wrap);
    }

    /// Parks a key behind a dead letter of a subscription (restoring a durable bus's state).
    fn park(&self, py: Python<'_>, sub_id: u64, key_hash: u64) {
        self.inner.lock(py).parked.insert((sub_id, key_hash));
    }

    /// Releases a key parked behind a dead letter of a subscription; whether it was parked.
    fn unpark(&self, py: Python<'_>, sub_id: u64, key_hash: u64) -> bool {
        self.inner.lock(py).parked.remove(&(sub_id, key_hash))
    }

    /// Removes a subscription by id.
    fn unsubscribe(&self, py: Python<'_>, id: u64) -> bool {
        self.inner.lock(py).router.unsubscribe(id)
    }

    /// Removes the subscriptions of `handler` (compared with ==) to `target`; returns how many.
    fn unsubscribe_handler(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        handler: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let matcher = events::matcher_for(target)?;
        let ids: Vec<u64> = {
            let inner = self.inner.lock(py);
            inner
                .router
                .iter()
                .filter(|s| s.matcher == matcher)
                .map(|s| (s.id, s.payload.callable.clone_ref(py)))
                .collect::<Vec<_>>()
        }
        .into_iter()
        .filter(|(_, c)| c.bind(py).eq(handler).unwrap_or(false))
        .map(|(id, _)| id)
        .collect();
        let mut inner = self.inner.lock(py);
        Ok(ids
            .into_iter()
            .filter(|id| inner.router.unsubscribe(*id))
            .count())
    }

    /// (id, name, priority, target) of every subscription, in subscription order.
    fn subscriptions(&self, py: Python<'_>) -> Vec<(u64, String, i64, Py<PyAny>)> {
        let inner = self.inner.lock(py);
        inner
            .router
            .iter()
            .map(|s| {
                (
                    s.id,
                    s.name.to_string(),
                    s.priority,
                    s.payload.target.clone_ref(py),
                )
            })
            .collect()
    }

    /// Whether a subscription with this name exists.
    fn has_name(&self, py: Python<'_>, name: &str) -> bool {
        self.inner.lock(py).router.iter().any(|s| &*s.name == name)
    }

    /// Installs the hook called after handler calls: on failures, and on every call when
    /// `on_success` (the `event_storage` protocol needs one call per handler call).
    fn set_after_call(&self, py: Python<'_>, hook: Option<Py<PyAny>>, on_success: bool) {
        self.inner.lock(py).after_call = hook;
        self.hook_on_success.store(on_success, Relaxed);
    }

    /// Makes the bus durable on `store`: every successful handler call of an event with a log
    /// position is recorded there as done, from Rust, with no Python call per event.
    fn set_progress(&self, store: &Bound<'_, PyStoreCore>) -> PyResult<()> {
        self.progress.set(store.get().writer()).map_err(|_| {
            errors::configuration_error("the bus already records progress on a store".to_owned())
        })
    }

    /// Marks the bus running on `loop` (idempotent).
    fn start(&self, py: Python<'_>, loop_: Py<PyAny>) {
        let mut inner = self.inner.lock(py);
        if inner.state != RunState::Running {
            inner.state = RunState::Running;
            inner.loop_ = Some(loop_);
            inner.loop_thread = Some(std::thread::current().id());
            // Every new worker task is scheduled to run its first step.
            inner.active = self.workers;
            inner.idle.clear();
            if inner.probe.is_none() {
                inner.probe = Some(Probe::new());
            }
        }
    }

    /// A worker to run as an asyncio task.
    fn worker(slf: &Bound<'_, Self>, index: usize) -> PyWorker {
        PyWorker::new(slf.clone().unbind(), index)
    }

    /// Refuses further publishes. With `discard`, drops what is queued and fails blocked
    /// publishers with `BusClosed`; returns how many queued events were discarded.
    fn close(&self, py: Python<'_>, discard: bool) -> usize {
        let (blocked, dropped, idle, admitted) = {
            let mut inner = self.inner.lock(py);
            inner.state = RunState::Closed;
            let dropped = if discard {
                inner.lanes.clear()
            } else {
                Vec::new()
            };
            let mut blocked: Vec<Blocked> = Vec::new();
            let mut admitted = FxHashMap::default();
            if discard {
                blocked = inner.blocked.drain(..).collect();
                // Given room, not yet resumed: not accepted (`enter` will say BusClosed).
                admitted = std::mem::take(&mut inner.admitted);
                for _ in 0..admitted.len() {
                    inner.lanes.unreserve();
                }
            }
            (blocked, dropped, std::mem::take(&mut inner.idle), admitted)
        };
        drop(admitted);
        let err = errors::bus_closed("the bus was stopped before this event was accepted");
        for b in &blocked {
            fail(py, &b.fut, &err);
        }
        drop(idle);
        let drains = self.inner.lock(py).take_drain_waiters();
        resolve_all(py, drains);
        dropped.len() + blocked.len()
    }

    /// A publisher given room resumed: its event enters the queue now (counted published,
    /// `wait_for` callers told). `BusClosed` when `stop()` discarded its room meanwhile.
    fn enter(&self, py: Python<'_>, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = fut.as_ptr() as usize;
        let mut inner = self.inner.lock(py);
        let Some(a) = inner.admitted.remove(&key) else {
            return Err(errors::bus_closed(
                "the bus was stopped before this event was accepted",
            ));
        };
        inner.lanes.unreserve();
        let env = Arc::clone(&a.item.env);
        bump(&env.route().counters.published, 1);
        inner.lanes.push(a.item, a.lane);
        inner.stats.published += 1;
        let wake = inner.wake_if_needed();
        drop(inner);
        drop(a.fut);
        self.wake(py, wake);
        self.notify_waiters(py, &env);
        Ok(())
    }

    /// A publisher waiting for room was cancelled: if it had been given room, that room goes
    /// to the next waiting publisher; its event is not accepted.
    fn withdraw(&self, py: Python<'_>, fut: &Bound<'_, PyAny>) {
        let key = fut.as_ptr() as usize;
        let gone = {
            let mut inner = self.inner.lock(py);
            let gone = inner.admitted.remove(&key);
            if gone.is_some() {
                inner.lanes.unreserve();
            }
            gone
        };
        if gone.is_some() {
            drop(gone);
            let admitted = self.admit_blocked(py);
            self.admitted(py, admitted);
            let drains = self.inner.lock(py).take_drain_waiters();
            resolve_all(py, drains);
        }
    }

    /// Raises `BusNotStarted` / `BusClosed` unless the bus accepts events.
    fn ensure_running(&self, py: Python<'_>) -> PyResult<()> {
        let inside = envelope::get_current(py)?.is_some();
        Self::check_running(self.inner.lock(py).state, inside)
    }

    /// Refuses publishes from outside the bus from now on, while handlers keep running (the
    /// first step of `stop()`: what is accepted after it is drained, nothing is accepted and
    /// then dropped).
    fn close_intake(&self, py: Python<'_>) {
        let mut inner = self.inner.lock(py);
        if inner.state == RunState::Running {
            inner.state = RunState::Closing;
        }
    }

    /// Whether the bus accepts events.
    #[getter]
    fn running(&self, py: Python<'_>) -> bool {
        self.inner.lock(py).state == RunState::Running
    }

    /// Publishes one event: None when accepted now, else a future resolved once accepted.
    /// `position` is the event's place in the durable log, if any.
    #[pyo3(signature = (event, key=None, correlation_id=None, position=None))]
    fn publish(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        position: Option<i64>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let (item, lane) = self.envelope(py, event, key, correlation_id, position)?;
        // A durable bus: the subscriptions this event is not for move past its position.
        let skip = match (position, self.progress(), &item.env.route().skip) {
            (Some(p), Some(log), Some((t, subs))) => {
                Some((p, Arc::clone(log), Arc::clone(t), Arc::clone(subs)))
            }
            _ => None,
        };
        let accepted = self.accept(py, item, lane, true, false)?;
        if let Some((p, log, t, subs)) = skip {
            let _ = log.skip(p, t, subs);
        }
        Ok(accepted)
    }

    /// Publishes one event now or raises `QueueFull`.
    #[pyo3(signature = (event, key=None, correlation_id=None))]
    fn publish_nowait(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (item, lane) = self.envelope(py, event, key, correlation_id, None)?;
        self.accept(py, item, lane, false, false).map(|_| ())
    }

    /// Publishes from an iterator until it ends or the queue is full; returns how many were
    /// taken from it and, when full, the future of the last one (accepted once it resolves).
    fn publish_many(
        &self,
        py: Python<'_>,
        events: &Bound<'_, PyIterator>,
    ) -> PyResult<(usize, Option<Py<PyAny>>)> {
        let mut n = 0;
        for event in events.clone() {
            let event = event?;
            let (item, lane) = self.envelope(py, &event, None, None, None)?;
            n += 1;
            if let Some(fut) = self.accept(py, item, lane, true, false)? {
                return Ok((n, Some(fut)));
            }
        }
        Ok((n, None))
    }

    /// None when every accepted event is handled, else a future resolved when that happens.
    fn drain_waiter(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let loop_ = {
            let inner = self.inner.lock(py);
            if inner.is_drained() {
                return Ok(None);
            }
            match &inner.loop_ {
                Some(l) => l.clone_ref(py),
                None => return Ok(None),
            }
        };
        let fut = loop_
            .bind(py)
            .call_method0(intern!(py, "create_future"))?
            .unbind();
        let mut inner = self.inner.lock(py);
        if inner.is_drained() {
            return Ok(None);
        }
        inner.drain_waiters.push(fut.clone_ref(py));
        Ok(Some(fut))
    }

    /// Registers a `wait_for`: `fut` gets the first matching event accepted from now on.
    #[pyo3(signature = (target, predicate, fut))]
    fn add_waiter(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        predicate: Option<Py<PyAny>>,
        fut: Py<PyAny>,
    ) -> PyResult<u64> {
        let matcher = events::matcher_for(target)?;
        let mut inner = self.inner.lock(py);
        let id = inner.next_waiter;
        inner.next_waiter += 1;
        inner.waiters.push(Waiter {
            id,
            matcher,
            predicate,
            fut,
        });
        self.waiter_count.store(inner.waiters.len(), Relaxed);
        Ok(id)
    }

    /// Forgets a `wait_for` (after it resolved or timed out).
    fn remove_waiter(&self, py: Python<'_>, id: u64) {
        let mut inner = self.inner.lock(py);
        inner.waiters.retain(|w| w.id != id);
        self.waiter_count.store(inner.waiters.len(), Relaxed);
    }

    /// Counts a dead letter added by the Python layer (for health).
    fn set_dead_letters(&self, py: Python<'_>, n: u64) {
        self.inner.lock(py).dead_letters = n;
    }

    /// The configured number of workers.
    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    /// Events accepted and not yet handed to a handler (blocked publishers not included).
    #[getter]
    fn queue_size(&self, py: Python<'_>) -> usize {
        self.inner.lock(py).lanes.len()
    }

    /// The counters, as a dict (see `EventBus.get_statistics`). Read under the lock, built
    /// into Python objects after it.
    fn statistics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (ints, floats, latency, by_type) = {
            let inner = self.inner.lock(py);
            let s = &inner.stats;
            let ints: [(&str, u64); 17] = [
                ("events_published", s.published),
                ("events_processed", s.processed),
                ("events_failed", s.failed),
                // The same counters under the names the contract also promises.
                ("published", s.published),
                ("processed", s.processed),
                ("failed", s.failed),
                ("events_unrouted", s.unrouted),
                ("events_interrupted", s.interrupted),
                ("handler_calls", s.failed + s.succeeded),
                ("retried", s.retried),
                ("dead_lettered", s.dead_lettered),
                ("queue_size", inner.lanes.len() as u64),
                ("blocked_publishers", inner.blocked.len() as u64),
                ("in_flight", inner.in_flight as u64),
                ("retry_queue_size", inner.retrying as u64),
                ("subscription_count", inner.router.len() as u64),
                ("max_queue_size", inner.lanes.capacity() as u64),
            ];
            let floats = [
                ("uptime_seconds", s.uptime_seconds()),
                ("avg_processing_time_ms", s.avg_handler_ms()),
            ];
            let latency = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)]
                .map(|(name, q)| (name, s.latency.quantile(q) as f64 / 1e6));
            (
                ints,
                floats,
                (latency, inner.state == RunState::Running),
                s.by_type(),
            )
        };
        let d = PyDict::new(py);
        for (k, v) in floats {
            d.set_item(k, v)?;
        }
        for (k, v) in ints {
            d.set_item(k, v)?;
        }
        let (latency, running) = latency;
        d.set_item("handler_latency_ms", latency.into_py_dict(py)?)?;
        d.set_item("is_running", running)?;
        d.set_item("worker_count", self.workers)?;
        let types = PyDict::new(py);
        for (k, p, done, f) in by_type {
            let t = [("published", p), ("processed", done), ("failed", f)];
            types.set_item(k, t.into_py_dict(py)?)?;
        }
        d.set_item("by_event_type", types)?;
        Ok(d)
    }

    /// Handler latency histogram: cumulative counts at the given bounds (seconds), the count and
    /// the sum (seconds), for Prometheus.
    fn latency_buckets(
        &self,
        py: Python<'_>,
        bounds: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<u64>, u64, f64)> {
        let bounds: Vec<f64> = bounds.extract()?;
        let inner = self.inner.lock(py);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ns: Vec<u64> = bounds.iter().map(|b| (b * 1e9) as u64).collect();
        let s = &inner.stats;
        Ok((
            s.latency.cumulative(&ns),
            s.latency.count(),
            s.handler_ns as f64 / 1e9,
        ))
    }

    /// The health report, as a dict (see `EventBus.get_health_status`). Read under the lock,
    /// built into Python objects after it.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // Sample the process outside the bus lock: it reads /proc.
        let mut probe = self.inner.lock(py).probe.take().unwrap_or_default();
        let sample = py.detach(|| probe.sample());
        let (readings, oldest, blocked, lane_count, longest, in_flight, uptime) = {
            let mut inner = self.inner.lock(py);
            inner.probe = Some(probe);
            let now = health::coarse_now_ns();
            let oldest = inner
                .lanes
                .heads()
                .map(|q| now.saturating_sub(q.enqueued) as f64 / 1e9)
                .fold(0.0, f64::max);
            let readings = Readings {
                running: inner.state == RunState::Running,
                queued: inner.lanes.len(),
                capacity: inner.lanes.capacity(),
                oldest_age_s: oldest,
                calls: inner.stats.failed + inner.stats.succeeded,
                failed_calls: inner.stats.failed,
                dead_letters: inner.dead_letters,
            };
            let longest: Vec<usize> = inner
                .lanes
                .longest_lanes(5)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            (
                readings,
                oldest,
                inner.blocked.len(),
                inner.lanes.lane_count(),
                longest,
                inner.in_flight,
                inner.stats.uptime_seconds(),
            )
        };
        let (status, reasons) = health::status(&readings, &self.thresholds);
        let d = PyDict::new(py);
        d.set_item("status", status)?;
        d.set_item("reasons", PyList::new(py, reasons)?)?;
        d.set_item("is_running", readings.running)?;
        d.set_item("queue_size", readings.queued)?;
        d.set_item("max_queue_size", readings.capacity)?;
        d.set_item("blocked_publishers", blocked)?;
        d.set_item("lane_count", lane_count)?;
        d.set_item("longest_lanes", longest)?;
        d.set_item("in_flight", in_flight)?;
        d.set_item("oldest_queued_age_seconds", oldest)?;
        d.set_item("worker_count", self.workers)?;
        d.set_item("uptime_seconds", uptime)?;
        d.set_item("memory_usage_mb", sample.rss_mb)?;
        d.set_item("cpu_percent", sample.cpu_percent)?;
        d.set_item("system_memory_total_mb", sample.system_total_mb)?;
        d.set_item("system_memory_available_mb", sample.system_available_mb)?;
        d.set_item(
            "error_rate",
            if readings.calls == 0 {
                0.0
            } else {
                readings.failed_calls as f64 / readings.calls as f64
            },
        )?;
        d.set_item("dead_letters", readings.dead_letters)?;
        let t = PyDict::new(py);
        t.set_item("queue_fill", self.thresholds.queue_fill)?;
        t.set_item("oldest_age_seconds", self.thresholds.oldest_age_s)?;
        t.set_item("error_rate", self.thresholds.error_rate)?;
        t.set_item("min_calls", self.thresholds.min_calls)?;
        t.set_item("dead_letters", self.thresholds.dead_letters)?;
        d.set_item("thresholds", t)?;
        Ok(d)
    }
}
