//! What an event reaches: its subscriptions' handlers, resolved once per event class.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::core::breaker::Breaker;
use crate::core::retry::RetryPolicy;
use crate::core::routing::Subscription;
use crate::core::stats::TypeCounters;
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

/// Subscription names, shared.
pub type Names = Arc<[Arc<str>]>;

/// The subscriptions one kind of event reaches, resolved once and cached.
pub struct Route {
    /// The event class (keeps it alive while its id is a cache key).
    pub class: Py<PyAny>,
    pub subs: Vec<Arc<Sub>>,
    /// On a durable bus: the type key and the subscriptions this route leaves out, whose
    /// progress moves past an event of it (`Writer::skip`).
    pub skip: Option<(Arc<str>, Names)>,
    pub type_key: String,
    pub mro: Vec<usize>,
    /// How its `aggregate_id` is read.
    pub key_read: KeyRead,
    pub counters: Arc<TypeCounters>,
}
