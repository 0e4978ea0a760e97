//! What an event reaches: its subscriptions' handlers, resolved once per event class.

use std::ops::Deref;
use std::sync::Arc;

use pyo3::prelude::*;

use crate::core::breaker::Breaker;
use crate::core::plan::Plan;
use crate::core::retry::RetryPolicy;
use crate::core::routing::Subscription;
use crate::python::events::KeyRead;

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

pub type Sub = Subscription<Handler>;

/// The subscriptions one kind of event reaches (the engine's `Plan`), with what only Python
/// knows of it: its class and how its key is read. Resolved once and cached.
pub struct Route {
    pub plan: Plan<Handler>,
    /// The event class (keeps it alive while its id is a cache key).
    pub class: Py<PyAny>,
    /// How its `aggregate_id` is read.
    pub key_read: KeyRead,
}

impl Deref for Route {
    type Target = Plan<Handler>;

    fn deref(&self) -> &Plan<Handler> {
        &self.plan
    }
}

impl Route {
    /// The same kind of event, reaching `subs` only (see `Plan::narrowed`).
    pub fn narrowed(&self, py: Python<'_>, subs: Vec<Arc<Sub>>) -> Self {
        Self {
            plan: self.plan.narrowed(subs),
            class: self.class.clone_ref(py),
            key_read: self.key_read.clone_ref(py),
        }
    }
}
