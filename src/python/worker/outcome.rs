//! What happens once a handler call ends: the call booked (its time, the statistics, the
//! progress of a durable bus), then the after-call hook, a retry after its backoff, a dead
//! letter, parking behind a failed key, the circuit breaker, and the next subscription or
//! event.

use quanta::Instant;
use std::sync::Arc;

use pyo3::prelude::*;

use super::{is_cancelled_error, Current, Finished, Kind, PyWorker, State};
use crate::core::bus::Failed;
use crate::core::dispatch::Verdict;
use crate::core::stats::bump;
use crate::python::envelope::PyEnvelope;
use crate::python::events;
use crate::python::route::Sub;

impl PyWorker {
    /// The hash of the current event's key, for parking (the lane when keyed).
    pub(super) fn key_hash(py: Python<'_>, cur: &Current) -> PyResult<Option<u64>> {
        if cur.lane.is_some() {
            return Ok(cur.lane);
        }
        match cur.env.key(py)? {
            Some(k) => events::lane_of(&k).map(Some),
            None => Ok(None),
        }
    }

    /// Books a finished handler call, then runs the after-call hook, a retry, or moves on.
    pub(super) fn call_done(
        &self,
        py: Python<'_>,
        st: &mut State,
        err: Option<PyErr>,
    ) -> PyResult<()> {
        if let Some(e) = &err {
            // KeyboardInterrupt and SystemExit end the worker (and, with asyncio, the
            // program), as they would in any task; any other exception, BaseException
            // subclasses included, is a handler failure.
            if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
                || e.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
            {
                return Err(err.expect("checked above"));
            }
        }
        let core = self.core();
        if err.is_none() && self.succeeded(st) {
            return self.advance(py, st);
        }
        if st.cancelled && err.as_ref().is_some_and(|e| is_cancelled_error(py, e)) {
            // Interrupted because the worker itself is being cancelled (shutdown): not a
            // handler failure to count, log or dead-letter; `stop()` reports it. The worker
            // ends right after.
            core.inner.lock(py).engine.interrupted();
            return Ok(());
        }
        let cur = st.cur.as_mut().expect("an event is current");
        let now = Instant::now();
        #[allow(clippy::cast_possible_truncation)]
        let ns = cur
            .started
            .take()
            .map_or(0, |started| now.duration_since(started).as_nanos() as u64);
        let env = Arc::clone(&cur.env);
        let route = Arc::clone(env.route());
        let sub = &route.subs[cur.delivery.sub()];
        let attempt = cur.delivery.attempt();
        let ok = err.is_none();
        let retryable = match (&err, &sub.payload.retry_on) {
            (Some(e), Some(on)) => e.is_instance(py, on.bind(py)),
            _ => true,
        };
        let verdict = cur
            .delivery
            .ended(ok, &sub.payload.retry, retryable, st.cancelled);
        let retry = verdict == Verdict::Retry;
        self.update_breaker(py, sub, ok)?;
        let park_key = if !ok && !retry && sub.payload.park {
            Self::key_hash(py, cur)?
        } else {
            None
        };
        // Written by workers only, on the loop's thread under the GIL: one writer at a time.
        bump(&sub.counters.calls, 1);
        let hook = if ok {
            st.pending.calls.push(ns);
            if let (Some(log), Some(position)) = (core.progress(), env.position) {
                // Only fails once the store is closed; the event is then redelivered after a
                // restart, which at-least-once allows.
                let _ = log.mark_done(Arc::clone(&sub.name), position);
            }
            // After a retry succeeds the hook runs too, so the Python side can forget the
            // pair's earlier failures.
            if core.hook_on_success() || attempt > 1 {
                core.inner
                    .lock(py)
                    .after_call
                    .as_ref()
                    .map(|h| h.clone_ref(py))
            } else {
                None
            }
        } else {
            let mut inner = core.inner.lock(py);
            st.pending.flush(&mut inner);
            let verdict = if retry {
                Failed::Retry
            } else {
                Failed::DeadLetter { park: park_key }
            };
            inner
                .engine
                .call_failed(ns, &route.type_key, &route.counters, sub, verdict);
            inner.after_call.as_ref().map(|h| h.clone_ref(py))
        };
        if let Some(hook) = hook {
            // The hook is Python code of its own: the next call reads the clock afresh.
            st.clock = None;
            // `into_value` attaches the traceback, so dead letters show where it was raised.
            let err_obj = err
                .as_ref()
                .map_or_else(|| py.None(), |e| e.clone_ref(py).into_value(py).into_any());
            let secs = (ns as f64 / 1e9)
                .into_pyobject(py)
                .map_or_else(|_| py.None(), |f| f.into_any().unbind());
            let args = (
                PyEnvelope::new(Arc::clone(&cur.env)),
                sub.id,
                &*sub.name,
                err_obj,
                secs,
                attempt,
                !ok && !retry,
                park_key,
                false,
            );
            if Self::call_hook(st, hook.bind(py), args) {
                return Ok(());
            }
        } else {
            st.clock = Some(now);
        }
        self.advance(py, st)
    }

