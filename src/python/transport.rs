//! `RedisCore`: the Redis Streams transport from Python. Publishing returns a loop future
//! resolved in batches (see `completion`); delivered entries are gathered on the transport's
//! thread and handed to the loop with one `call_soon_threadsafe` per batch, where they are
//! decoded and dispatched to the local bus, each acknowledged once all its subscriptions are
//! done.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::python::bus::PyBusCore;
use crate::python::completion::{Completions, Outcome, PyResolver};
use crate::python::errors::to_py;
use crate::python::events;
use crate::python::json::records::StreamPayload;
use crate::python::store::record_of;
use crate::python::{errors, json, runtime};
use crate::transport::leases::{self, LeaseConfig};
use crate::transport::{Config, Deliver, Entry, Transport, TransportError};
use serde_json::value::RawValue;

/// Items received on a transport thread and not yet taken on the loop, and the callback that
/// takes them: scheduled once per batch (when the inbox goes from empty to not empty).
struct Inbox<T> {
    items: Mutex<Vec<T>>,
    /// (loop, callback) to schedule when items arrive.
    target: Mutex<Option<(Py<PyAny>, Py<PyAny>)>>,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            target: Mutex::new(None),
        }
    }
}

impl<T> Inbox<T> {
    fn push(&self, items: Vec<T>) {
        let first = {
            let mut inbox = self.items.lock();
            let was_empty = inbox.is_empty();
            inbox.extend(items);
            was_empty
        };
        if first {
            // One GIL acquisition per batch; nothing once the interpreter is exiting.
            let _ = runtime::attach(|py| {
                let target = self
                    .target
                    .lock()
                    .as_ref()
                    .map(|(l, c)| (l.clone_ref(py), c.clone_ref(py)));
                if let Some((l, c)) = target {
                    let _ = l
                        .bind(py)
                        .call_method1(intern!(py, "call_soon_threadsafe"), (c,));
                }
            });
        }
    }

    fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock())
    }

    fn set_target(&self, target: Option<(Py<PyAny>, Py<PyAny>)>) {
        // The old target is dropped after the lock is released: a drop may run Python.
        let old = std::mem::replace(&mut *self.target.lock(), target);
        drop(old);
    }
}

struct PySinkR {
    completions: Arc<Completions>,
    resolver: Py<PyResolver>,
    inbox: Arc<Inbox<Entry>>,
}

impl Deliver for PySinkR {
    fn published(&self, results: Vec<(u64, Result<Vec<String>, TransportError>)>) {
        let outcomes = results
            .into_iter()
            .map(|(t, r)| {
                let f: Outcome = Box::new(move |py| match r {
                    // One event: its id; a batch: the list of ids.
                    Ok(ids) if ids.len() == 1 => Ok(PyString::new(py, &ids[0]).into_any().unbind()),
                    Ok(ids) => Ok(pyo3::types::PyList::new(py, ids)?.into_any().unbind()),
                    Err(e) => Err(to_py(&e)),
                });
                (t, f)
            })
            .collect();
        self.completions.complete(&self.resolver, outcomes);
    }

    fn entries(&self, entries: Vec<Entry>) {
        self.inbox.push(entries);
    }
}

/// The native half of a Redis-backed `oxbus.EventBus`.
#[pyclass(frozen, name = "RedisCore", module = "oxbus._oxbus")]
pub struct PyRedisCore {
    transport: Arc<Transport>,
    completions: Arc<Completions>,
    inbox: Arc<Inbox<Entry>>,
    partitions: usize,
}

/// FNV-1a: the same partition for the same key in every process.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A lease TTL in seconds, checked: at least 0.1 s (the heartbeat runs every third of it).
fn lease_ttl_of(ttl: f64) -> PyResult<Duration> {
    if (0.1..=86_400.0).contains(&ttl) {
        Ok(Duration::from_secs_f64(ttl))
    } else {
        Err(errors::configuration_error(format!(
            "lease_ttl must be a number of seconds from 0.1 to 86400, got {ttl}"
        )))
    }
}

/// The JSON written to the stream: identity, type, version, time, data and metadata.
fn payload_of(
    event: &Bound<'_, PyAny>,
    correlation_id: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let rec = record_of(event, correlation_id)?;
    let invalid = |e: serde_json::Error| {
        errors::serialization_error(format!("cannot encode the stream payload: {e}"))
    };
    // serde_json checks the spliced JSON as it borrows it: ~190 ns for 270 bytes of data and
    // metadata (measured in a release build), ~1.5% of a publish at 80k events/s.
    let data: &RawValue = serde_json::from_str(&rec.data).map_err(invalid)?;
    let metadata: &RawValue = serde_json::from_str(&rec.metadata).map_err(invalid)?;
    serde_json::to_string(&StreamPayload {
        event_id: rec.event_id.as_str().into(),
        event_type: rec.event_type.as_str().into(),
        event_version: rec.event_version,
        occurred_at: rec.occurred_at.as_deref().map(Into::into),
        data,
        metadata,
    })
    .map_err(invalid)
}

