//! `BusCore`: the engine's queue, router and counters, driven from the asyncio thread.
//!
//! Everything here runs on the event loop's thread with the GIL held; the lock around `Inner`
//! is never held while Python code runs (a handler may publish, which takes it again).
//! `publish` pushes synchronously and returns `None` while there is room: no future, no thread
//! crossing. Only a full queue hands back a loop future, resolved in FIFO order as room frees.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyIterator};
use rustc_hash::FxHashMap;

use crate::core::breaker::Breaker;
use crate::core::bus::{Accepted, Admission, Blocked, Engine, Settings};
use crate::core::health::{self, Probe};
use crate::core::retry::RetryPolicy;
use crate::core::routing::Matcher;
use crate::core::stats::bump;
use crate::python::envelope::{self, EnvData, Origin};
use crate::python::errors;
use crate::python::events;
use crate::python::futures::{fail, is_done, resolve, resolve_all};
use crate::python::retry::PyRetryPolicy;
use crate::python::route::{Handler, Names, Route};
use crate::python::store::PyStoreCore;
use crate::python::sync::{GilCell, GilMutex};
use crate::store::writer::Writer;

/// An accepted event waiting for a worker.
pub type Queued = crate::core::bus::Queued<Arc<EnvData>>;

/// The engine of a bus, with the glue's payloads: envelopes, loop futures, handlers.
pub type BusEngine = Engine<Arc<EnvData>, Py<PyAny>, Handler>;

struct Waiter {
    id: u64,
    matcher: Matcher,
    predicate: Option<Py<PyAny>>,
    fut: Py<PyAny>,
}

/// The bus's state: the engine, and what only the glue knows (Python objects).
pub struct Inner {
    /// Run state, admission, lanes, idle workers, drain waiters, parking, counters.
    pub engine: BusEngine,
    routes: FxHashMap<(usize, Option<String>), Arc<Route>>,
    routes_gen: u64,
    waiters: Vec<Waiter>,
    next_waiter: u64,
    /// The futures of publishers given room, by token (see `admit_blocked`).
    held: FxHashMap<u64, Py<PyAny>>,
    pub loop_: Option<Py<PyAny>>,
    pub after_call: Option<Py<PyAny>>,
    /// The thread of the loop the bus runs on.
    pub loop_thread: Option<libc::pthread_t>,
    /// `clock.sleep(seconds)` and `clock.time()`; the loop's by default.
    pub sleep: Option<Py<PyAny>>,
    pub now: Option<Py<PyAny>>,
    /// `wrap(awaitable, timeout, threaded, name) -> awaitable`, for handler timeouts.
    pub wrap_timeout: Option<Py<PyAny>>,
    probe: Option<Probe>,
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
    waiter_count: AtomicUsize,
    /// Whether the after-call hook runs after successful calls too (`event_storage`).
    hook_on_success: AtomicBool,
    /// A durable bus's log: workers record finished deliveries on it directly.
    progress: std::sync::OnceLock<Arc<Writer>>,
    /// The route found last by class alone, read without the engine's lock: emptied under
    /// the GIL by every change of the subscriptions, so it is never stale once that change
    /// returns.
    last_route: GilCell<Option<(usize, Arc<Route>)>>,
}

impl PyBusCore {
    /// Whether the after-call hook also runs after successful calls.
    pub fn hook_on_success(&self) -> bool {
        self.hook_on_success.load(Relaxed)
    }

