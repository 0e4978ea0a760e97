//! Intake: an event accepted into the queue (or its publisher blocked until there is room),
//! blocked publishers admitted as room frees, idle workers woken, and `wait_for` callers told
//! of the events accepted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;

use crate::core::bus::{Accepted, Admission, Blocked};
use crate::core::stats::bump;
use crate::python::envelope::{self, EnvData, Origin};
use crate::python::errors;
use crate::python::events;
use crate::python::futures::{fail, is_done, resolve};

use super::state::{PyBusCore, Queued};

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
        let hit = self
            .inner
            .lock(py)
            .waiters
            .take_matching(&route.type_key, &route.mro);
        let mut declined = Vec::new();
        let event = env.event_ref().bind(py);
        for w in hit {
            let hit = match &w.payload.predicate {
                None => Ok(true),
                Some(p) => p.bind(py).call1((event,)).and_then(|r| r.is_truthy()),
            };
            match hit {
                Ok(true) => resolve(py, &w.payload.fut, event),
                Ok(false) => declined.push(w),
                Err(e) => fail(py, &w.payload.fut, &e),
            }
        }
        let mut inner = self.inner.lock(py);
        inner.waiters.put_back(declined);
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
    pub(super) fn accept(
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

/// The running thread, as `pthread_self()` (a register read, where `thread::current()` takes
/// and drops a reference count: this is asked on every publish).
pub(super) fn current_thread() -> libc::pthread_t {
    // SAFETY: always safe to call.
    unsafe { libc::pthread_self() }
}
