//! `BridgeCore`: the Redis Pub/Sub bridge from Python.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use super::inbox::Inbox;
use crate::python::errors::to_py;
use crate::python::runtime;

struct BridgeSink {
    inbox: Arc<Inbox<(String, String)>>,
}

impl crate::transport::pubsub::ChannelSink for BridgeSink {
    fn messages(&self, messages: Vec<(String, String)>) {
        self.inbox.push(messages);
    }
}

/// The native half of `oxbus.RedisPubSubBridge`.
#[pyclass(frozen, name = "BridgeCore", module = "oxbus._oxbus")]
pub struct PyBridgeCore {
    bridge: Arc<crate::transport::pubsub::Bridge>,
    inbox: Arc<Inbox<(String, String)>>,
}

impl Drop for PyBridgeCore {
    /// The bridge's tasks hold the inbox until they end: the loop and the callback go now.
    fn drop(&mut self) {
        self.inbox.clear();
    }
}

#[pymethods]
impl PyBridgeCore {
    /// What the garbage collector follows from a bridge's core: the loop and the callback its
    /// messages are handed to (a method of the `oxbus.RedisPubSubBridge` holding this core).
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

    /// Connects and subscribes (on the shared runtime) -> awaitable of a running `BridgeCore`.
    #[staticmethod]
    fn connect(py: Python<'_>, url: String, channels: Vec<String>) -> PyResult<Bound<'_, PyAny>> {
        let handle = runtime::handle()?;
        runtime::future_into_py(py, async move {
            let inbox = Arc::new(Inbox::default());
            let sink = Arc::new(BridgeSink {
                inbox: Arc::clone(&inbox),
            });
            let bridge = crate::transport::pubsub::Bridge::start(&url, channels, sink, handle)
                .await
                .map_err(|e| to_py(&e))?;
            Ok(Self {
                bridge: Arc::new(bridge),
                inbox,
            })
        })
    }

    /// `callback()` is scheduled on `loop_` when messages arrive.
    fn set_target(&self, loop_: Py<PyAny>, callback: Py<PyAny>) {
        self.inbox.set_target(Some((loop_, callback)));
    }

    /// The messages received since the last call: (channel, payload) pairs.
    fn take(&self) -> Vec<(String, String)> {
        self.inbox.take()
    }

    /// Queues a `PUBLISH` of `payload` on `channel`.
    fn publish(&self, channel: String, payload: String) -> PyResult<()> {
        self.bridge.publish(channel, payload).map_err(|e| to_py(&e))
    }

    /// Stops the bridge's tasks -> awaitable, done once they are gone. Idempotent.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.inbox.set_target(None);
        let bridge = Arc::clone(&self.bridge);
        runtime::future_into_py(py, async move {
            bridge.stop().await;
            Ok(())
        })
    }
}