    /// Books a successful first attempt with no breaker and no after-call hook (the common
    /// case) without a reference count or a lock; false, with nothing done, otherwise.
    pub(super) fn succeeded(&self, st: &mut State) -> bool {
        let core = self.core();
        let cur = st.cur.as_mut().expect("an event is current");
        let sub = &cur.env.route().subs[cur.delivery.sub()];
        if cur.delivery.attempt() != 1 || sub.payload.breaker.is_some() || core.hook_on_success() {
            return false;
        }
        let verdict = cur
            .delivery
            .ended(true, &sub.payload.retry, true, st.cancelled);
        debug_assert!(verdict == Verdict::Ok);
        if let (Some(log), Some(position)) = (core.progress(), cur.env.position) {
            // Only fails once the store is closed; the event is then redelivered after a
            // restart, which at-least-once allows.
            let _ = log.mark_done(Arc::clone(&sub.name), position);
        }
        bump(&sub.counters.calls, 1);
        if let Some(started) = cur.started.take() {
            let now = Instant::now();
            st.clock = Some(now);
            #[allow(clippy::cast_possible_truncation)]
            st.pending
                .calls
                .push(now.duration_since(started).as_nanos() as u64);
        }
        true
    }

    /// After a call and its hook: sleep then retry the same subscription, or go to the next.
    pub(super) fn advance(&self, py: Python<'_>, st: &mut State) -> PyResult<()> {
        let cur = st.cur.as_mut().expect("an event is current");
        if !cur.delivery.retry_pending() {
            cur.delivery.next_subscription(); // per call: no route lookup, no Arc clone
            return Ok(());
        }
        let route = Arc::clone(cur.env.route());
        let policy = &route.subs[cur.delivery.sub()].payload.retry;
        if let Some(delay) = cur.delivery.advance(policy, fastrand::f64()) {
            let it = self.sleep(py, delay)?;
            self.core().inner.lock(py).engine.backoff_started();
            st.awaiting = Some((it.unbind(), Kind::Backoff));
        }
        Ok(())
    }

    /// The key is parked behind a dead letter of this subscription: the event joins the dead
    /// letters behind it, in order, without a call.
    pub(super) fn park(&self, py: Python<'_>, st: &mut State, key_hash: u64) -> PyResult<()> {
        let cur = st.cur.as_mut().expect("an event is current");
        let route = Arc::clone(cur.env.route());
        let sub = &route.subs[cur.delivery.sub()];
        let hook = {
            let mut inner = self.core().inner.lock(py);
            inner.engine.parked_behind(sub);
            inner.after_call.as_ref().map(|h| h.clone_ref(py))
        };
        cur.delivery.skipped();
        if let Some(hook) = hook {
            st.clock = None;
            let env = PyEnvelope::new(Arc::clone(&cur.env));
            let args = (
                env,
                sub.id,
                &*sub.name,
                py.None(),
                py.None(),
                0,
                true,
                key_hash,
                true,
            );
            if Self::call_hook(st, hook.bind(py), args) {
                return Ok(());
            }
        }
        self.advance(py, st)
    }

    /// Calls the after-call hook; true when it returned an awaitable, now in `st.awaiting`.
    /// The hook is our own Python code, which logs; an error from it is reported, not raised.
    pub(super) fn call_hook<'py>(
        st: &mut State,
        hook: &Bound<'py, PyAny>,
        args: impl pyo3::call::PyCallArgs<'py>,
    ) -> bool {
        match hook.call1(args).and_then(|r| events::awaitable_iter(&r)) {
            Ok(Some(it)) => {
                st.awaiting = Some((it.unbind(), Kind::Hook));
                true
            }
            Ok(None) => false,
            Err(e) => {
                e.write_unraisable(hook.py(), Some(hook));
                false
            }
        }
    }

    /// Counts a call in the subscription's circuit breaker: a success closes it, enough
    /// failures in a row open it for the cool-down.
    pub(super) fn update_breaker(&self, py: Python<'_>, sub: &Sub, ok: bool) -> PyResult<()> {
        if let Some(b) = &sub.payload.breaker {
            // The clock is read only when it matters: a failure may open the breaker.
            b.record(ok, if ok { 0.0 } else { self.now(py)? });
        }
        Ok(())
    }

    /// The current event is done: its bookkeeping waits for the next lock (see `Pending`).
    pub(super) fn finish_event(st: &mut State) {
        let cur = st.cur.take().expect("an event is current");
        cur.env.acknowledge();
        // The type's counter now (a single-writer counter, no lock); the engine's at the next
        // lock this worker takes anyway, before any Python code runs.
        bump(&cur.env.route().counters.processed, 1);
        st.pending.finished = Some(Finished { lane: cur.lane });
    }
}