impl PyRedisCore {
    /// The stream of an event: by a stable hash of its key when there are partitions.
    fn partition_of(
        &self,
        event: &Bound<'_, PyAny>,
        key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let k = events::event_key(event, key)?;
        // Refused here, before anything is sent, if a consumer could not read it back.
        let k = k.map(|k| events::portable_key(&k)).transpose()?;
        if self.partitions <= 1 {
            return Ok(0);
        }
        // A stable hash of the key's text: Python's own str hash differs per process.
        let h = k
            .map(|k| k.str().map(|t| stable_hash(t.to_str().unwrap_or_default())))
            .transpose()?;
        Ok(self.transport.partition(h))
    }
}

/// A transport's checked settings and Python half, before it connects.
struct Pending {
    cfg: Config,
    completions: Arc<Completions>,
    inbox: Arc<Inbox<Entry>>,
    sink: Arc<PySinkR>,
}

impl Pending {
    /// The Python half (completions, inbox, sink) of a transport with settings `cfg`.
    fn new(py: Python<'_>, cfg: Config) -> PyResult<Self> {
        let completions = Arc::new(Completions::default());
        let resolver = Py::new(py, PyResolver::new(Arc::clone(&completions)))?;
        let inbox = Arc::new(Inbox::default());
        let sink = Arc::new(PySinkR {
            completions: Arc::clone(&completions),
            resolver,
            inbox: Arc::clone(&inbox),
        });
        Ok(Self {
            cfg,
            completions,
            inbox,
            sink,
        })
    }

    async fn connect(self, handle: tokio::runtime::Handle) -> Result<PyRedisCore, TransportError> {
        let partitions = self.cfg.streams.len();
        let transport = Transport::connect(self.cfg, self.sink, handle).await?;
        Ok(PyRedisCore {
            transport: Arc::new(transport),
            completions: self.completions,
            inbox: self.inbox,
            partitions,
        })
    }
}

