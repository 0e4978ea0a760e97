//! `BusCore`: the engine's queue, router and counters, driven from the asyncio thread.
//!
//! Everything here runs on the event loop's thread with the GIL held; the lock around `Inner`
//! is never held while Python code runs (a handler may publish, which takes it again).
//! `publish` pushes synchronously and returns `None` while there is room: no future, no thread
//! crossing. Only a full queue hands back a loop future, resolved in FIFO order as room frees.
//!
//! This module holds the Python methods; `state` the types (a leaf), `resolve` the routes and
//! envelopes, `intake` the queue's intake, its waiters and wake-ups.

mod intake;
mod resolve;
mod state;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyIterator;
use pyo3::{PyTraverseError, PyVisit};
use rustc_hash::FxHashMap;

use crate::core::breaker::Breaker;
use crate::core::bus::Settings;
use crate::core::health::{self, Probe};
use crate::core::retry::RetryPolicy;
use crate::core::stats::bump;
use crate::python::envelope::{self, EnvData, Origin};
use crate::python::errors;
use crate::python::events;
use crate::python::futures::{fail, resolve_all};
use crate::python::retry::PyRetryPolicy;
use crate::python::route::Handler;
use crate::python::store::PyStoreCore;

use intake::current_thread;
use state::{BusEngine, Waiting};
pub use state::{Inner, PyBusCore};

#[pymethods]
impl PyBusCore {
    /// What the garbage collector follows from a bus core: the Python objects it holds (the
    /// loop, hooks, handlers, waiting futures), so a cycle through it (a handler or hook that
    /// refers back to the bus: `DeadLetters` does) is collected with the rest. Without it
    /// every stopped bus kept itself and its loop alive for ever. What is visited:
    /// `Inner::traverse`; nothing of it while the engine's lock is held.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.executor)?;
        // SAFETY: the collector runs with the GIL held; only `visit` runs meanwhile (no
        // Python code, no lock).
        match unsafe { self.inner.peek() } {
            Some(inner) => inner.traverse(visit),
            None => Ok(()),
        }
    }

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
        Ok(Self::with_settings(
            settings,
            threaded_sync,
            executor,
            retry.map_or_else(RetryPolicy::default, |r| r.get().policy),
        ))
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
        let route = full.narrowed(py, vec![sub]);
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
        let entered = self.settle_held(py, fut, BusEngine::enter);
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
        if self.settle_held(py, fut, BusEngine::withdraw) {
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
        // The events are published from one place: the handler running there, if any, is
        // the parent of them all.
        let parent = envelope::get_current(py)?;
        for event in events.clone() {
            let event = event?;
            let (item, lane) = self.envelope_in(py, &event, None, None, parent.as_deref(), None)?;
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
        let id = inner.waiters.add(matcher, Waiting { predicate, fut });
        self.waiter_count.store(inner.waiters.len(), Relaxed);
        Ok(id)
    }

    /// Forgets a `wait_for` (after it resolved or timed out).
    fn remove_waiter(&self, py: Python<'_>, id: u64) {
        let mut inner = self.inner.lock(py);
        let gone = inner.waiters.remove(id);
        self.waiter_count.store(inner.waiters.len(), Relaxed);
        drop(inner);
        // Its predicate and future are dropped after the lock (a finalizer is Python code).
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
