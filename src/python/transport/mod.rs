//! `TransportCore`: any broker [`Transport`] from Python, the same way for every kind.
//! Publishing returns a loop future resolved in batches (see `completion`); delivered messages
//! are gathered on the transport's thread and handed to the loop with one
//! `call_soon_threadsafe` per batch, where they are decoded and dispatched to the local bus,
//! each acknowledged once all its subscriptions are done.
//!
//! A new broker adds one constructor here (next to `redis` and `rabbitmq`): check its
//! settings, then `connect` with them.

mod amqp_bridge;
mod bridge;
mod inbox;
mod rabbitmq;
mod redis;

use std::future::Future;
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use pyo3::{PyTraverseError, PyVisit};

pub use amqp_bridge::PyAmqpBridgeCore;
pub use bridge::PyBridgeCore;
use inbox::Inbox;

use crate::python::bus::PyBusCore;
use crate::python::completion::{Completions, PyResolver};
use crate::python::envelope::{Ack, Settle};
use crate::python::errors::to_py;
use crate::python::futures::Outcome;
use crate::python::store::record_of;
use crate::python::{errors, events, json, runtime};
use crate::transport::{
    Confirm, Failure, HandlerFailure, Key, Message, Outgoing, Place, RabbitMq, RedisStreams, Sink,
    Transport, TransportError, RETRY_FIELD,
};

/// Confirms resolve loop futures; deliveries wait in the inbox for the loop.
pub(super) struct PySink {
    completions: Arc<Completions>,
    resolver: Py<PyResolver>,
    inbox: Arc<Inbox<Message>>,
}

/// A sink, with the completions its confirms resolve and the inbox of its deliveries.
type SinkParts = (Arc<Completions>, Arc<Inbox<Message>>, Arc<PySink>);

impl PySink {
    /// A sink, with the completions its confirms resolve and the inbox of its deliveries.
    pub(super) fn new(py: Python<'_>) -> PyResult<SinkParts> {
        let completions = Arc::new(Completions::default());
        let resolver = Py::new(py, PyResolver::new(Arc::clone(&completions)))?;
        let inbox = Arc::new(Inbox::default());
        let sink = Arc::new(Self {
            completions: Arc::clone(&completions),
            resolver,
            inbox: Arc::clone(&inbox),
        });
        Ok((completions, inbox, sink))
    }
}

impl Sink for PySink {
    fn confirmed(&self, results: Vec<Confirm>) {
        let outcomes = results
            .into_iter()
            .map(|(t, r)| {
                let f: Outcome = Box::new(move |py| match r {
                    // One event: its id; a batch: the list of ids.
                    Ok(ids) if ids.len() == 1 => Ok(PyString::new(py, &ids[0]).into_any().unbind()),
                    Ok(ids) => Ok(PyList::new(py, ids)?.into_any().unbind()),
                    Err(e) => Err(to_py(&e)),
                });
                (t, f)
            })
            .collect();
        self.completions.complete(&self.resolver, outcomes);
    }

    fn delivered(&self, messages: Vec<Message>) {
        self.inbox.push(messages);
    }
}

/// A delivered message in the bus: acknowledged once every subscription finished it, after
/// the dead letters of those that gave up (written first, by the transport).
struct Delivery {
    transport: Arc<dyn Transport>,
    message: Message,
    failures: parking_lot::Mutex<Vec<Failure>>,
}

impl Settle for Delivery {
    fn dead_letter(&self, failure: HandlerFailure) {
        self.failures.lock().push(Failure::Handler(failure));
    }

    fn finish(self: Box<Self>) {
        let failures = self.failures.into_inner();
        if failures.is_empty() {
            self.transport.ack(&self.message);
        } else {
            self.transport.dead_letter(self.message, failures);
        }
    }
}

/// Where a group's dead letters are, as Python names it (a dict).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PlaceSpec {
    kind: String,
    url: String,
    #[pyo3(default)]
    queue: Option<String>,
    #[pyo3(default)]
    stream: Option<String>,
    #[pyo3(default)]
    group: Option<String>,
}

impl PlaceSpec {
    fn place(self) -> PyResult<Place> {
        match (self.kind.as_str(), self.queue, self.stream, self.group) {
            ("rabbitmq", Some(queue), _, _) => Ok(Place::RabbitMq {
                url: self.url,
                queue,
            }),
            ("redis", _, Some(stream), Some(group)) => Ok(Place::Redis {
                url: self.url,
                stream,
                group,
            }),
            (kind, ..) => Err(errors::configuration_error(format!(
                "no dead-letter place of kind {kind:?} with these settings"
            ))),
        }
    }
}