    /// After every change of the subscriptions, with the GIL held since (and the engine's
    /// lock released): the lock-free route cache is emptied.
    fn routes_changed(&self, py: Python<'_>) {
        drop(self.last_route.replace(py, None));
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
        // The common case without a lock: the class of the previous event (only ever cached
        // while no string subscription asks for type keys). Then in one lock: not a dict,
        // class cached.
        if !is_dict {
            if let Some((t, r)) = self.last_route.get(py) {
                if t == ty_id {
                    return Ok(r);
                }
            }
        }
        let by_key = {
            let inner = self.inner.lock(py);
            let by_key = inner.engine.router.needs_type_key();
            if !by_key && !is_dict && inner.routes_gen == inner.engine.router.generation() {
                if let Some(r) = inner.routes.get(&(ty_id, None)).map(Arc::clone) {
                    drop(inner);
                    // The subscriptions cannot change meanwhile: that takes the GIL.
                    drop(self.last_route.replace(py, Some((ty_id, Arc::clone(&r)))));
                    return Ok(r);
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
            if inner.routes_gen == inner.engine.router.generation() {
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
        let key_read = events::key_read(&ty)?;
        let mut inner = self.inner.lock(py);
        // Stale routes are dropped once the lock is released: the last reference to an
        // unsubscribed handler may go with them, and its finalizer is Python code.
        let mut stale = FxHashMap::default();
        if inner.routes_gen != inner.engine.router.generation() {
            std::mem::swap(&mut inner.routes, &mut stale);
            inner.routes_gen = inner.engine.router.generation();
        }
        let subs = inner.engine.router.resolve(&key_name, &mro);
        inner
            .engine
            .stats
            .routed(&key_name, subs.iter().map(|s| &s.name));
        let skip = self.progress.get().map(|_| {
            let out: Names = inner
                .engine
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
            counters: inner.engine.stats.type_counters(&key_name),
            type_key: key_name,
            mro,
            key_read,
        });
        inner.routes.insert(cache_key, Arc::clone(&route));
        drop(inner);
        drop(stale);
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
        let lane = if self.settings.keyed {
            match &key {
                Some(k) => Some(events::lane_of(k)?),
                None => match events::aggregate_key(event, &route.key_read)? {
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
                item: Arc::new(env),
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
            next = self.inner.lock(py).engine.turn_unused();
        }
    }

    /// Moves blocked publishers into freed room, in FIFO order; returns their futures to
    /// resolve (with the event when it was queued at once). A publisher whose wait was
    /// cancelled saw `CancelledError`: its event is not accepted. Whether a wait was cancelled
    /// is asked with the lock released.
    pub fn admit_blocked(&self, py: Python<'_>) -> Vec<(Py<PyAny>, Option<Arc<EnvData>>)> {
        let mut out = Vec::new();
        loop {
            let waiting = self.inner.lock(py).engine.take_blocked();
            if waiting.is_empty() {
                return out;
            }
            let live: Vec<_> = waiting
                .into_iter()
                .filter(|b| !is_done(py, &b.waiter))
                .collect();
            let mut inner = self.inner.lock(py);
            for b in live {
                let token = b.token;
                match inner.engine.admit(b) {
                    Admission::Queued(fut, env) => {
                        bump(&env.route().counters.published, 1);
                        out.push((fut, Some(env)));
                    }
                    Admission::Reserved(fut) => {
                        // Held until the publisher enters or withdraws: its address is the
                        // token, so it must not be freed and reused meanwhile.
                        inner.held.insert(token, fut.clone_ref(py));
                        out.push((fut, None));
                    }
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
    #[allow(clippy::too_many_arguments)]
    pub fn accept_remote(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        causation_id: Option<Bound<'_, PyAny>>,
        only: Option<&str>,
        ack: envelope::Ack,
    ) -> PyResult<()> {
        // The key as JSON gave it back (a list for a tuple): in its canonical form again.
        let key = key.map(|k| events::canonical_key(&k)).transpose()?;
        let (mut item, lane) = self.envelope(py, event, key.clone(), None, None)?;
        let route = match only {
            // A retried dead letter: for the subscription that failed only.
            Some(name) => Arc::new(Self::route_for(py, item.item.route(), name)?),
            None => Arc::clone(item.item.route()),
        };
        let origin = match (correlation_id, causation_id) {
            (Some(c), Some(cause)) => Origin::Child(c.unbind(), cause.unbind()),
            (c, None) => Origin::Root(c.map(Bound::unbind)),
            (None, Some(cause)) => Origin::Child(item.item.id(py)?.unbind(), cause.unbind()),
        };
        let mut env = EnvData::new(
            event.clone().unbind(),
            origin,
            key.map(Bound::unbind),
            route,
            None,
        );
        env.set_ack(ack);
        item.item = Arc::new(env);
        // A full queue parks it with the blocked publishers: the transport's prefetch bounds them.
        drop(self.accept(py, item, lane, true, true)?);
        Ok(())
    }

    /// `full` restricted to the subscription named `name`, or `InvalidSubscription`.
    fn route_for(py: Python<'_>, full: &Route, name: &str) -> PyResult<Route> {
        let subs: Vec<_> = full
            .subs
            .iter()
            .filter(|s| &*s.name == name)
            .map(Arc::clone)
            .collect();
        if subs.is_empty() {
            return Err(errors::invalid_subscription(format!(
                "a retried dead letter is for subscription {name:?}, which this bus does not \
                 have for {:?}",
                full.type_key
            )));
        }
        Ok(Route {
            class: full.class.clone_ref(py),
            subs,
            skip: None,
            type_key: full.type_key.clone(),
            mro: full.mro.clone(),
            key_read: full.key_read.clone_ref(py),
            counters: Arc::clone(&full.counters),
        })
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

    /// Accepts one event: queued now (None), or a future that resolves once it has room.
    /// `internal`: a delivery the bus owes (a transport's, a replay's), taken while `stop()`
    /// drains and queued at admission when it had to wait.
    fn accept(
        &self,
        py: Python<'_>,
        item: Queued,
        lane: Option<u64>,
        wait: bool,
        internal: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        // An event published by a running handler is always accepted: the bound applies to
        // what comes from outside, and making a handler wait for room that only handlers can
        // make would freeze the bus.
        let from_handler = item.item.is_child();
        let routed = !item.item.route().subs.is_empty();
        // The envelope is needed after it is queued only by `wait_for` callers: no reference
        // count taken otherwise (the hot path of a publish takes none).
        let watched = (self.waiter_count.load(Relaxed) > 0).then(|| Arc::clone(&item.item));
        let mut inner = self.inner.lock(py);
        if routed && inner.loop_thread.is_some_and(|t| t != current_thread()) {
            inner
                .engine
                .check_intake(internal || from_handler)
                .map_err(|e| errors::to_py(&e))?;
            return Err(errors::oxbus_error(
                "publish() and publish_nowait() must run on the bus's event loop thread; \
                 from another thread use bus.publish_threadsafe(event)",
            ));
        }
        inner
            .engine
            .check_intake(internal || from_handler)
            .map_err(|e| errors::to_py(&e))?;
        // Counted before the queue takes it (after this check it is queued, finished at once,
        // or handed back as full, which takes the count back below).
        bump(&item.item.route().counters.published, 1);
        let outcome = inner
            .engine
            .accept(item, lane, routed, from_handler, internal)
            .map_err(|e| errors::to_py(&e))?;
        let item = match outcome {
            Accepted::Unrouted(item) => {
                // Nothing to run: accepted and finished at once.
                drop(inner);
                let env = item.item;
                bump(&env.route().counters.processed, 1);
                env.acknowledge();
                self.notify_waiters(py, &env);
                return Ok(None);
            }
            Accepted::Queued { wake } => {
                drop(inner);
                self.wake(py, wake);
                if let Some(env) = watched {
                    self.notify_waiters(py, &env);
                }
                return Ok(None);
            }
            Accepted::Full(item) => {
                let published = &item.item.route().counters.published;
                published.store(published.load(Relaxed) - 1, Relaxed);
                item
            }
        };
        if !wait {
            return Err(errors::to_py(&inner.engine.queue_full()));
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
        let token = fut.as_ptr() as u64;
        let waiter = fut.clone_ref(py);
        self.inner.lock(py).engine.block(Blocked {
            item,
            lane,
            waiter,
            direct: internal,
            token,
        });
        Ok(Some(fut))
    }
}

impl PyBusCore {
    /// Publishes one event: None when accepted now, else a future resolved once accepted.
    /// `position` is the event's place in the durable log, if any.
    pub fn publish_event(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        position: Option<i64>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let (item, lane) = self.envelope(py, event, key, correlation_id, position)?;
        // A durable bus: the subscriptions this event is not for move past its position.
        let skip = match (position, self.progress(), &item.item.route().skip) {
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
}

/// The running thread, as `pthread_self()` (a register read, where `thread::current()` takes
/// and drops a reference count: this is asked on every publish).
fn current_thread() -> libc::pthread_t {
    // SAFETY: always safe to call.
    unsafe { libc::pthread_self() }
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
        // The types are the glue's to check (a bool is an int to Python); the values are
        // validated once, by the engine's settings.
        let int = |v: &Bound<'_, PyAny>, name: &'static str, rule: &'static str| match v
            .extract::<i64>()
        {
            Ok(n) if !v.is_instance_of::<pyo3::types::PyBool>() => Ok(n),
            _ => Err(errors::invalid_setting(name, rule, &v.repr()?)),
        };
        let settings = Settings::new(
            int(workers, "workers", "an int >= 1")?,
            int(
                max_queue_size,
                "max_queue_size",
                "an int >= 0 (0 = unbounded)",
            )?,
            keyed,
        )
        .map_err(|e| errors::to_py(&e))?;
        Ok(Self {
            inner: GilMutex::new(Inner {
                engine: Engine::new(settings),
                routes: FxHashMap::default(),
                routes_gen: 0,
                waiters: Vec::new(),
                next_waiter: 1,
                held: FxHashMap::default(),
                loop_: None,
                after_call: None,
                loop_thread: None,
                sleep: None,
                now: None,
                wrap_timeout: None,
                probe: None,
            }),
            settings,
            threaded_sync,
            executor,
            default_retry: retry.map_or_else(RetryPolicy::default, |r| r.get().policy),
            waiter_count: AtomicUsize::new(0),
            hook_on_success: AtomicBool::new(false),
            progress: std::sync::OnceLock::new(),
            last_route: GilCell::new(None),
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
        name: &str,
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
                return Err(errors::invalid_setting("timeout", "a number > 0", &t));
            }
        }
        let breaker = breaker
            .map(|(failures, cool_down)| Breaker::new(failures, cool_down))
            .transpose()
            .map_err(|e| errors::to_py(&e))?;
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
            breaker,
            park,
        };
        let id = self
            .inner
            .lock(py)
            .engine
            .subscribe(matcher, priority, name, payload)
            .id;
        self.routes_changed(py);
        Ok(id)
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
            let found = inner
                .engine
                .router
                .iter()
                .find(|s| s.id == sub_id)
                .map(Arc::clone);
            match found {
                Some(s) => s,
                None => return Ok(false),
            }
        };
        let explicit = key.as_ref().map(|k| k.clone().unbind());
        let (mut item, lane) = self.envelope(py, event, key, None, position)?;
        let full = item.item.route();
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
            key_read: full.key_read.clone_ref(py),
            counters: Arc::clone(&full.counters),
        };
        let env = Arc::clone(&item.item);
        let origin = match (correlation_id, causation_id) {
            (Some(c), Some(cause)) => Origin::Child(c, cause),
            (c, None) => Origin::Root(c),
            (None, Some(cause)) => Origin::Child(env.correlation(py)?.unbind(), cause),
        };
        item.item = Arc::new(EnvData::new(
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
        // What they replace is dropped after the lock (a finalizer is Python code).
        let old = (inner.sleep.replace(sleep), inner.now.replace(now));
        drop(inner);
        drop(old);
    }

    /// Sets the wrapper that puts a timeout on a handler's awaitable.
    fn set_timeout_wrapper(&self, py: Python<'_>, wrap: Py<PyAny>) {
        let old = self.inner.lock(py).wrap_timeout.replace(wrap);
        drop(old); // after the lock: a finalizer is Python code
    }

    /// Parks a key behind a dead letter of a subscription (restoring a durable bus's state).
    fn park(&self, py: Python<'_>, sub_id: u64, key_hash: u64) {
        self.inner.lock(py).engine.park(sub_id, key_hash);
    }

    /// Releases a key parked behind a dead letter of a subscription; whether it was parked.
    fn unpark(&self, py: Python<'_>, sub_id: u64, key_hash: u64) -> bool {
        self.inner.lock(py).engine.unpark(sub_id, key_hash)
    }

    /// Removes a subscription by id.
    fn unsubscribe(&self, py: Python<'_>, id: u64) -> bool {
        let removed = self.inner.lock(py).engine.router.unsubscribe(id);
        self.routes_changed(py);
        removed
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
                .engine
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
        let removed = ids
            .into_iter()
            .filter(|id| inner.engine.router.unsubscribe(*id))
            .count();
        drop(inner);
        self.routes_changed(py);
        Ok(removed)
    }

    /// (id, name, priority, target) of every subscription, in subscription order.
    fn subscriptions(&self, py: Python<'_>) -> Vec<(u64, String, i64, Py<PyAny>)> {
        let inner = self.inner.lock(py);
        inner
            .engine
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
        self.inner
            .lock(py)
            .engine
            .router
            .iter()
            .any(|s| &*s.name == name)
    }

    /// Installs the hook called after handler calls: on failures, and on every call when
    /// `on_success` (the `event_storage` protocol needs one call per handler call).
    fn set_after_call(&self, py: Python<'_>, hook: Option<Py<PyAny>>, on_success: bool) {
        let old = std::mem::replace(&mut self.inner.lock(py).after_call, hook);
        drop(old); // after the lock: a finalizer is Python code
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
        let stale = {
            let mut inner = self.inner.lock(py);
            if inner.engine.is_running() {
                return;
            }
            inner.loop_ = Some(loop_);
            inner.loop_thread = Some(current_thread());
            if inner.probe.is_none() {
                inner.probe = Some(Probe::new());
            }
            // Every new worker task is scheduled to run its first step.
            inner.engine.start()
        };
        drop(stale);
    }

    /// Refuses further publishes. With `discard`, drops what is queued and fails blocked
    /// publishers with `BusClosed`; returns how many queued events were discarded.
    fn close(&self, py: Python<'_>, discard: bool) -> usize {
        let (closed, held) = {
            let mut inner = self.inner.lock(py);
            let closed = inner.engine.close(discard);
            // Publishers given room that had not resumed: not accepted (`enter` says so).
            let held = if discard {
                std::mem::take(&mut inner.held)
            } else {
                FxHashMap::default()
            };
            (closed, held)
        };
        drop(held);
        let err = errors::bus_closed("the bus was stopped before this event was accepted");
        for b in &closed.blocked {
            fail(py, &b.waiter, &err);
        }
        resolve_all(py, closed.drains);
        closed.discarded.len() + closed.blocked.len()
    }

    /// A publisher given room resumed: its event enters the queue now (counted published,
    /// `wait_for` callers told). `BusClosed` when `stop()` discarded its room meanwhile.
    fn enter(&self, py: Python<'_>, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        let token = fut.as_ptr() as u64;
        let (entered, held) = {
            let mut inner = self.inner.lock(py);
            let held = inner.held.remove(&token);
            (inner.engine.enter(token), held)
        };
        drop(held);
        let (env, wake) = entered.map_err(|_| {
            errors::bus_closed("the bus was stopped before this event was accepted")
        })?;
        bump(&env.route().counters.published, 1);
        self.wake(py, wake);
        self.notify_waiters(py, &env);
        Ok(())
    }

    /// A publisher waiting for room was cancelled: if it had been given room, that room goes
    /// to the next waiting publisher; its event is not accepted.
    fn withdraw(&self, py: Python<'_>, fut: &Bound<'_, PyAny>) {
        let token = fut.as_ptr() as u64;
        let (freed, held) = {
            let mut inner = self.inner.lock(py);
            let held = inner.held.remove(&token);
            (inner.engine.withdraw(token), held)
        };
        drop(held);
        if freed {
            let admitted = self.admit_blocked(py);
            self.admitted(py, admitted);
            let drains = self.inner.lock(py).engine.take_drain_waiters();
            resolve_all(py, drains);
        }
    }

    /// Raises `BusNotStarted` / `BusClosed` unless the bus accepts events.
    fn ensure_running(&self, py: Python<'_>) -> PyResult<()> {
        let inside = envelope::get_current(py)?.is_some();
        let checked = self.inner.lock(py).engine.check_intake(inside);
        checked.map_err(|e| errors::to_py(&e))
    }

    /// Refuses publishes from outside the bus from now on, while handlers keep running (the
    /// first step of `stop()`: what is accepted after it is drained, nothing is accepted and
    /// then dropped).
    fn close_intake(&self, py: Python<'_>) {
        self.inner.lock(py).engine.close_intake();
    }

    /// Whether the bus accepts events.
    #[getter]
    fn running(&self, py: Python<'_>) -> bool {
        self.inner.lock(py).engine.is_running()
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
        self.publish_event(py, event, key, correlation_id, position)
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
            if inner.engine.is_drained() {
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
        let waiter = fut.clone_ref(py);
        let back = self.inner.lock(py).engine.add_drain_waiter(waiter);
        match back {
            Some(_) => Ok(None), // drained meanwhile
            None => Ok(Some(fut)),
        }
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
        // Its predicate and future are dropped after the lock (a finalizer is Python code).
        let (gone, kept): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut inner.waiters)
            .into_iter()
            .partition(|w| w.id == id);
        inner.waiters = kept;
        self.waiter_count.store(inner.waiters.len(), Relaxed);
        drop(inner);
        drop(gone);
    }

    /// Counts a dead letter added by the Python layer (for health).
    fn set_dead_letters(&self, py: Python<'_>, n: u64) {
        self.inner.lock(py).engine.set_dead_letters(n);
    }

    /// The configured number of workers.
    #[getter]
    fn workers(&self) -> usize {
        self.settings.workers
    }

    /// Events accepted and not yet handed to a handler (blocked publishers not included).
    #[getter]
    fn queue_size(&self, py: Python<'_>) -> usize {
        self.inner.lock(py).engine.queue_size()
    }

    /// The counters, as a dict (see `EventBus.get_statistics`). Read under the lock, built
    /// into Python objects after it.
    fn statistics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stats = self.inner.lock(py).engine.statistics();
        Ok(pythonize::pythonize(py, &stats)?)
    }

    /// Failed handler calls per (event type, subscription name) pair an event was routed to,
    /// 0 until one fails, sorted: for Prometheus.
    fn failures(&self, py: Python<'_>) -> Vec<(String, String, u64)> {
        self.inner.lock(py).engine.stats.failures_by_pair()
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
        let s = &inner.engine.stats;
        Ok((
            s.latency.cumulative(&ns),
            s.latency.count(),
            s.handler_ns as f64 / 1e9,
        ))
    }

    /// The health report, as a dict (see `EventBus.get_health_status`). Read under the lock,
    /// built into Python objects after it.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // Sample the process outside the bus lock: it reads /proc.
        let mut probe = self.inner.lock(py).probe.take().unwrap_or_default();
        let sample = py.detach(|| probe.sample());
        let report = {
            let mut inner = self.inner.lock(py);
            inner.probe = Some(probe);
            inner.engine.health_report(health::coarse_now_ns(), sample)
        };
        Ok(pythonize::pythonize(py, &report)?)
    }
}
