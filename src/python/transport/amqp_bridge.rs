//! `AmqpBridgeCore`: plain AMQP queues in and exchanges out, for `oxbus.AmqpBridge`. It is the
//! RabbitMQ transport consuming queues of other systems as they are (nothing declared) and
//! publishing plain JSON bodies under publisher confirms.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use super::inbox::Inbox;
use super::PySink;
use crate::python::completion::Completions;
use crate::python::errors::{self, to_py};
use crate::python::runtime;
use crate::transport::rabbitmq::{Config, RabbitMq};
use crate::transport::{Message, Transport};

/// The native half of `oxbus.AmqpBridge`.
#[pyclass(frozen, name = "AmqpBridgeCore", module = "oxbus._oxbus")]
pub struct PyAmqpBridgeCore {
    transport: Arc<RabbitMq>,
    completions: Arc<Completions>,
    inbox: Arc<Inbox<Message>>,
}

fn seconds(name: &str, v: f64) -> PyResult<Duration> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(errors::configuration_error(format!(
            "{name} must be a number of seconds > 0, got {v}"
        )))
    }
}

impl Drop for PyAmqpBridgeCore {
    /// The bridge's tasks hold the inbox until they end: the loop and the callback go now.
    fn drop(&mut self) {
        self.inbox.clear();
    }
}

#[pymethods]
impl PyAmqpBridgeCore {
    /// What the garbage collector follows from a bridge's core: the loop and the callback its
    /// messages are handed to (a method of the `oxbus.AmqpBridge` holding this core).
    /// Until `stop()` forgets them they close a cycle, so a bridge left running when its loop
    /// ended kept itself, its bus and its loop alive for ever.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.inbox.traverse(&visit)
    }

    /// Breaks that cycle: the callback is forgotten (the bridge stops once this core is
    /// dropped).
    fn __clear__(&self) {
        self.inbox.clear();
    }

    /// Connects, checks that `queues` exist and consumes them (on the shared runtime) ->
    /// awaitable of a running `AmqpBridgeCore`.
    #[staticmethod]
    fn connect(
        py: Python<'_>,
        url: String,
        queues: Vec<String>,
        prefetch: u16,
        connect_timeout: f64,
        publish_timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let consume = !queues.is_empty();
        let cfg = Config {
            url,
            exchange: String::new(),
            group: "bridge".into(),
            queue: String::new(),
            partitions: 1,
            bindings: Vec::new(),
            prefetch: prefetch.max(1),
            max_deliveries: 1,
            connect_timeout: seconds("connect_timeout", connect_timeout)?,
            publish_timeout: seconds("publish_timeout", publish_timeout)?,
            consume,
            existing: Some(queues),
        };
        let (completions, inbox, sink) = PySink::new(py)?;
        let handle = runtime::handle()?;
        runtime::future_into_py(py, async move {
            let transport = RabbitMq::connect(cfg, sink, handle)
                .await
                .map_err(|e| to_py(&e))?;
            Ok(Self {
                transport: Arc::new(transport),
                completions,
                inbox,
            })
        })
    }

    /// `callback()` is scheduled on `loop_` when messages arrive.
    fn set_target(&self, loop_: Py<PyAny>, callback: Py<PyAny>) {
        self.inbox.set_target(Some((loop_, callback)));
    }

    /// The messages received since the last call: (queue, body, receipt) triples; each is
    /// settled with `ack(queue, receipt)`.
    fn take(&self) -> Vec<(String, String, String)> {
        self.inbox
            .take()
            .into_iter()
            .map(|m| (m.source, m.payload, m.id))
            .collect()
    }

    /// The message is done with: the broker may forget it.
    fn ack(&self, queue: String, receipt: String) {
        self.transport.ack(&Message {
            source: queue,
            id: receipt,
            payload: String::new(),
            deliveries: 0,
        });
    }

    /// Publishes `body` (JSON) to `exchange` with `routing_key`, persistent -> future resolved
    /// once the broker confirmed it.
    fn publish(
        &self,
        py: Python<'_>,
        exchange: String,
        routing_key: String,
        body: String,
    ) -> PyResult<Py<PyAny>> {
        let (token, fut, _) = self.completions.register(py)?;
        if let Err(e) = self
            .transport
            .publish_raw(token, exchange, routing_key, body)
        {
            self.completions.forget(token);
            return Err(to_py(&e));
        }
        Ok(fut)
    }

    /// Sends queued acknowledgements, then stops -> awaitable. Idempotent.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.inbox.set_target(None);
        let t = Arc::clone(&self.transport);
        runtime::future_into_py(py, async move {
            t.stop().await;
            Ok(())
        })
    }
}