/// A retried dead letter's target, from its payload: (group, subscription).
fn retry_target(payload: &Bound<'_, PyAny>) -> PyResult<(Option<String>, Option<String>)> {
    let Some(target) = payload.get_item(RETRY_FIELD).ok().filter(|t| !t.is_none()) else {
        return Ok((None, None));
    };
    let field = |name: &str| -> PyResult<Option<String>> {
        target
            .get_item(name)
            .ok()
            .filter(|v| !v.is_none())
            .map(|v| v.extract::<String>())
            .transpose()
    };
    Ok((field("group")?, field("subscription")?))
}

/// A timeout in seconds, clamped to 0.1 s .. 1 h.
fn seconds(s: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if s.is_finite() {
        s.clamp(0.1, 3600.0)
    } else {
        3600.0
    })
}

/// The native half of a broker-backed `oxbus.EventBus`.
#[pyclass(frozen, name = "TransportCore", module = "oxbus._oxbus")]
pub struct PyTransportCore {
    transport: Arc<dyn Transport>,
    completions: Arc<Completions>,
    inbox: Arc<Inbox<Message>>,
}

impl Drop for PyTransportCore {
    /// The transport's tasks hold the inbox until they end: the loop and the callback go now.
    fn drop(&mut self) {
        self.inbox.clear();
    }
}

/// An event to publish: encoded, with its key's canonical text (refused here, before anything
/// is sent, if a consumer could not read the key back).
fn outgoing(
    event: &Bound<'_, PyAny>,
    key: Option<&Bound<'_, PyAny>>,
    correlation_id: Option<&Bound<'_, PyAny>>,
) -> PyResult<Outgoing> {
    let key = events::event_key(event, key)?
        .map(|k| {
            let k = events::portable_key(&k)?;
            Ok::<_, PyErr>(Key {
                text: k.str()?.to_string(),
                json: json::encode(&k)?,
            })
        })
        .transpose()?;
    Ok(Outgoing {
        event: record_of(event, correlation_id)?,
        key,
    })
}