#[pymethods]
impl PyRedisCore {
    /// Checks the settings, connects (on the shared runtime: the loop thread never waits for
    /// Redis) -> awaitable of a connected `RedisCore`. Every setting by keyword.
    #[staticmethod]
    #[pyo3(signature = (*, url, streams, group, consumer, claim_idle, maxlen, prefetch, max_deliveries, dead_stream, publish_timeout, consume, batch=256, stream=None, lease_ttl=None))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        url: String,
        streams: Vec<String>,
        group: String,
        consumer: String,
        claim_idle: f64,
        maxlen: usize,
        prefetch: usize,
        max_deliveries: u32,
        dead_stream: String,
        publish_timeout: f64,
        consume: bool,
        batch: usize,
        stream: Option<String>,
        lease_ttl: Option<f64>,
    ) -> PyResult<Bound<'_, PyAny>> {
        for (name, v) in [
            ("claim_idle", claim_idle),
            ("publish_timeout", publish_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(errors::configuration_error(format!(
                    "{name} must be a number of seconds > 0, got {v}"
                )));
            }
        }
        let leases = match (stream, lease_ttl) {
            (Some(stream), Some(ttl)) => Some(LeaseConfig {
                stream,
                ttl: lease_ttl_of(ttl)?,
            }),
            _ => None,
        };
        let cfg = Config {
            url,
            streams,
            group,
            consumer,
            claim_idle: Duration::from_secs_f64(claim_idle),
            maxlen,
            batch: batch.max(1),
            prefetch: prefetch.max(1),
            max_deliveries: max_deliveries.max(1),
            dead_stream,
            publish_timeout: Duration::from_secs_f64(publish_timeout),
            consume,
            leases,
        };
        let pending = Pending::new(py, cfg)?;
        let handle = runtime::handle()?;
        runtime::future_into_py(py, async move {
            pending.connect(handle).await.map_err(|e| to_py(&e))
        })
    }

    /// Where deliveries go: `callback()` is scheduled on `loop_` when entries arrive.
    fn set_target(&self, loop_: Py<PyAny>, callback: Py<PyAny>) {
        self.inbox.set_target(Some((loop_, callback)));
    }

    /// Publishes events in one request -> future of their entry ids, resolved once Redis
    /// accepted all of them (one future and one wake-up for the whole batch).
    fn publish_many(&self, py: Python<'_>, events: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let items = events
            .try_iter()?
            .map(|e| {
                let e = e?;
                Ok((self.partition_of(&e, None)?, payload_of(&e, None)?))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let (token, fut, _) = self.completions.register(py)?;
        if let Err(e) = self.transport.publish_many(token, items) {
            self.completions.forget(token);
            return Err(to_py(&e));
        }
        Ok(fut)
    }

    /// Publishes an event -> future of its entry id, resolved once Redis accepted it.
    #[pyo3(signature = (event, key=None, correlation_id=None))]
    fn publish(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<&Bound<'_, PyAny>>,
        correlation_id: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let payload = payload_of(event, correlation_id)?;
        let partition = self.partition_of(event, key)?;
        let (token, fut, _) = self.completions.register(py)?;
        if let Err(e) = self.transport.publish(token, partition, payload) {
            self.completions.forget(token);
            return Err(to_py(&e));
        }
        Ok(fut)
    }

    /// Dispatches the received entries to `bus`: `make_event(dict)` rebuilds each event from
    /// its decoded payload. Returns how many were received, and why those the bus could not
    /// take (undecodable, a key it refuses, a closed bus) went to the dead-letter stream.
    fn dispatch(
        &self,
        py: Python<'_>,
        bus: &Bound<'_, PyBusCore>,
        make_event: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, Vec<String>)> {
        let entries = self.inbox.take();
        let n = entries.len();
        let mut refused = Vec::new();
        for e in entries {
            let transport = Arc::clone(&self.transport);
            let (stream, id) = (e.stream.clone(), e.id.clone());
            let ack: crate::python::envelope::Ack = Box::new(move || transport.ack(&stream, id));
            let accepted = json::decode(py, &e.payload)
                .and_then(|d| Ok((make_event.call1((&d,))?, d)))
                .and_then(|(event, payload)| {
                    let meta = payload.get_item(intern!(py, "metadata")).ok();
                    let field = |name: &str| -> Option<Bound<'_, PyAny>> {
                        meta.as_ref()
                            .and_then(|m| m.get_item(name).ok())
                            .filter(|v| !v.is_none())
                    };
                    bus.get().accept_remote(
                        py,
                        &event,
                        field("correlation_id"),
                        field("causation_id"),
                        ack,
                    )
                });
            if let Err(err) = accepted {
                if errors::is_bus_closed(py, &err) {
                    continue; // left pending: delivered again after the next start
                }
                // It would fail on every delivery: to the dead-letter stream, with the reason;
                // the rest of the batch goes on.
                let reason = format!("{}: {}", err.get_type(py).name()?, err.value(py));
                refused.push(format!("entry {} of {}: {reason}", e.id, e.stream));
                self.transport
                    .dead_letter(&e.stream, e.id, e.payload, reason);
            }
        }
        Ok((n, refused))
    }

    /// (reachable, lag, pending, published, received, claimed, dead, last error).
    fn health(&self) -> (bool, u64, u64, u64, u64, u64, u64, Option<String>) {
        let h = self.transport.health();
        (
            h.reachable,
            h.lag,
            h.pending,
            h.published,
            h.received,
            h.claimed,
            h.dead,
            h.last_error,
        )
    }

    /// With partition leases: (partitions this member holds, the group's live members, each
    /// partition's holder), as last read; empty lists without leases.
    #[allow(clippy::type_complexity)]
    fn leases(&self) -> (Vec<usize>, Vec<String>, Vec<Option<String>>) {
        let h = self.transport.health();
        (h.owned, h.members, h.assignment)
    }

    /// Reads the members and partition leases of `group` on `stream` (changes nothing) ->
    /// awaitable of (partitions, lease TTL in s, [(member, s left)], [(holder, s left) or
    /// None per partition]).
    #[staticmethod]
    fn read_group(
        py: Python<'_>,
        url: String,
        stream: String,
        group: String,
    ) -> PyResult<Bound<'_, PyAny>> {
        let safe = crate::transport::redis_streams::redact(&url);
        runtime::future_into_py(py, async move {
            let v = leases::read_group(&url, &stream, &group)
                .await
                .map_err(|e| {
                    to_py(&TransportError::Redis {
                        url: safe,
                        message: e.to_string(),
                    })
                })?;
            #[allow(clippy::cast_precision_loss)]
            let s = |ms: i64| ms as f64 / 1000.0;
            Ok((
                v.partitions,
                v.lease_ttl_ms as f64 / 1000.0,
                v.members
                    .into_iter()
                    .map(|(m, left)| (m, s(left)))
                    .collect::<Vec<_>>(),
                v.owners
                    .into_iter()
                    .map(|o| o.map(|(h, left)| (h, s(left))))
                    .collect::<Vec<_>>(),
            ))
        })
    }

    /// Takes no new entries from Redis (before the bus drains what it has).
    fn pause(&self) {
        self.transport.pause();
    }

    /// Sends queued acknowledgements, then stops the transport's tasks -> awaitable, done
    /// once they are gone (the loop thread never waits for Redis). Idempotent.
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

#[pymethods]
impl PyBridgeCore {
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
