//! Route resolution and envelope building: the cached route of an event's class (and type
//! key), the route of one subscription for a retried dead letter, and the envelope of an
//! event about to be published, with its ids shown on a `DomainEvent`.

use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::core::health;
use crate::python::envelope::{self, EnvData, Origin};
use crate::python::errors;
use crate::python::events;
use crate::python::route::Route;

use super::state::{PyBusCore, Queued};

impl PyBusCore {
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
            if !by_key && !is_dict {
                let generation = inner.engine.router.generation();
                if let Some(r) = inner.routes.get(&(ty_id, None), generation).map(Arc::clone) {
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
            if let Some(r) = inner
                .routes
                .get(&cache_key, inner.engine.router.generation())
            {
                return Ok(Arc::clone(r));
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
        let generation = inner.engine.router.generation();
        let stale = inner.routes.renew(generation);
        let plan = inner
            .engine
            .plan(key_name, mro, self.progress.get().is_some());
        let route = Arc::new(Route {
            plan,
            class: ty.into_any().unbind(),
            key_read,
        });
        inner.routes.insert(cache_key, Arc::clone(&route));
        drop(inner);
        drop(stale);
        Ok(route)
    }

    /// Builds the envelope of an event about to be published.
    pub(super) fn envelope(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        position: Option<i64>,
    ) -> PyResult<(Queued, Option<u64>)> {
        let parent = match correlation_id {
            Some(_) => None,
            None => envelope::get_current(py)?,
        };
        self.envelope_in(py, event, key, correlation_id, parent.as_deref(), position)
    }

    /// `envelope`, with the envelope of the event being handled where it was published
    /// (`parent`: read once for all the events of a `publish_many`).
    pub(super) fn envelope_in(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<Bound<'_, PyAny>>,
        correlation_id: Option<Bound<'_, PyAny>>,
        parent: Option<&EnvData>,
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
        let origin = match (correlation_id, parent) {
            (Some(c), _) => Origin::Root(Some(c.unbind())),
            (None, Some(p)) => Origin::Child(p.correlation(py)?.unbind(), p.id(py)?.unbind()),
            (None, None) => Origin::Root(None),
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

    /// `full` restricted to the subscription named `name`, or `InvalidSubscription`.
    pub(super) fn route_for(py: Python<'_>, full: &Route, name: &str) -> PyResult<Route> {
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
        Ok(full.narrowed(py, subs))
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