/// Connects a transport on the shared runtime (the loop thread never waits for the broker)
/// -> awaitable of a connected `TransportCore`. `connect` gets the sink and the runtime.
fn connect<T, F, Fut>(py: Python<'_>, connect: F) -> PyResult<Bound<'_, PyAny>>
where
    T: Transport,
    F: FnOnce(Arc<dyn Sink>, tokio::runtime::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, TransportError>> + Send + 'static,
{
    let (completions, inbox, sink) = PySink::new(py)?;
    let handle = runtime::handle()?;
    runtime::future_into_py(py, async move {
        let transport = connect(sink, handle).await.map_err(|e| to_py(&e))?;
        Ok(PyTransportCore {
            transport: Arc::new(transport),
            completions,
            inbox,
        })
    })
}

impl PyTransportCore {
    fn submit(&self, py: Python<'_>, batch: Vec<Outgoing>) -> PyResult<Py<PyAny>> {
        let (token, fut, _) = self.completions.register(py)?;
        if let Err(e) = self.transport.publish(token, batch) {
            self.completions.forget(token);
            return Err(to_py(&e));
        }
        Ok(fut)
    }
}

#[pymethods]
impl PyTransportCore {
    /// What the garbage collector follows from a transport's core: the loop and the callback
    /// its deliveries are handed to (a method of the bus's broker backend, which holds this
    /// core). Until `stop()` forgets them they close a cycle, so a bus left running when its
    /// loop ended kept itself, its loop and its connection alive for ever.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.inbox.traverse(&visit)
    }

    /// Breaks that cycle: the callback is forgotten (the collector found the bus unreachable,
    /// so nothing could await its transport any more; the transport stops once this core is
    /// dropped).
    fn __clear__(&self) {
        self.inbox.clear();
    }

    /// Redis Streams with `settings` (`oxbus.RedisStreams.native()`) -> awaitable of a
    /// connected `TransportCore`.
    #[staticmethod]
    fn redis(py: Python<'_>, settings: redis::RedisSettings) -> PyResult<Bound<'_, PyAny>> {
        let cfg = settings.config()?;
        connect(py, move |sink, rt| RedisStreams::connect(cfg, sink, rt))
    }

    /// RabbitMQ with `settings` (`oxbus.RabbitMQ.native()`) -> awaitable of a connected
    /// `TransportCore`.
    #[staticmethod]
    fn rabbitmq(py: Python<'_>, settings: rabbitmq::RabbitSettings) -> PyResult<Bound<'_, PyAny>> {
        let cfg = settings.config()?;
        connect(py, move |sink, rt| RabbitMq::connect(cfg, sink, rt))
    }

    /// The members of a Redis Streams `group` on `stream` and who holds each partition,
    /// read from Redis (changes nothing) -> awaitable of (partitions, lease TTL in s,
    /// [(member, s left)], [(holder, s left) or None per partition]).
    #[staticmethod]
    fn redis_group(
        py: Python<'_>,
        url: String,
        stream: String,
        group: String,
    ) -> PyResult<Bound<'_, PyAny>> {
        runtime::future_into_py(py, redis::read_group(url, stream, group))
    }

    /// Ready messages and consumers of each of `queues` on RabbitMQ (None: no such queue),
    /// read with passive declares (changes nothing) -> awaitable of that list.
    #[staticmethod]
    fn rabbitmq_queues(
        py: Python<'_>,
        url: String,
        queues: Vec<String>,
        timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let timeout = seconds(timeout);
        runtime::future_into_py(py, async move {
            crate::transport::rabbitmq::inspect(&url, &queues, timeout)
                .await
                .map_err(|e| to_py(&e))
        })
    }

    /// The dead letters at `place` (`{"kind": "rabbitmq", "url", "queue": <dead queue>}` or
    /// `{"kind": "redis", "url", "stream": <dead stream>, "group"}`) -> awaitable of
    /// [(id, source, payload, fields)], oldest first (changes nothing).
    #[staticmethod]
    fn dead_letters(py: Python<'_>, place: PlaceSpec, timeout: f64) -> PyResult<Bound<'_, PyAny>> {
        let (place, timeout) = (place.place()?, seconds(timeout));
        runtime::future_into_py(py, async move {
            let entries = place.list(timeout).await.map_err(|e| to_py(&e))?;
            Ok(entries
                .into_iter()
                .map(|e| (e.id, e.source, e.payload, e.fields))
                .collect::<Vec<_>>())
        })
    }

    /// Sends the dead letters of `ids` (None: all) at `place` back to their group, each for
    /// the subscription that failed only, and removes them -> awaitable of how many.
    #[staticmethod]
    #[pyo3(signature = (place, ids, timeout))]
    fn retry_dead_letters(
        py: Python<'_>,
        place: PlaceSpec,
        ids: Option<Vec<String>>,
        timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let (place, timeout) = (place.place()?, seconds(timeout));
        runtime::future_into_py(py, async move {
            place
                .retry(ids.as_deref(), timeout)
                .await
                .map_err(|e| to_py(&e))
        })
    }

    /// Removes the dead letters of `ids` (None: all) at `place` -> awaitable of how many.
    #[staticmethod]
    #[pyo3(signature = (place, ids, timeout))]
    fn remove_dead_letters(
        py: Python<'_>,
        place: PlaceSpec,
        ids: Option<Vec<String>>,
        timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let (place, timeout) = (place.place()?, seconds(timeout));
        runtime::future_into_py(py, async move {
            place
                .remove(ids.as_deref(), timeout)
                .await
                .map_err(|e| to_py(&e))
        })
    }

    /// "redis", "rabbitmq", ...
    #[getter]
    fn kind(&self) -> &'static str {
        self.transport.kind()
    }

    /// Where deliveries go: `callback()` is scheduled on `loop_` when messages arrive, and at
    /// once when some arrived before.
    fn set_target(&self, py: Python<'_>, loop_: Py<PyAny>, callback: Py<PyAny>) -> PyResult<()> {
        let (l, c) = (loop_.clone_ref(py), callback.clone_ref(py));
        self.inbox.set_target(Some((loop_, callback)));
        if !self.inbox.is_empty() {
            l.bind(py)
                .call_method1(intern!(py, "call_soon_threadsafe"), (c,))?;
        }
        Ok(())
    }

    /// Publishes events in one request -> future of their receipts, resolved once the broker
    /// holds all of them (one future and one wake-up for the whole batch).
    fn publish_many(&self, py: Python<'_>, events: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let batch = events
            .try_iter()?
            .map(|e| outgoing(&e?, None, None))
            .collect::<PyResult<Vec<_>>>()?;
        self.submit(py, batch)
    }

    /// Publishes an event -> future of its receipt, resolved once the broker holds it.
    #[pyo3(signature = (event, key=None, correlation_id=None))]
    fn publish(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<&Bound<'_, PyAny>>,
        correlation_id: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.submit(py, vec![outgoing(event, key, correlation_id)?])
    }

    /// Routes what `patterns` match to this member's group from now on (a subscription made
    /// while the bus runs) -> a future resolved once the broker applied it (whatever this
    /// transport publishes later is routed by it already), or None when there is nothing to
    /// wait for (the group gets those events already).
    fn bind(&self, py: Python<'_>, patterns: Vec<String>) -> PyResult<Option<Py<PyAny>>> {
        let (token, fut, _) = self.completions.register(py)?;
        match self.transport.bind(token, patterns) {
            Ok(true) => Ok(Some(fut)),
            Ok(false) => {
                self.completions.forget(token);
                Ok(None)
            }
            Err(e) => {
                self.completions.forget(token);
                Err(to_py(&e))
            }
        }
    }

    /// Dispatches the received messages to `bus`: `make_event(dict)` rebuilds each event from
    /// its decoded payload. Returns how many were received, and why those the bus could not
    /// take (undecodable, a key it refuses) went to the dead-letter place. Messages that
    /// arrive while the bus is closed stay unacknowledged: the broker delivers them again.
    fn dispatch(
        &self,
        py: Python<'_>,
        bus: &Bound<'_, PyBusCore>,
        make_event: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, Vec<String>)> {
        let messages = self.inbox.take();
        let n = messages.len();
        let mut refused = Vec::new();
        for m in messages {
            let accepted = json::decode(py, &m.payload)
                .and_then(|d| Ok((make_event.call1((&d,))?, d)))
                .and_then(|(event, payload)| {
                    let meta = payload.get_item(intern!(py, "metadata")).ok();
                    let field = |name: &str| -> Option<Bound<'_, PyAny>> {
                        meta.as_ref()
                            .and_then(|m| m.get_item(name).ok())
                            .filter(|v| !v.is_none())
                    };
                    let (group, only) = retry_target(&payload)?;
                    if group.is_some_and(|g| g != self.transport.group()) {
                        // Another group's retried dead letter (a stream every group reads).
                        self.transport.ack(&m);
                        return Ok(());
                    }
                    let ack: Ack = Box::new(Delivery {
                        transport: Arc::clone(&self.transport),
                        message: m.clone(),
                        failures: parking_lot::Mutex::new(Vec::new()),
                    });
                    let key = payload
                        .get_item(intern!(py, "key"))
                        .ok()
                        .filter(|k| !k.is_none());
                    bus.get().accept_remote(
                        py,
                        &event,
                        key,
                        field("correlation_id"),
                        field("causation_id"),
                        only.as_deref(),
                        ack,
                    )
                });
            if let Err(err) = accepted {
                if errors::is_bus_closed(py, &err) {
                    continue; // left pending: delivered again after the next start
                }
                // It would fail on every delivery: to the dead-letter place, with the reason;
                // the rest of the batch goes on.
                let reason = format!("{}: {}", err.get_type(py).name()?, err.value(py));
                refused.push(format!("message {} of {}: {reason}", m.id, m.source));
                self.transport
                    .dead_letter(m, vec![Failure::Refused(reason)]);
            }
        }
        Ok((n, refused))
    }

    /// The transport's reading: kind, reachable, lag, pending, published, received, claimed,
    /// dead_lettered, last_error, and with partition ownership owned, members, assignment.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.transport.health();
        let d = PyDict::new(py);
        d.set_item("kind", self.transport.kind())?;
        d.set_item("reachable", h.reachable)?;
        d.set_item("lag", h.lag)?;
        d.set_item("pending", h.pending)?;
        d.set_item("published", h.published)?;
        d.set_item("received", h.received)?;
        d.set_item("claimed", h.claimed)?;
        d.set_item("dead_lettered", h.dead)?;
        d.set_item("last_error", h.last_error)?;
        d.set_item("owned", h.owned)?;
        d.set_item("members", h.members)?;
        d.set_item("assignment", h.assignment)?;
        Ok(d)
    }

    /// Waits (up to 2 s) until the acknowledgements and dead letters queued so far reached
    /// the broker -> awaitable (the loop thread never waits for the broker).
    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = Arc::clone(&self.transport);
        runtime::future_into_py(py, async move {
            t.flush().await;
            Ok(())
        })
    }

    /// Takes no new messages (before the bus drains what it has).
    fn pause(&self) {
        self.transport.pause();
    }

    /// Sends queued acknowledgements, then stops the transport's tasks -> awaitable, done
    /// once they are gone (the loop thread never waits for the broker). Idempotent.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.inbox.set_target(None);
        let t = Arc::clone(&self.transport);
        runtime::future_into_py(py, async move {
            t.stop().await;
            Ok(())
        })
    }

    /// Whether `stop()` has run.
    #[getter]
    fn stopped(&self) -> bool {
        self.transport.is_stopped()
    }
}
